//! The per-instance circuit breaker: closed → open after N consecutive failures, or an
//! error rate over a window, or at once on a connect error (passive ejection) → half-open
//! after a cool-down, where a few real requests probe the instance → closed again.
//!
//! Pure logic over explicit instants, so that tests step time by hand; the proxy holds
//! one breaker per instance behind a mutex and reports each transition to the metrics.

use std::time::{Duration, Instant};

use common::config::{ConfigError, Env};

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// `CIRCUIT_FAILURES`: consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// `CIRCUIT_ERROR_RATE`: the failure ratio over the window that opens it…
    pub error_rate: f64,
    /// …once the window (`CIRCUIT_WINDOW`) holds at least `CIRCUIT_MIN_REQUESTS` requests.
    pub window: Duration,
    pub min_requests: u32,
    /// `CIRCUIT_COOLDOWN`: how long an open circuit waits before probing; it doubles each
    /// time a probe fails, up to `CIRCUIT_MAX_COOLDOWN`.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    /// `CIRCUIT_PROBES`: successful probes that close a half-open circuit.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
            probes: 3,
        }
    }
}

impl BreakerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let d = Self::default();
        let config = Self {
            consecutive_failures: env.or("CIRCUIT_FAILURES", d.consecutive_failures)?,
            error_rate: env.or("CIRCUIT_ERROR_RATE", d.error_rate)?,
            window: env.duration_or("CIRCUIT_WINDOW", d.window)?,
            min_requests: env.or("CIRCUIT_MIN_REQUESTS", d.min_requests)?,
            cooldown: env.duration_or("CIRCUIT_COOLDOWN", d.cooldown)?,
            max_cooldown: env.duration_or("CIRCUIT_MAX_COOLDOWN", d.max_cooldown)?,
            probes: env.or("CIRCUIT_PROBES", d.probes)?,
        };
        if config.consecutive_failures == 0 {
            return Err(ConfigError::new("CIRCUIT_FAILURES", "must be at least 1"));
        }
        if !(config.error_rate > 0.0 && config.error_rate <= 1.0) {
            return Err(ConfigError::new(
                "CIRCUIT_ERROR_RATE",
                "is a fraction, above 0, at most 1",
            ));
        }
        if config.window < Duration::from_millis(100) {
            return Err(ConfigError::new("CIRCUIT_WINDOW", "must be at least 100ms"));
        }
        if config.probes == 0 {
            return Err(ConfigError::new("CIRCUIT_PROBES", "must be at least 1"));
        }
        if config.max_cooldown < config.cooldown {
            return Err(ConfigError::new(
                "CIRCUIT_MAX_COOLDOWN",
                "must be at least CIRCUIT_COOLDOWN",
            ));
        }
        Ok(config)
    }
}

/// What the metrics and the status endpoint show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    /// The gauge's value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// How a request that the breaker let through went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx, a reset or a timeout.
    Failure,
    /// The connection was refused or never made: eject at once.
    ConnectFailure,
}

/// Whether a request was let through as ordinary traffic or as a half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { consecutive: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

/// Requests and failures over the last window, in ten slots.
#[derive(Debug, Clone)]
struct Window {
    slot: Duration,
    origin: Instant,
    /// (slot number, requests, failures)
    slots: [(u64, u32, u32); 10],
}

impl Window {
    fn new(window: Duration, now: Instant) -> Self {
        Self {
            slot: window / 10,
            origin: now,
            slots: [(u64::MAX, 0, 0); 10],
        }
    }

    fn slot_number(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX - 1)
    }

    fn add(&mut self, now: Instant, failed: bool) {
        let number = self.slot_number(now);
        let index = usize::try_from(number % 10).unwrap_or(0);
        let slot = &mut self.slots[index];
        if slot.0 != number {
            *slot = (number, 0, 0);
        }
        slot.1 = slot.1.saturating_add(1);
        slot.2 = slot.2.saturating_add(u32::from(failed));
    }

    /// (requests, failures) within the window ending now.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let current = self.slot_number(now);
        self.slots
            .iter()
            .filter(|(number, _, _)| *number <= current && current - number < 10)
            .fold((0, 0), |(r, f), (_, requests, failures)| {
                (r.saturating_add(*requests), f.saturating_add(*failures))
            })
    }

    fn clear(&mut self) {
        self.slots = [(u64::MAX, 0, 0); 10];
    }
}

