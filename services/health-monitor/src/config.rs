//! The monitor's configuration: check timing, thresholds, alert rules and webhooks.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use common::config::{CommonConfig, ConfigError, DatabaseConfig, Env, HumanDuration};
use serde::Deserialize;

use crate::tracker::Thresholds;

/// The format a webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// One JSON object per notification.
    Generic,
    /// Alertmanager's `POST /api/v2/alerts` body: a list of alerts.
    Alertmanager,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub format: WebhookFormat,
}

/// The alert rules' thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// How long a warning lasts before it becomes critical.
    pub escalate_after: Duration,
    /// Above this fraction of a service's instances degraded (or worse), alert.
    pub degraded_ratio: f64,
    /// More than this many transitions within `flap_window`: flapping.
    pub flap_transitions: usize,
    pub flap_window: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            escalate_after: Duration::from_secs(300),
            degraded_ratio: 0.5,
            flap_transitions: 5,
            flap_window: Duration::from_secs(600),
        }
    }
}

/// `ALERT_RULES_FILE`: what it leaves out keeps its default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    escalate_after: Option<String>,
    degraded_ratio: Option<f64>,
    flap_transitions: Option<usize>,
    flap_window: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub database: DatabaseConfig,
    /// `VAULT_URL`: the vault's keys, to check callers' tokens.
    pub vault_url: String,
    /// `CHECK_INTERVAL`: how often each instance is checked (jittered over the interval).
    pub interval: Duration,
    /// `FAST_INTERVAL`: how often while an instance's state is settling.
    pub fast_interval: Duration,
    /// `CHECK_TIMEOUT`
    pub timeout: Duration,
    /// `SLOW_THRESHOLD`: a passing check slower than this is a warning.
    pub slow: Duration,
    /// `CHECK_CONCURRENCY`: checks under way at once.
    pub concurrency: usize,
    pub thresholds: Thresholds,
    pub rules: Rules,
    /// `ALERT_WEBHOOKS`: comma-separated URLs, `alertmanager=` before one that speaks
    /// Alertmanager's API.
    pub webhooks: Vec<Webhook>,
    /// `ALERT_GROUP_WAIT`: how long a new alert waits before it is sent, so that the
    /// alert of a dependency that is down can claim it first.
    pub group_wait: Duration,
    /// `DOCKER_HOST` (`unix:///path/to/docker.sock`): turns on container restarts.
    pub docker_socket: Option<std::path::PathBuf>,
    /// `RESTART_BUDGET` restarts at most within `RESTART_BUDGET_WINDOW`, fleet-wide.
    pub restart_budget: usize,
    pub restart_budget_window: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env, crate::DEFAULT_PORT)?;
        let interval = env.duration_or("CHECK_INTERVAL", Duration::from_secs(30))?;
        let timeout = env.duration_or("CHECK_TIMEOUT", Duration::from_secs(5))?;
        if interval < Duration::from_millis(100) {
            return Err(ConfigError::new("CHECK_INTERVAL", "must be at least 100ms"));
        }
        if timeout.is_zero() || timeout > interval {
            return Err(ConfigError::new(
                "CHECK_TIMEOUT",
                "must be above 0 and at most CHECK_INTERVAL",
            ));
        }
        let thresholds = Thresholds {
            failures_to_offline: env.or("FAILURES_TO_OFFLINE", 3)?,
            passes_to_healthy: env.or("PASSES_TO_HEALTHY", 2)?,
        };
        if thresholds.failures_to_offline == 0 || thresholds.passes_to_healthy == 0 {
            return Err(ConfigError::new(
                "FAILURES_TO_OFFLINE",
                "FAILURES_TO_OFFLINE and PASSES_TO_HEALTHY must be at least 1",
            ));
        }
        let concurrency: usize = env.or("CHECK_CONCURRENCY", 256)?;
        if concurrency == 0 {
            return Err(ConfigError::new("CHECK_CONCURRENCY", "must be at least 1"));
        }
        let rules = match env.raw("ALERT_RULES_FILE") {
            Some(path) => read_rules(Path::new(path.trim()))
                .map_err(|problem| ConfigError::new("ALERT_RULES_FILE", problem))?,
            None => Rules::default(),
        };
        Ok(Self {
            database: DatabaseConfig::from_env(env)?,
            vault_url: env
                .or("VAULT_URL", "http://127.0.0.1:8081".to_owned())?
                .trim_end_matches('/')
                .to_owned(),
            fast_interval: env.duration_or(
                "FAST_INTERVAL",
                (interval / 10).max(Duration::from_millis(100)),
            )?,
            slow: env.duration_or("SLOW_THRESHOLD", Duration::from_secs(1))?,
            concurrency,
            thresholds,
            rules,
            webhooks: webhooks(env.raw("ALERT_WEBHOOKS").unwrap_or(""))
                .map_err(|problem| ConfigError::new("ALERT_WEBHOOKS", problem))?,
            docker_socket: match env.raw("DOCKER_HOST") {
                None => None,
                Some(raw) => Some(
                    raw.trim()
                        .strip_prefix("unix://")
                        .filter(|path| path.starts_with('/'))
                        .map(std::path::PathBuf::from)
                        .ok_or_else(|| {
                            ConfigError::new(
                                "DOCKER_HOST",
                                "expected unix:///path/to/the/engine.sock",
                            )
                        })?,
                ),
            },
            group_wait: env.duration_or("ALERT_GROUP_WAIT", Duration::from_secs(10))?,
            restart_budget: env.or("RESTART_BUDGET", 5)?,
            restart_budget_window: env
                .duration_or("RESTART_BUDGET_WINDOW", Duration::from_secs(3600))?,
            interval,
            timeout,
            common,
        })
    }
}

