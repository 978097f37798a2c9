//! Typed configuration from the environment, validated at start (12-factor).
//!
//! Each service builds its own config struct from an [`Env`]; the first bad or missing
//! variable becomes a [`ConfigError`], and [`or_exit`] turns it into one line on stderr
//! and exit code 2. Secrets come only through `*_FILE` variables.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use crate::db::DatabaseUrl;
use crate::secret::Secret;

/// The exit code of a process stopped by its configuration.
pub const EXIT_CONFIG: i32 = 2;

/// A variable that is missing or malformed, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    pub var: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(var: &str, problem: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Where variables are read from: the process environment, or a map in tests.
pub struct Env {
    vars: HashMap<String, String>,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may hold credentials (URLs with passwords): list names only.
        let mut names: Vec<_> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Env").field("names", &names).finish()
    }
}

impl Env {
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The raw value; an empty value counts as unset, as most shells and compose files mean it.
    pub fn raw(&self, var: &str) -> Option<&str> {
        self.vars
            .get(var)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    pub fn optional<T>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.raw(var)
            .map(|value| {
                value
                    .trim()
                    .parse()
                    .map_err(|e| ConfigError::new(var, format!("invalid value {value:?}: {e}")))
            })
            .transpose()
    }

    pub fn required<T>(&self, var: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.optional(var)?
            .ok_or_else(|| ConfigError::new(var, "is required but not set"))
    }

    pub fn or<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        Ok(self.optional(var)?.unwrap_or(default))
    }

    pub fn duration_or(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(self
            .optional::<HumanDuration>(var)?
            .map_or(default, |d| d.0))
    }

    /// A secret read from the file named by `var` (which must end in `_FILE`).
    /// Trailing newlines are dropped; an empty or unreadable file is an error.
    pub fn secret_file(&self, var: &str) -> Result<Option<Secret<String>>, ConfigError> {
        debug_assert!(
            var.ends_with("_FILE"),
            "secrets come only through *_FILE variables"
        );
        let Some(path) = self.raw(var) else {
            return Ok(None);
        };
        read_secret_file(Path::new(path.trim()))
            .map(Some)
            .map_err(|problem| ConfigError::new(var, problem))
    }

    /// A value that may carry a credential (a URL with a password): from `var`, or from the
    /// file named by `{var}_FILE`. Setting both is an error, so that nobody wonders which wins.
    pub fn value_or_file(&self, var: &str) -> Result<Option<Secret<String>>, ConfigError> {
        let file_var = format!("{var}_FILE");
        match (self.raw(var), self.secret_file(&file_var)?) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                var,
                format!("set either {var} or {file_var}, not both"),
            )),
            (Some(value), None) => Ok(Some(Secret::new(value.trim().to_owned()))),
            (None, from_file) => Ok(from_file),
        }
    }
}

/// `span` (a configured duration) before `now`; `None` when that is before the calendar's
/// start (`now - span` would panic there): a window that long covers everything.
pub fn before(
    now: chrono::DateTime<chrono::Utc>,
    span: Duration,
) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::Duration::from_std(span)
        .ok()
        .and_then(|span| now.checked_sub_signed(span))
}

/// A secret from a file: its text without trailing newlines; empty or unreadable is an error.
pub fn read_secret_file(path: &Path) -> Result<Secret<String>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    let value = Secret::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if value.expose().is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(value)
}

/// Prints a configuration error as one line and exits with [`EXIT_CONFIG`].
pub fn or_exit<T>(service: &str, result: Result<T, ConfigError>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => {
            eprintln!("{service}: configuration error: {error}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// A duration written as `250ms`, `30s`, `5m`, `1h` or `2d`; a bare number is seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let amount: u64 = digits
            .parse()
            .map_err(|_| "expected a number with a unit, like 30s, 250ms, 5m or 1h".to_owned())?;
        let millis_per_unit = match unit.trim() {
            "ms" => 1,
            "" | "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("unknown unit {other:?} (use ms, s, m, h or d)")),
        };
        amount
            .checked_mul(millis_per_unit)
            .map(|ms| Self(Duration::from_millis(ms)))
            .ok_or_else(|| "duration too large".to_owned())
    }
}

/// `LOG_FORMAT`: JSON lines for machines, or pretty lines for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err("expected json or pretty".to_owned()),
        }
    }
}

/// A `redis://` or `rediss://` URL. It may hold a password, so it is kept as a secret.
#[derive(Debug, Clone)]
pub struct RedisUrl(Secret<String>);

impl RedisUrl {
    pub fn parse(url: Secret<String>) -> Result<Self, String> {
        let text = url.expose();
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            Ok(Self(url))
        } else {
            Err("expected a redis:// or rediss:// URL".to_owned())
        }
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

/// What every service reads, whatever else it needs.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// `LISTEN_ADDR`: where the HTTP server binds.
    pub listen_addr: SocketAddr,
    /// `REDIS_URL` (or `REDIS_URL_FILE`): turns on pub/sub; without it events stay local.
    pub redis_url: Option<RedisUrl>,
    /// `LOG_FORMAT`: `json` (the default) or `pretty`.
    pub log_format: LogFormat,
    /// `RESYNC_INTERVAL`: how often consumers reload full state (30 s; 5 s without Redis).
    pub resync_interval: Duration,
    /// `MAX_BODY_BYTES`: the largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// `SHUTDOWN_TIMEOUT`: how long in-flight requests may take after SIGTERM.
    pub shutdown_timeout: Duration,
    /// `HTTP_WORKERS`: server worker threads.
    pub http_workers: usize,
    /// `REGISTRY_URL`: where this service registers itself (not at all when unset).
    pub registry_url: Option<String>,
    /// `TOKEN_FILE`: this service's own token, from `credential-vault init`.
    pub token: Option<Secret<String>>,
    /// `ADVERTISE_ADDRESS`: the address others reach this service at (default: the
    /// listen address, or 127.0.0.1 when that is a wildcard).
    pub advertise_address: Option<String>,
}

