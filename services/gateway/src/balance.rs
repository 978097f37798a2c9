//! Choosing an instance: which ones may take the request (health, draining, circuit, panic
//! mode), then round robin or least outstanding requests (power of two choices), by weight.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::api::HealthState;

use crate::breaker::Admission;
use crate::table::{Endpoint, Pool};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastOutstanding,
}

impl FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" => Ok(Self::RoundRobin),
            "least_outstanding" => Ok(Self::LeastOutstanding),
            _ => Err("expected round_robin or least_outstanding".to_owned()),
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RoundRobin => "round_robin",
            Self::LeastOutstanding => "least_outstanding",
        })
    }
}

/// What a pick may use.
#[derive(Debug, Clone, Copy)]
pub struct Constraints<'a> {
    pub balance: Balance,
    /// Below this percentage of healthy instances, any instance may take traffic.
    pub panic_threshold: u8,
    /// Whether the request may be a half-open probe (it can be retried if the probe fails).
    pub allow_probe: bool,
    /// Endpoint indices already tried for this request.
    pub exclude: &'a [usize],
}

/// The instances a request may go to, in tiers: healthy ones; else degraded ones; in
/// panic mode (too few healthy) healthy and degraded ones together, rather than overload
/// the few. Offline and draining instances take nothing new.
fn tier(pool: &Pool, panic_threshold: u8) -> impl Fn(&Endpoint) -> bool + use<> {
    let (mut total, mut healthy, mut degraded) = (0u32, 0u32, 0u32);
    for endpoint in pool.endpoints.iter().filter(|e| !e.draining) {
        total += 1;
        match endpoint.health {
            HealthState::Healthy => healthy += 1,
            HealthState::Degraded => degraded += 1,
            HealthState::Offline => {}
        }
    }
    let panic = total > 0 && healthy * 100 < u32::from(panic_threshold) * total;
    let accept_degraded = healthy == 0 && degraded > 0;
    move |e: &Endpoint| {
        !e.draining
            && match e.health {
                HealthState::Healthy => true,
                HealthState::Degraded => panic || accept_degraded,
                HealthState::Offline => false,
            }
    }
}

fn usable(endpoint: &Endpoint, now: Instant, allow_probe: bool) -> bool {
    match endpoint.live.breaker().available(now) {
        Some(Admission::Normal) => true,
        Some(Admission::Probe) => allow_probe,
        None => false,
    }
}

/// The index of the endpoint to try, or `None` when no instance may take the request.
pub fn pick(pool: &Pool, constraints: Constraints<'_>, now: Instant) -> Option<usize> {
    let in_tier = tier(pool, constraints.panic_threshold);
    let candidate = |i: usize| {
        let endpoint = &pool.endpoints[i];
        !constraints.exclude.contains(&i)
            && in_tier(endpoint)
            && usable(endpoint, now, constraints.allow_probe)
    };
    match constraints.balance {
        Balance::RoundRobin => {
            let len = pool.wheel.len();
            if len == 0 {
                return None;
            }
            // A slot whose instance may not take the request is used up rather than
            // passed on to the next one, so that the others keep their weights' shares.
            (0..len)
                .map(|_| pool.wheel[pool.cursor.fetch_add(1, Ordering::Relaxed) % len])
                .find(|&i| candidate(i))
        }
        Balance::LeastOutstanding => {
            let candidates: Vec<usize> = (0..pool.endpoints.len())
                .filter(|&i| candidate(i))
                .collect();
            match candidates.len() {
                0 => None,
                1 => Some(candidates[0]),
                n => {
                    let a = candidates[fastrand::usize(..n)];
                    let mut b = candidates[fastrand::usize(..n - 1)];
                    if b == a {
                        b = candidates[n - 1];
                    }
                    Some(if load(&pool.endpoints[a]) <= load(&pool.endpoints[b]) {
                        a
                    } else {
                        b
                    })
                }
            }
        }
    }
}