/// One instance's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Inner,
    window: Window,
    /// The cool-down the next opening uses; doubles while probes keep failing.
    cooldown: Duration,
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        Self {
            window: Window::new(config.window, now),
            cooldown: config.cooldown,
            inner: Inner::Closed { consecutive: 0 },
            config,
        }
    }

    pub fn state(&self, now: Instant) -> CircuitState {
        match self.inner {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { until } if now >= until => CircuitState::HalfOpen,
            Inner::Open { .. } => CircuitState::Open,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Whether a request could be let through now (without taking a probe slot).
    pub fn available(&self, now: Instant) -> Option<Admission> {
        match self.inner {
            Inner::Closed { .. } => Some(Admission::Normal),
            Inner::Open { until } if now >= until => Some(Admission::Probe),
            Inner::Open { .. } => None,
            Inner::HalfOpen { in_flight, .. } => {
                (in_flight < self.config.probes).then_some(Admission::Probe)
            }
        }
    }

    /// Lets a request through if the state allows it; a half-open circuit lets through at
    /// most `probes` at a time. Returns the transition it made, if any.
    pub fn admit(&mut self, now: Instant) -> (Option<Admission>, Option<CircuitState>) {
        let before = self.state_exact();
        let admission = match self.inner {
            Inner::Closed { .. } => Some(Admission::Normal),
            Inner::Open { until } if now >= until => {
                self.inner = Inner::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                Some(Admission::Probe)
            }
            Inner::Open { .. } => None,
            Inner::HalfOpen {
                in_flight,
                successes,
            } if in_flight < self.config.probes => {
                self.inner = Inner::HalfOpen {
                    in_flight: in_flight + 1,
                    successes,
                };
                Some(Admission::Probe)
            }
            Inner::HalfOpen { .. } => None,
        };
        (admission, self.changed(before))
    }

    /// Records how an admitted request went; returns the transition it caused, if any.
    pub fn record(
        &mut self,
        admission: Admission,
        outcome: Outcome,
        now: Instant,
    ) -> Option<CircuitState> {
        let before = self.state_exact();
        let failed = outcome != Outcome::Success;
        match (self.inner, admission) {
            (Inner::Closed { consecutive }, _) => {
                self.window.add(now, failed);
                if !failed {
                    self.inner = Inner::Closed { consecutive: 0 };
                } else {
                    let consecutive = consecutive.saturating_add(1);
                    let (requests, failures) = self.window.totals(now);
                    let rate_exceeded = requests >= self.config.min_requests
                        && f64::from(failures) >= self.config.error_rate * f64::from(requests);
                    if outcome == Outcome::ConnectFailure
                        || consecutive >= self.config.consecutive_failures
                        || rate_exceeded
                    {
                        self.open(now);
                    } else {
                        self.inner = Inner::Closed { consecutive };
                    }
                }
            }
            (
                Inner::HalfOpen {
                    in_flight,
                    successes,
                },
                Admission::Probe,
            ) => {
                if failed {
                    self.cooldown = (self.cooldown * 2).min(self.config.max_cooldown);
                    self.open(now);
                } else if successes + 1 >= self.config.probes {
                    self.cooldown = self.config.cooldown;
                    self.window.clear();
                    self.inner = Inner::Closed { consecutive: 0 };
                } else {
                    self.inner = Inner::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        successes: successes + 1,
                    };
                }
            }
            // A request admitted before the circuit opened (or a stale probe after a
            // re-opening) finishing late: an open circuit stays open until its cool-down.
            (Inner::Open { .. }, _) | (Inner::HalfOpen { .. }, Admission::Normal) => {}
        }
        self.changed(before)
    }

    /// Gives back the probe slot of a request that ended with nothing to judge the instance
    /// by: the client went away, or the request failed on the client's side of the exchange.
    /// Without it a half-open circuit whose probes were all cancelled would stay half-open,
    /// admitting nothing, for good.
    pub fn release(&mut self, admission: Admission) {
        if let (
            Inner::HalfOpen {
                in_flight,
                successes,
            },
            Admission::Probe,
        ) = (self.inner, admission)
        {
            self.inner = Inner::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
                successes,
            };
        }
    }

    /// (requests, failures) over the window, for the status endpoint.
    pub fn recent(&self, now: Instant) -> (u32, u32) {
        self.window.totals(now)
    }

    fn open(&mut self, now: Instant) {
        self.inner = Inner::Open {
            until: now + self.cooldown,
        };
    }

    fn state_exact(&self) -> CircuitState {
        match self.inner {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { .. } => CircuitState::Open,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    fn changed(&self, before: CircuitState) -> Option<CircuitState> {
        let after = self.state_exact();
        (after != before).then_some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(20),
            probes: 2,
        }
    }

    fn run(breaker: &mut Breaker, outcome: Outcome, now: Instant) -> Option<CircuitState> {
        let (admission, _) = breaker.admit(now);
        breaker.record(admission.expect("admitted"), outcome, now)
    }

    #[test]
    fn consecutive_failures_open_then_probes_close() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config(), t0);
        assert_eq!(run(&mut breaker, Outcome::Failure, t0), None);
        assert_eq!(
            run(&mut breaker, Outcome::Success, t0),
            None,
            "a success resets the count"
        );
        assert_eq!(run(&mut breaker, Outcome::Failure, t0), None);
        assert_eq!(run(&mut breaker, Outcome::Failure, t0), None);
        assert_eq!(
            run(&mut breaker, Outcome::Failure, t0),
            Some(CircuitState::Open)
        );
        assert_eq!(breaker.admit(t0 + Duration::from_secs(4)).0, None);
        assert_eq!(
            breaker.state(t0 + Duration::from_secs(5)),
            CircuitState::HalfOpen
        );

        let t1 = t0 + Duration::from_secs(5);
        let (first, change) = breaker.admit(t1);
        assert_eq!(
            (first, change),
            (Some(Admission::Probe), Some(CircuitState::HalfOpen))
        );
        let (second, _) = breaker.admit(t1);
        assert_eq!(second, Some(Admission::Probe));
        assert_eq!(
            breaker.admit(t1).0,
            None,
            "at most `probes` probes at a time"
        );
        assert_eq!(breaker.record(Admission::Probe, Outcome::Success, t1), None);
        assert_eq!(
            breaker.record(Admission::Probe, Outcome::Success, t1),
            Some(CircuitState::Closed)
        );
    }

    #[test]
    fn probes_that_end_without_an_outcome_give_their_slot_back() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config(), t0);
        run(&mut breaker, Outcome::ConnectFailure, t0);
        let t1 = t0 + Duration::from_secs(5);
        for _ in 0..3 {
            let first = breaker.admit(t1).0.expect("a probe");
            let second = breaker.admit(t1).0.expect("a probe");
            assert_eq!(breaker.admit(t1).0, None, "both probe slots are taken");
            // Their clients went away: nothing was learnt of the instance.
            breaker.release(first);
            breaker.release(second);
        }
        assert_eq!(breaker.state(t1), CircuitState::HalfOpen);
        assert_eq!(run(&mut breaker, Outcome::Success, t1), None);
        assert_eq!(
            run(&mut breaker, Outcome::Success, t1),
            Some(CircuitState::Closed)
        );
        // A closed circuit has no slots to give back.
        breaker.release(Admission::Normal);
        assert_eq!(breaker.state(t1), CircuitState::Closed);
    }

    #[test]
    fn a_connect_failure_ejects_at_once_and_failed_probes_back_off() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config(), t0);
        assert_eq!(
            run(&mut breaker, Outcome::ConnectFailure, t0),
            Some(CircuitState::Open)
        );
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            run(&mut breaker, Outcome::ConnectFailure, t1),
            Some(CircuitState::Open)
        );
        // The cool-down doubled: 10 s now, then 20 s (the cap), then still 20 s.
        assert_eq!(
            breaker.state(t1 + Duration::from_secs(9)),
            CircuitState::Open
        );
        let t2 = t1 + Duration::from_secs(10);
        run(&mut breaker, Outcome::Failure, t2);
        assert_eq!(
            breaker.state(t2 + Duration::from_secs(19)),
            CircuitState::Open
        );
        let t3 = t2 + Duration::from_secs(20);
        run(&mut breaker, Outcome::Failure, t3);
        assert_eq!(
            breaker.state(t3 + Duration::from_secs(20)),
            CircuitState::HalfOpen
        );
        // Recovery resets the cool-down.
        let t4 = t3 + Duration::from_secs(20);
        run(&mut breaker, Outcome::Success, t4);
        assert_eq!(
            run(&mut breaker, Outcome::Success, t4),
            Some(CircuitState::Closed)
        );
        run(&mut breaker, Outcome::ConnectFailure, t4);
        assert_eq!(
            breaker.state(t4 + Duration::from_secs(5)),
            CircuitState::HalfOpen
        );
    }

    #[test]
    fn an_error_rate_over_the_window_opens_even_without_a_streak() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config(), t0);
        // Alternate failure and success: never 3 in a row, but half of all requests fail.
        let mut opened = None;
        for i in 0..20 {
            let outcome = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            if let Some(state) = run(&mut breaker, outcome, t0 + Duration::from_millis(i * 10)) {
                opened = Some((i, state));
                break;
            }
        }
        assert_eq!(
            opened,
            Some((10, CircuitState::Open)),
            "opens once 10 requests are in"
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config(), t0);
        for i in 0..9 {
            let outcome = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            run(&mut breaker, outcome, t0);
        }
        assert_eq!(breaker.recent(t0), (9, 5));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(breaker.recent(later), (0, 0));
        assert_eq!(run(&mut breaker, Outcome::Failure, later), None);
    }
}