impl CommonConfig {
    pub fn from_env(env: &Env, default_port: u16) -> Result<Self, ConfigError> {
        let redis_url = env
            .value_or_file("REDIS_URL")?
            .map(RedisUrl::parse)
            .transpose()
            .map_err(|problem| ConfigError::new("REDIS_URL", problem))?;
        let default_resync = if redis_url.is_some() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(5)
        };
        let resync_interval = env.duration_or("RESYNC_INTERVAL", default_resync)?;
        if resync_interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "RESYNC_INTERVAL",
                "must be at least 100ms",
            ));
        }
        let http_workers = env.or("HTTP_WORKERS", 2usize)?;
        if !(1..=256).contains(&http_workers) {
            return Err(ConfigError::new(
                "HTTP_WORKERS",
                "must be between 1 and 256",
            ));
        }
        let registry_url: Option<String> = env.optional("REGISTRY_URL")?;
        if registry_url
            .as_ref()
            .is_some_and(|url| !url.starts_with("http://"))
        {
            return Err(ConfigError::new("REGISTRY_URL", "expected an http:// URL"));
        }
        let max_body_bytes = env.or("MAX_BODY_BYTES", 1024 * 1024usize)?;
        if max_body_bytes == 0 {
            return Err(ConfigError::new("MAX_BODY_BYTES", "must be greater than 0"));
        }
        Ok(Self {
            listen_addr: env.or(
                "LISTEN_ADDR",
                SocketAddr::from(([127, 0, 0, 1], default_port)),
            )?,
            redis_url,
            log_format: env.or("LOG_FORMAT", LogFormat::Json)?,
            resync_interval,
            max_body_bytes,
            shutdown_timeout: env.duration_or("SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
            http_workers,
            registry_url,
            token: env.secret_file("TOKEN_FILE")?,
            advertise_address: env.optional("ADVERTISE_ADDRESS")?,
        })
    }
}

/// Where a service keeps its state.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_URL` (or `DATABASE_URL_FILE`), required: `postgres://…` or `sqlite://…`.
    pub url: DatabaseUrl,
    /// `DB_POOL_SIZE`: connections in the pool (SQLite uses at most 4).
    pub pool_size: u32,
}

impl DatabaseConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let url = env
            .value_or_file("DATABASE_URL")?
            .ok_or_else(|| ConfigError::new("DATABASE_URL", "is required but not set"))?;
        let url =
            DatabaseUrl::parse(url).map_err(|problem| ConfigError::new("DATABASE_URL", problem))?;
        let pool_size = env.or("DB_POOL_SIZE", 8u32)?;
        if !(1..=200).contains(&pool_size) {
            return Err(ConfigError::new(
                "DB_POOL_SIZE",
                "must be between 1 and 200",
            ));
        }
        Ok(Self { url, pool_size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_before_the_calendar_starts_is_none() {
        let now = chrono::Utc::now();
        assert_eq!(
            before(now, Duration::from_secs(60)),
            Some(now - chrono::Duration::seconds(60))
        );
        // HISTORY_RETENTION=99999999d: `now - span` would panic.
        let forever = Duration::from_secs(99_999_999 * 86_400);
        assert_eq!(before(now, forever), None);
        assert_eq!(before(now, Duration::MAX), None);
    }

    #[test]
    fn durations_parse_with_units() {
        let parse = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse("").is_err());
        assert!(parse("s").is_err());
        assert!(parse("10 parsecs").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("99999999999999999999d").is_err());
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = CommonConfig::from_env(&Env::from_pairs([]), 8081).unwrap();
        assert_eq!(config.listen_addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(config.resync_interval, Duration::from_secs(5));
        assert!(config.redis_url.is_none());
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn a_malformed_value_names_its_variable() {
        let env = Env::from_pairs([("LISTEN_ADDR", "localhost-ish")]);
        let error = CommonConfig::from_env(&env, 8081).unwrap_err();
        assert_eq!(error.var, "LISTEN_ADDR");
        assert!(error.problem.contains("localhost-ish"), "{error}");

        let env = Env::from_pairs([("REDIS_URL", "http://nope")]);
        assert_eq!(
            CommonConfig::from_env(&env, 1).unwrap_err().var,
            "REDIS_URL"
        );
    }

    #[test]
    fn a_missing_database_url_is_named() {
        let error = DatabaseConfig::from_env(&Env::from_pairs([])).unwrap_err();
        assert_eq!(error.var, "DATABASE_URL");
        assert!(error.problem.contains("required"));
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redis-url");
        std::fs::write(&path, "redis://:s3cr3t-pass@127.0.0.1:6379\n").unwrap();
        let path = path.to_str().unwrap();
        let env = Env::from_pairs([("REDIS_URL_FILE", path)]);
        let config = CommonConfig::from_env(&env, 1).unwrap();
        let url = config.redis_url.as_ref().unwrap();
        assert_eq!(url.expose(), "redis://:s3cr3t-pass@127.0.0.1:6379");
        assert!(!format!("{config:?}").contains("s3cr3t"));

        let both = Env::from_pairs([("REDIS_URL", "redis://x"), ("REDIS_URL_FILE", path)]);
        assert_eq!(
            CommonConfig::from_env(&both, 1).unwrap_err().var,
            "REDIS_URL"
        );

        let missing = Env::from_pairs([("TOKEN_FILE", "/nonexistent/token")]);
        let error = missing.secret_file("TOKEN_FILE").unwrap_err();
        assert_eq!(error.var, "TOKEN_FILE");
    }
}
