//! Rate limits by GCRA (the generic cell rate algorithm): one timestamp per key, exact
//! under bursts, no background refill. With `REDIS_URL` the decision is one atomic script
//! in Redis, so that the limit holds across gateway replicas; without it, per process.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::config::HumanDuration;

/// `N/period`: at most N requests per period, all of them at once if they come at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u32,
    pub period: Duration,
}

impl FromStr for Rate {
    type Err = String;

    /// `100/s`, `20/m`, `1000/h`, `5/10s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected N/period, like 100/s, 20/m or 5/10s";
        let (limit, period) = s.trim().split_once('/').ok_or(usage)?;
        let limit: u32 = limit.trim().parse().map_err(|_| usage.to_owned())?;
        let period = period.trim();
        if period.is_empty() {
            return Err(usage.to_owned());
        }
        let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
            period.to_owned()
        } else {
            format!("1{period}")
        };
        let period = HumanDuration::from_str(&period)?.0;
        if limit == 0 || period.is_zero() {
            return Err("both the count and the period must be above 0".to_owned());
        }
        if period > Duration::from_secs(86_400) {
            return Err("the period is at most a day".to_owned());
        }
        Ok(Self { limit, period })
    }
}

impl Rate {
    /// The time one request "costs", in microseconds.
    pub fn interval_us(&self) -> u64 {
        (micros(self.period) / u64::from(self.limit)).max(1)
    }

    pub fn period_us(&self) -> u64 {
        micros(self.period)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A decision and what the `RateLimit-*` headers say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the full limit is available again.
    pub reset: Duration,
    /// Until the next request would be allowed (zero when this one was).
    pub retry_after: Duration,
}

/// The GCRA step: from the stored theoretical arrival time (`tat`, µs) and `now` (µs), the
/// decision and the new `tat` to store when the request is allowed. Redis runs the same
/// arithmetic in [`events::GCRA_SCRIPT`].
pub fn gcra(tat: Option<u64>, now: u64, rate: Rate) -> (Decision, Option<u64>) {
    let interval = rate.interval_us();
    let period = rate.period_us();
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat.saturating_add(interval);
    let allow_at = new_tat.saturating_sub(period);
    if now < allow_at {
        let decision = Decision {
            allowed: false,
            limit: rate.limit,
            remaining: 0,
            reset: Duration::from_micros(tat - now),
            retry_after: Duration::from_micros(allow_at - now),
        };
        return (decision, None);
    }
    (
        decision_from_shared(true, 0, new_tat - now, rate),
        Some(new_tat),
    )
}

/// The decision for an answer in the shape the Redis script gives: allowed, µs until
/// allowed, µs until the bucket is full again.
pub fn decision_from_shared(
    allowed: bool,
    retry_after_us: u64,
    full_in_us: u64,
    rate: Rate,
) -> Decision {
    let used = full_in_us.div_ceil(rate.interval_us());
    Decision {
        allowed,
        limit: rate.limit,
        remaining: u32::try_from(u64::from(rate.limit).saturating_sub(used)).unwrap_or(0),
        reset: Duration::from_micros(full_in_us),
        retry_after: Duration::from_micros(retry_after_us),
    }
}

/// Keys kept in the process before the expired ones are swept.
const SWEEP_AT: usize = 50_000;

/// The limiter: shared through Redis when there is one, else per process.
#[derive(Debug)]
pub struct Limiter {
    shared: Option<events::SharedLimiter>,
    local: Mutex<HashMap<String, u64>>,
    origin: Instant,
}

/// Where a decision was made, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Local,
    /// Redis was configured but did not answer: this process decided alone.
    Fallback,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Local => "local",
            Self::Fallback => "fallback",
        }
    }
}

impl Limiter {
    pub fn new(shared: Option<events::SharedLimiter>) -> Self {
        Self {
            shared,
            local: Mutex::new(HashMap::new()),
            origin: Instant::now(),
        }
    }