/// Requests in flight per unit of weight.
fn load(endpoint: &Endpoint) -> f64 {
    f64::from(endpoint.live.in_flight.load(Ordering::Relaxed)) / f64::from(endpoint.weight.max(1))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::breaker::Outcome;
    use crate::table::Table;

    fn pool(states: &[(HealthState, u32)]) -> std::sync::Arc<Pool> {
        let now = chrono::Utc::now();
        let instances: BTreeMap<String, common::api::Instance> = states
            .iter()
            .enumerate()
            .map(|(i, (health, weight))| {
                let id = format!("i-{i}");
                (
                    id.clone(),
                    common::api::Instance {
                        instance_id: id,
                        service: common::api::ServiceName::parse("shop").unwrap(),
                        version: "1".into(),
                        address: "127.0.0.1".into(),
                        port: 9000 + u16::try_from(i).unwrap(),
                        health_endpoint: "/health".into(),
                        health: *health,
                        load: None,
                        weight: *weight,
                        tags: vec![],
                        metadata: serde_json::Map::new(),
                        routes: vec![],
                        dependencies: vec![],
                        registered_at: now,
                        last_heartbeat_at: now,
                        health_since: now,
                        draining: false,
                        flapping: false,
                    },
                )
            })
            .collect();
        let table = Table::build(
            &instances,
            &[],
            &Table::default(),
            &crate::table::PoolSettings::default(),
            &crate::metrics::GatewayMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        table.pool("shop").unwrap().clone()
    }

    fn constraints(balance: Balance) -> Constraints<'static> {
        Constraints {
            balance,
            panic_threshold: 50,
            allow_probe: true,
            exclude: &[],
        }
    }

    fn spread(pool: &Pool, balance: Balance, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; pool.endpoints.len()];
        for _ in 0..picks {
            counts[pick(pool, constraints(balance), Instant::now()).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unhealthy() {
        let pool = pool(&[
            (HealthState::Healthy, 2),
            (HealthState::Healthy, 1),
            (HealthState::Offline, 1),
            (HealthState::Degraded, 1),
        ]);
        assert_eq!(spread(&pool, Balance::RoundRobin, 300), [200, 100, 0, 0]);
    }

    #[test]
    fn degraded_only_when_nothing_is_healthy_and_panic_spreads_over_degraded() {
        let degraded = pool(&[(HealthState::Offline, 1), (HealthState::Degraded, 1)]);
        assert_eq!(spread(&degraded, Balance::RoundRobin, 10), [0, 10]);
        let offline = pool(&[(HealthState::Offline, 1)]);
        assert_eq!(
            pick(&offline, constraints(Balance::RoundRobin), Instant::now()),
            None
        );
        // One healthy of four is below the 50 % threshold: the degraded ones help out.
        let mostly_degraded = pool(&[
            (HealthState::Healthy, 1),
            (HealthState::Degraded, 1),
            (HealthState::Degraded, 1),
            (HealthState::Offline, 1),
        ]);
        assert_eq!(
            spread(&mostly_degraded, Balance::RoundRobin, 30),
            [10, 10, 10, 0]
        );
        let no_panic = Constraints {
            panic_threshold: 0,
            ..constraints(Balance::RoundRobin)
        };
        for _ in 0..10 {
            assert_eq!(pick(&mostly_degraded, no_panic, Instant::now()), Some(0));
        }
        let healthy_enough = pool(&[
            (HealthState::Healthy, 1),
            (HealthState::Healthy, 1),
            (HealthState::Degraded, 1),
        ]);
        assert_eq!(
            spread(&healthy_enough, Balance::RoundRobin, 30),
            [15, 15, 0]
        );
    }

    #[test]
    fn least_outstanding_prefers_the_idle_instance() {
        let pool = pool(&[(HealthState::Healthy, 1), (HealthState::Healthy, 1)]);
        pool.endpoints[0]
            .live
            .in_flight
            .store(10, Ordering::Relaxed);
        assert_eq!(spread(&pool, Balance::LeastOutstanding, 50), [0, 50]);
    }

    #[test]
    fn open_circuits_and_tried_instances_are_skipped() {
        let pool = pool(&[(HealthState::Healthy, 1), (HealthState::Healthy, 1)]);
        let now = Instant::now();
        {
            let mut breaker = pool.endpoints[0].live.breaker();
            let (admission, _) = breaker.admit(now);
            breaker.record(admission.unwrap(), Outcome::ConnectFailure, now);
        }
        assert_eq!(spread(&pool, Balance::RoundRobin, 10), [0, 10]);
        let skip_one = Constraints {
            exclude: &[1],
            ..constraints(Balance::LeastOutstanding)
        };
        assert_eq!(pick(&pool, skip_one, now), None);
        // After the cool-down the open circuit takes a probe, unless probes are not allowed.
        let later = now + Duration::from_secs(6);
        let no_probe = Constraints {
            allow_probe: false,
            ..skip_one
        };
        assert_eq!(pick(&pool, no_probe, later), None);
        assert_eq!(pick(&pool, skip_one, later), Some(0));
    }
}
