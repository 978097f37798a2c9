//! Rate-limit state shared by gateway replicas: one GCRA step per decision, as one atomic
//! Lua script, timed by Redis' own clock so that replicas' clocks need not agree.

use common::config::RedisUrl;
use redis::aio::ConnectionManager;

use crate::{EventsError, REDIS_TIMEOUT, lazy_connection};

/// KEYS[1..n]: the limits' keys. ARGV[2i-1], ARGV[2i]: limit i's emission interval and
/// period (µs). A request is allowed only if every limit allows it, and only then does it
/// count against each: a request one limit refuses spends nothing of the others.
/// Returns for each limit {allowed by it (0|1), µs until it allows, µs until it is full
/// again}. The gateway's `ratelimit::gcra` is the same arithmetic for one process.
pub const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out, tats, all = {}, {}, true
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if now < allow_at then
    all = false
    out[#out + 1] = 0; out[#out + 1] = allow_at - now; out[#out + 1] = tat - now
  else
    out[#out + 1] = 1; out[#out + 1] = 0; out[#out + 1] = new_tat - now
  end
  tats[i] = {tat, new_tat}
end
for i = 1, #KEYS do
  if all then
    local new_tat = tats[i][2]
    redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
  else
    out[3 * i] = tats[i][1] - now
  end
end
return out
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

    /// One request against one limit.
    pub async fn gcra(
        &self,
        key: &str,
        interval_us: u64,
        period_us: u64,
    ) -> Result<GcraAnswer, EventsError> {
        let answers = self.gcra_all(&[(key, interval_us, period_us)]).await?;
        answers
            .first()
            .copied()
            .ok_or_else(|| EventsError::Script("no answer for the limit".into()))
    }

    /// One request against all of `limits` (key, interval µs, period µs) at once: it
    /// counts against them only if each allows it. The answers come in their order.
    pub async fn gcra_all(
        &self,
        limits: &[(&str, u64, u64)],
    ) -> Result<Vec<GcraAnswer>, EventsError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("EVAL");
        command.arg(GCRA_SCRIPT).arg(limits.len());
        for (key, _, _) in limits {
            command.arg(*key);
        }
        for (_, interval_us, period_us) in limits {
            command.arg(*interval_us).arg(*period_us);
        }
        let call = command.query_async::<Vec<i64>>(&mut connection);
        let answer = tokio::time::timeout(REDIS_TIMEOUT, call)
            .await
            .map_err(|_| EventsError::Script(format!("no answer within {REDIS_TIMEOUT:?}")))?
            .map_err(|e| EventsError::Script(e.to_string()))?;
        if answer.len() != 3 * limits.len() {
            return Err(EventsError::Script(format!(
                "{} numbers for {} limits",
                answer.len(),
                limits.len()
            )));
        }
        Ok(answer
            .chunks_exact(3)
            .map(|triple| GcraAnswer {
                allowed: triple[0] == 1,
                retry_after_us: u64::try_from(triple[1]).unwrap_or(0),
                full_in_us: u64::try_from(triple[2]).unwrap_or(0),
            })
            .collect())
    }
}
