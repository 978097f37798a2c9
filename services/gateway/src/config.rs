//! The gateway's configuration: the environment for defaults, and an optional routes file
//! (`ROUTES_FILE`, JSON) for what differs per path prefix.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use common::config::{CommonConfig, ConfigError, Env, HumanDuration};
use common::hyper_server::ServerOptions;
use serde::Deserialize;

use crate::balance::Balance;
use crate::breaker::BreakerConfig;
use crate::ratelimit::Rate;

/// How requests under one path prefix are handled.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    /// The time to connect to an instance (then 502 and, when safe, another instance).
    pub connect_timeout: Duration,
    /// The time an instance has to answer with a response head (then 504).
    pub timeout: Duration,
    pub balance: Balance,
    /// Requests per client (token subject, else IP address).
    pub per_client: Option<Rate>,
    /// Requests into the service, from all clients together.
    pub per_service: Option<Rate>,
    /// A valid token is needed (always so on the control plane's routes).
    pub require_token: bool,
    /// How the gateway speaks to the instances.
    pub protocol: UpstreamProtocol,
}

/// How the gateway speaks to a route's instances (`UPSTREAM_PROTOCOL`, or a routes file's
/// `upstream_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 on pooled keep-alive connections, one request on a connection at a time.
    Http1,
    /// HTTP/2 without TLS, by prior knowledge: the requests to an instance share one
    /// connection, as with Envoy's `http2_protocol_options` or Traefik's `h2c://`. The
    /// instance must speak it; upgrades (WebSockets) still go over HTTP/1.1.
    H2c,
}

impl FromStr for UpstreamProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http1" => Ok(Self::Http1),
            "h2c" => Ok(Self::H2c),
            _ => Err("expected http1 or h2c".to_owned()),
        }
    }
}

/// One entry of the routes file; what it leaves out comes from the environment's defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyEntry {
    prefix: String,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    balance: Option<String>,
    rate_limit: Option<RateLimitEntry>,
    require_token: Option<bool>,
    upstream_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitEntry {
    per_client: Option<String>,
    per_service: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    routes: Vec<PolicyEntry>,
}

/// The gateway's configuration, from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    /// `VAULT_URL`: where the vault's public keys and revocation list are read; also the
    /// vault's address when the registry knows no instance of it.
    pub vault_url: Option<String>,
    /// `MONITOR_URL`: the health monitor's address when the registry knows none.
    pub monitor_url: Option<String>,
    /// The policy of paths no `ROUTES_FILE` entry covers.
    pub defaults: RoutePolicy,
    /// `ROUTES_FILE`: policies per path prefix.
    pub policies: Vec<(String, RoutePolicy)>,
    pub breaker: BreakerConfig,
    /// `PANIC_THRESHOLD`: below this percentage of healthy instances, spread requests over
    /// the degraded instances too rather than overload the few healthy ones (Envoy's panic
    /// mode, short of sending to instances known to be offline).
    pub panic_threshold: u8,
    /// `RETRY_BUDGET`: retries allowed as a fraction of requests (0.2 = 20 % extra load).
    pub retry_budget: f64,
    /// `UPSTREAM_MAX_CONNECTIONS`: requests open to one instance at once (each holds a
    /// connection); more wait for a turn within their timeout.
    pub upstream_max_connections: usize,
    /// `UPSTREAM_IDLE_TIMEOUT`: a connection to an instance left unused this long is
    /// closed (nginx's `keepalive_timeout` in an upstream block). It must be shorter than
    /// the instances' own keep-alive timeout, or an instance may close a connection just as
    /// a request goes out on it, and the request fail: 4 s is below the 5 s that Apache
    /// httpd, uvicorn and recent gunicorn close idle connections after.
    pub upstream_idle_timeout: Duration,
    /// `ACCESS_LOG_SAMPLE`: the fraction of successful requests written to the access log
    /// (errors always are).
    pub access_log_sample: f64,
    pub server: ServerOptions,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env, crate::DEFAULT_PORT)?;
        let defaults = RoutePolicy {
            connect_timeout: env.duration_or("CONNECT_TIMEOUT", Duration::from_secs(2))?,
            timeout: env.duration_or("UPSTREAM_TIMEOUT", Duration::from_secs(30))?,
            balance: env.or("BALANCE", Balance::RoundRobin)?,
            per_client: env.optional("RATE_LIMIT_PER_CLIENT")?,
            per_service: env.optional("RATE_LIMIT_PER_SERVICE")?,
            require_token: false,
            protocol: env.or("UPSTREAM_PROTOCOL", UpstreamProtocol::Http1)?,
        };
        let upstream_idle_timeout =
            env.duration_or("UPSTREAM_IDLE_TIMEOUT", Duration::from_secs(4))?;
        for (var, value) in [
            ("CONNECT_TIMEOUT", defaults.connect_timeout),
            ("UPSTREAM_TIMEOUT", defaults.timeout),
            ("UPSTREAM_IDLE_TIMEOUT", upstream_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(var, "must be greater than 0"));
            }
        }
        let policies = match env.raw("ROUTES_FILE") {
            Some(path) => read_policies(Path::new(path.trim()), &defaults)
                .map_err(|problem| ConfigError::new("ROUTES_FILE", problem))?,
            None => Vec::new(),
        };
        let panic_threshold: u8 = env.or("PANIC_THRESHOLD", 50)?;
        if panic_threshold > 100 {
            return Err(ConfigError::new(
                "PANIC_THRESHOLD",
                "is a percentage, 0 to 100",
            ));
        }
        let retry_budget: f64 = env.or("RETRY_BUDGET", 0.2)?;
        if !(0.0..=1.0).contains(&retry_budget) {
            return Err(ConfigError::new("RETRY_BUDGET", "is a fraction, 0 to 1"));
        }
        let upstream_max_connections: usize = env.or("UPSTREAM_MAX_CONNECTIONS", 1024)?;
        if upstream_max_connections == 0 {
            return Err(ConfigError::new(
                "UPSTREAM_MAX_CONNECTIONS",
                "must be at least 1",
            ));
        }
        let access_log_sample: f64 = env.or("ACCESS_LOG_SAMPLE", 1.0)?;
        if !(0.0..=1.0).contains(&access_log_sample) {
            return Err(ConfigError::new(
                "ACCESS_LOG_SAMPLE",
                "is a fraction, 0 to 1",
            ));
        }
        let defaults_server = ServerOptions::default();
        let server = ServerOptions {
            drain: common.shutdown_timeout,
            max_connections: env.or("MAX_CONNECTIONS", defaults_server.max_connections)?,
            header_read_timeout: env
                .duration_or("HEADER_READ_TIMEOUT", defaults_server.header_read_timeout)?,
            max_header_bytes: env.or("MAX_HEADER_BYTES", defaults_server.max_header_bytes)?,
        };
        Ok(Self {
            vault_url: url(env, "VAULT_URL")?,
            monitor_url: url(env, "MONITOR_URL")?,
            defaults,
            policies,
            breaker: BreakerConfig::from_env(env)?,
            panic_threshold,
            retry_budget,
            upstream_max_connections,
            upstream_idle_timeout,
            access_log_sample,
            server,
            common,
        })
    }

    pub fn pool_settings(&self) -> crate::table::PoolSettings {
        crate::table::PoolSettings {
            breaker: self.breaker.clone(),
            retry_ratio: self.retry_budget,
            max_connections: self.upstream_max_connections,
        }
    }

    /// The policy for `path`: the longest matching prefix of the routes file, else the defaults.
    pub fn policy_for(&self, path: &str) -> (&str, &RoutePolicy) {
        self.policies
            .iter()
            .find(|(prefix, _)| crate::routing::is_under(path, prefix))
            .map_or(("/", &self.defaults), |(prefix, policy)| (prefix, policy))
    }
}