    /// One request against all of `limits` (key, rate) at once, in one step (one Redis
    /// script when shared): it counts against them only if each allows it, so that a
    /// request the service's limit refuses spends nothing of its client's. The
    /// decisions come in the order of `limits`.
    pub async fn check(&self, limits: &[(String, Rate)]) -> (Vec<Decision>, Backend) {
        if let Some(shared) = &self.shared {
            let asked: Vec<(&str, u64, u64)> = limits
                .iter()
                .map(|(key, rate)| (key.as_str(), rate.interval_us(), rate.period_us()))
                .collect();
            match shared.gcra_all(&asked).await {
                Ok(answers) => {
                    let decisions = answers
                        .iter()
                        .zip(limits)
                        .map(|(answer, (_, rate))| {
                            decision_from_shared(
                                answer.allowed,
                                answer.retry_after_us,
                                answer.full_in_us,
                                *rate,
                            )
                        })
                        .collect();
                    return (decisions, Backend::Redis);
                }
                Err(error) => {
                    // Failing open to the local limit keeps traffic flowing while Redis is
                    // away; each replica then enforces the limit on its own.
                    tracing::warn!(%error, "shared rate limit unavailable; deciding locally");
                    return (self.check_local(limits), Backend::Fallback);
                }
            }
        }
        (self.check_local(limits), Backend::Local)
    }

    fn check_local(&self, limits: &[(String, Rate)]) -> Vec<Decision> {
        let now = micros(self.origin.elapsed());
        let mut map = match self.local.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= SWEEP_AT {
            map.retain(|_, tat| *tat > now);
        }
        let steps: Vec<(Decision, Option<u64>)> = limits
            .iter()
            .map(|(key, rate)| gcra(map.get(key).copied(), now, *rate))
            .collect();
        if steps.iter().all(|(decision, _)| decision.allowed) {
            for ((key, _), (_, new_tat)) in limits.iter().zip(&steps) {
                if let Some(tat) = new_tat {
                    map.insert(key.clone(), *tat);
                }
            }
        }
        steps.into_iter().map(|(decision, _)| decision).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_or_without_a_count_of_units() {
        assert_eq!(
            "100/s".parse::<Rate>().unwrap(),
            Rate {
                limit: 100,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(
            "5/10s".parse::<Rate>().unwrap().period,
            Duration::from_secs(10)
        );
        assert_eq!(
            "20/m".parse::<Rate>().unwrap().period,
            Duration::from_secs(60)
        );
        for bad in ["", "10", "0/s", "x/s", "10/", "10/2d", "10/fortnight"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_burst_gets_exactly_the_limit_then_one_per_interval() {
        let rate: Rate = "10/s".parse().unwrap();
        let mut tat = None;
        let now = 1_000_000;
        let mut allowed = 0;
        for _ in 0..25 {
            let (decision, new_tat) = gcra(tat, now, rate);
            if decision.allowed {
                allowed += 1;
                assert_eq!(decision.remaining, 10 - allowed);
                tat = new_tat;
            } else {
                assert_eq!(decision.retry_after, Duration::from_millis(100));
                assert_eq!(decision.reset, Duration::from_secs(1));
            }
        }
        assert_eq!(allowed, 10);
        let (later, _) = gcra(tat, now + 100_000, rate);
        assert!(later.allowed, "one interval later, one more fits");
        let (full, _) = gcra(tat, now + 5_000_000, rate);
        assert_eq!(
            full.remaining, 9,
            "after a long pause the whole burst is back"
        );
    }

    #[test]
    fn the_local_limiter_keeps_keys_apart() {
        let limiter = Limiter::new(None);
        let rate: Rate = "2/m".parse().unwrap();
        let one = |key: &str| limiter.check_local(&[(key.to_owned(), rate)])[0].allowed;
        let a: Vec<bool> = (0..3).map(|_| one("a")).collect();
        assert_eq!(a, [true, true, false]);
        assert!(one("b"));
    }

    #[test]
    fn a_request_one_local_limit_refuses_spends_nothing_of_the_others() {
        let limiter = Limiter::new(None);
        let rate: Rate = "2/m".parse().unwrap();
        let both = [("a".to_owned(), rate), ("b".to_owned(), rate)];
        let b = [("b".to_owned(), rate)];
        assert!(limiter.check_local(&b)[0].allowed);
        assert!(limiter.check_local(&b)[0].allowed);
        for _ in 0..3 {
            let decisions = limiter.check_local(&both);
            assert!(decisions[0].allowed && !decisions[1].allowed);
        }
        let a = [("a".to_owned(), rate)];
        assert_eq!(limiter.check_local(&a)[0].remaining, 1, "a was not charged");
    }
}