fn read_rules(path: &Path) -> Result<Rules, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: RulesFile = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a valid rules file: {e}", path.display()))?;
    let d = Rules::default();
    let duration = |name: &str, value: Option<String>, default: Duration| {
        value.map_or(Ok(default), |v| {
            HumanDuration::from_str(&v)
                .map(|d| d.0)
                .map_err(|e| format!("{name}: {e}"))
        })
    };
    let rules = Rules {
        escalate_after: duration("escalate_after", file.escalate_after, d.escalate_after)?,
        degraded_ratio: file.degraded_ratio.unwrap_or(d.degraded_ratio),
        flap_transitions: file.flap_transitions.unwrap_or(d.flap_transitions),
        flap_window: duration("flap_window", file.flap_window, d.flap_window)?,
    };
    if !(rules.degraded_ratio > 0.0 && rules.degraded_ratio <= 1.0) {
        return Err("degraded_ratio: a fraction above 0, at most 1".to_owned());
    }
    if rules.flap_transitions == 0 {
        return Err("flap_transitions: at least 1".to_owned());
    }
    Ok(rules)
}

/// Parses `ALERT_WEBHOOKS`; each must be an `http://host[:port]/path` URL whose host resolves.
fn webhooks(raw: &str) -> Result<Vec<Webhook>, String> {
    let mut hooks = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (format, url) = match entry.split_once('=') {
            Some(("alertmanager", url)) => (WebhookFormat::Alertmanager, url.trim()),
            Some((other, _)) if !other.contains('/') => {
                return Err(format!(
                    "unknown webhook format {other:?} (only alertmanager=)"
                ));
            }
            _ => (WebhookFormat::Generic, entry),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{url:?}: only http:// webhooks are supported"));
        }
        let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let resolves = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map(|mut addrs| addrs.next().is_some())
            .unwrap_or(false);
        if !resolves {
            return Err(format!("the host of {url:?} does not resolve"));
        }
        hooks.push(Webhook {
            url: url.to_owned(),
            format,
        });
    }
    Ok(hooks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_parse_and_bad_ones_are_named() {
        let hooks =
            webhooks("http://127.0.0.1:9/a, alertmanager=http://localhost:9093/api/v2/alerts")
                .unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[1].format, WebhookFormat::Alertmanager);
        for bad in [
            "https://127.0.0.1/x",
            "pager=http://127.0.0.1/x",
            "not a url",
            "http://no-such-host.invalid/hook",
        ] {
            assert!(webhooks(bad).is_err(), "{bad}");
        }
    }
}