fn url(env: &Env, var: &str) -> Result<Option<String>, ConfigError> {
    let Some(raw) = env.raw(var) else {
        return Ok(None);
    };
    let raw = raw.trim().trim_end_matches('/');
    if !raw.starts_with("http://") || raw.len() <= "http://".len() {
        return Err(ConfigError::new(var, "expected an http:// URL"));
    }
    Ok(Some(raw.to_owned()))
}

/// The routes file's policies, longest prefix first.
fn read_policies(
    path: &Path,
    defaults: &RoutePolicy,
) -> Result<Vec<(String, RoutePolicy)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: RoutesFile = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a valid routes file: {e}", path.display()))?;
    let mut policies = Vec::with_capacity(file.routes.len());
    for entry in file.routes {
        let prefix = entry.prefix.trim_end_matches('/').to_owned();
        let prefix = if prefix.is_empty() {
            "/".to_owned()
        } else {
            prefix
        };
        if !prefix.starts_with('/') {
            return Err(format!("prefix {:?} must start with /", entry.prefix));
        }
        if prefix.contains(';') {
            // Paths are matched without their parameters: such a prefix matches nothing.
            return Err(format!(
                "prefix {:?} cannot hold a path parameter (;)",
                entry.prefix
            ));
        }
        // In the spelling request paths are matched in.
        let prefix = crate::routing::normalize(&prefix).into_owned();
        let field = |name: &str, e: String| format!("route {prefix}: {name}: {e}");
        let duration = |name: &str, value: Option<String>, default: Duration| {
            value.map_or(Ok(default), |v| {
                HumanDuration::from_str(&v)
                    .map(|d| d.0)
                    .map_err(|e| field(name, e))
            })
        };
        let rate = |name: &str, value: Option<String>, default: Option<Rate>| {
            value.map_or(Ok(default), |v| {
                Rate::from_str(&v).map(Some).map_err(|e| field(name, e))
            })
        };
        let limits = entry.rate_limit.unwrap_or(RateLimitEntry {
            per_client: None,
            per_service: None,
        });
        let policy = RoutePolicy {
            connect_timeout: duration(
                "connect_timeout",
                entry.connect_timeout,
                defaults.connect_timeout,
            )?,
            timeout: duration("timeout", entry.timeout, defaults.timeout)?,
            balance: entry.balance.map_or(Ok(defaults.balance), |b| {
                Balance::from_str(&b).map_err(|e| field("balance", e))
            })?,
            per_client: rate("per_client", limits.per_client, defaults.per_client)?,
            per_service: rate("per_service", limits.per_service, defaults.per_service)?,
            require_token: entry.require_token.unwrap_or(defaults.require_token),
            protocol: entry.upstream_protocol.map_or(Ok(defaults.protocol), |p| {
                UpstreamProtocol::from_str(&p).map_err(|e| field("upstream_protocol", e))
            })?,
        };
        if policies.iter().any(|(p, _)| *p == prefix) {
            return Err(format!("prefix {prefix} appears twice"));
        }
        policies.push((prefix, policy));
    }
    policies.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with_routes(json: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        std::fs::write(&path, json).unwrap();
        let path = path.to_str().unwrap().to_owned();
        Config::from_env(&Env::from_pairs([
            ("ROUTES_FILE", path.as_str()),
            ("RATE_LIMIT_PER_CLIENT", "100/s"),
        ]))
    }

    #[test]
    fn the_routes_file_overrides_defaults_and_the_longest_prefix_wins() {
        let config = env_with_routes(
            r#"{"routes": [
                {"prefix": "/payments", "require_token": true, "rate_limit": {"per_service": "10/m"}},
                {"prefix": "/payments/slow/", "timeout": "90s", "balance": "least_outstanding",
                 "upstream_protocol": "h2c"}
            ]}"#,
        )
        .unwrap();
        let (prefix, slow) = config.policy_for("/payments/slow/report");
        assert_eq!(prefix, "/payments/slow");
        assert_eq!(slow.timeout, Duration::from_secs(90));
        assert_eq!(slow.balance, Balance::LeastOutstanding);
        assert_eq!(slow.protocol, UpstreamProtocol::H2c);
        let (_, payments) = config.policy_for("/payments/charge");
        assert_eq!(payments.protocol, UpstreamProtocol::Http1);
        assert!(payments.require_token);
        assert_eq!(payments.per_service, Some("10/m".parse().unwrap()));
        assert_eq!(payments.per_client, Some("100/s".parse().unwrap()));
        let (prefix, other) = config.policy_for("/paymentsx");
        assert_eq!(prefix, "/");
        assert!(!other.require_token);
        // Prefixes are kept in the spelling request paths are matched in.
        let config =
            env_with_routes(r#"{"routes": [{"prefix": "/%7euser", "require_token": true}]}"#)
                .unwrap();
        assert_eq!(config.policy_for("/~user/x").0, "/~user");
    }

    #[test]
    fn upstream_protocol_sets_the_default() {
        let config = Config::from_env(&Env::from_pairs([("UPSTREAM_PROTOCOL", "h2c")])).unwrap();
        assert_eq!(config.defaults.protocol, UpstreamProtocol::H2c);
        let plain = Config::from_env(&Env::from_pairs([])).unwrap();
        assert_eq!(plain.defaults.protocol, UpstreamProtocol::Http1);
        let error = Config::from_env(&Env::from_pairs([("UPSTREAM_PROTOCOL", "h3")])).unwrap_err();
        assert_eq!(error.var, "UPSTREAM_PROTOCOL");
    }

    #[test]
    fn timeouts_must_be_greater_than_zero() {
        let plain = Config::from_env(&Env::from_pairs([])).unwrap();
        assert_eq!(plain.upstream_idle_timeout, Duration::from_secs(4));
        for var in [
            "CONNECT_TIMEOUT",
            "UPSTREAM_TIMEOUT",
            "UPSTREAM_IDLE_TIMEOUT",
        ] {
            let error = Config::from_env(&Env::from_pairs([(var, "0s")])).unwrap_err();
            assert_eq!(error.var, var);
        }
        let set = Config::from_env(&Env::from_pairs([("UPSTREAM_IDLE_TIMEOUT", "5s")])).unwrap();
        assert_eq!(set.upstream_idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_bad_routes_file_names_the_variable_and_the_field() {
        for (json, needle) in [
            (r#"{"routes": [{"prefix": "x"}]}"#, "must start with /"),
            (r#"{"routes": [{"prefix": "/a;v=1"}]}"#, "path parameter"),
            (
                r#"{"routes": [{"prefix": "/a", "timeout": "soon"}]}"#,
                "timeout",
            ),
            (
                r#"{"routes": [{"prefix": "/a", "rate_limit": {"per_client": "7"}}]}"#,
                "per_client",
            ),
            (
                r#"{"routes": [{"prefix": "/a", "upstream_protocol": "h3"}]}"#,
                "upstream_protocol",
            ),
            (
                r#"{"routes": [{"prefix": "/a", "speed": 1}]}"#,
                "unknown field",
            ),
            (
                r#"{"routes": [{"prefix": "/a"}, {"prefix": "/a/"}]}"#,
                "twice",
            ),
        ] {
            let error = env_with_routes(json).unwrap_err();
            assert_eq!(error.var, "ROUTES_FILE");
            assert!(error.problem.contains(needle), "{json}: {}", error.problem);
        }
    }
}
