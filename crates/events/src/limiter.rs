//! Rate-limit state shared by gateway replicas: one GCRA step per decision, as one atomic
//! Lua script, timed by Redis' own clock so that replicas' clocks need not agree.

use common::config::RedisUrl;
use redis::aio::ConnectionManager;

use crate::{EventsError, REDIS_TIMEOUT, lazy_connection};

/// KEYS[1]: the limit's key. ARGV[1]: the emission interval (µs), ARGV[2]: the period (µs).
/// Returns {allowed (0|1), µs until allowed, µs until the bucket is full again}.
/// The gateway's `ratelimit::gcra` is the same arithmetic for one process.
pub const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then
  return {0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, 0, new_tat - now}
";

/// One decision from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraAnswer {
    pub allowed: bool,
    pub retry_after_us: u64,
    pub full_in_us: u64,
}

/// Runs [`GCRA_SCRIPT`] against Redis; cheap to clone.
#[derive(Clone)]
pub struct SharedLimiter {
    connection: ConnectionManager,
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimiter").finish_non_exhaustive()
    }
}

impl SharedLimiter {
    /// Connects lazily, like the publisher.
    pub fn new(url: &RedisUrl) -> Result<Self, EventsError> {
        Ok(Self {
            connection: lazy_connection(url)?,
        })
    }

    pub async fn gcra(
        &self,
        key: &str,
        interval_us: u64,
        period_us: u64,
    ) -> Result<GcraAnswer, EventsError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("EVAL");
        command
            .arg(GCRA_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(interval_us)
            .arg(period_us);
        let call = command.query_async::<(i64, i64, i64)>(&mut connection);
        let (allowed, retry_after, full_in) = tokio::time::timeout(REDIS_TIMEOUT, call)
            .await
            .map_err(|_| EventsError::Script(format!("no answer within {REDIS_TIMEOUT:?}")))?
            .map_err(|e| EventsError::Script(e.to_string()))?;
        Ok(GcraAnswer {
            allowed: allowed == 1,
            retry_after_us: u64::try_from(retry_after).unwrap_or(0),
            full_in_us: u64::try_from(full_in).unwrap_or(0),
        })
    }
}
