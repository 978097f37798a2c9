//! An instance's health from its checks: healthy → degraded (a warning, or the first
//! failure) → offline (N consecutive failures); back to healthy after M consecutive passes.
//! Pure, so that thresholds are tested without a clock or a network.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use common::api::HealthState;

use crate::probe::{Probe, Reason, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// `FAILURES_TO_OFFLINE`
    pub failures_to_offline: u32,
    /// `PASSES_TO_HEALTHY`
    pub passes_to_healthy: u32,
}

/// A change of state and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: HealthState,
    pub to: HealthState,
    pub reason: String,
}

/// What the monitor knows of one instance.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub state: HealthState,
    pub since: DateTime<Utc>,
    pub consecutive_failures: u32,
    pub consecutive_passes: u32,
    pub last_check_at: Option<DateTime<Utc>>,
    pub latency_ms: Option<f64>,
    pub last_error: Option<(Reason, String)>,
    /// When the state changed lately, for flap detection.
    pub transitions: VecDeque<DateTime<Utc>>,
}

/// Transitions remembered per instance.
const TRANSITIONS_KEPT: usize = 64;

impl Tracker {
    pub fn new(state: HealthState, since: DateTime<Utc>) -> Self {
        Self {
            state,
            since,
            consecutive_failures: 0,
            consecutive_passes: 0,
            last_check_at: None,
            latency_ms: None,
            last_error: None,
            transitions: VecDeque::new(),
        }
    }

    /// Whether the state is still settling: checks come faster until it is not.
    pub fn unsettled(&self) -> bool {
        self.consecutive_failures > 0 || (self.state != HealthState::Healthy)
    }

    pub fn observe(
        &mut self,
        probe: &Probe,
        now: DateTime<Utc>,
        t: Thresholds,
    ) -> Option<Transition> {
        self.last_check_at = Some(now);
        self.latency_ms = Some(probe.latency.as_secs_f64() * 1e3);
        let (to, reason) = match probe.verdict {
            Verdict::Pass => {
                self.consecutive_failures = 0;
                self.consecutive_passes = self.consecutive_passes.saturating_add(1);
                self.last_error = None;
                if self.state != HealthState::Healthy
                    && self.consecutive_passes >= t.passes_to_healthy
                {
                    (
                        HealthState::Healthy,
                        format!("{} consecutive passing checks", self.consecutive_passes),
                    )
                } else {
                    return None;
                }
            }
            Verdict::Warn(warning) => {
                self.consecutive_failures = 0;
                self.consecutive_passes = 0;
                self.last_error = None;
                (
                    HealthState::Degraded,
                    format!("warning: {:?}: {}", warning, probe.detail).to_lowercase(),
                )
            }
            Verdict::Fail(reason) => {
                self.consecutive_passes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some((reason, probe.detail.clone()));
                // Offline stays offline until passes bring it back.
                let to = if self.consecutive_failures >= t.failures_to_offline
                    || self.state == HealthState::Offline
                {
                    HealthState::Offline
                } else {
                    HealthState::Degraded
                };
                (
                    to,
                    format!(
                        "{}: {} ({} consecutive failures)",
                        reason.as_str(),
                        probe.detail,
                        self.consecutive_failures
                    ),
                )
            }
        };
        if to == self.state {
            return None;
        }
        let from = self.state;
        self.state = to;
        self.since = now;
        self.transitions.push_back(now);
        if self.transitions.len() > TRANSITIONS_KEPT {
            self.transitions.pop_front();
        }
        Some(Transition { from, to, reason })
    }

    /// Transitions since `since`.
    pub fn transitions_since(&self, since: DateTime<Utc>) -> usize {
        self.transitions.iter().filter(|t| **t >= since).count()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::probe::Warning;

    const T: Thresholds = Thresholds {
        failures_to_offline: 3,
        passes_to_healthy: 2,
    };

    fn probe(verdict: Verdict) -> Probe {
        Probe {
            verdict,
            latency: Duration::from_millis(3),
            detail: "x".into(),
        }
    }

    #[test]
    fn failures_degrade_then_take_offline_and_passes_bring_back() {
        let now = Utc::now();
        let mut tracker = Tracker::new(HealthState::Healthy, now);
        let fail = probe(Verdict::Fail(Reason::Connect));
        let step = |t: &mut Tracker, p: &Probe| t.observe(p, now, T).map(|tr| tr.to);
        assert_eq!(step(&mut tracker, &fail), Some(HealthState::Degraded));
        assert_eq!(step(&mut tracker, &fail), None);
        assert_eq!(step(&mut tracker, &fail), Some(HealthState::Offline));
        assert_eq!(tracker.last_error.as_ref().unwrap().0, Reason::Connect);
        let pass = probe(Verdict::Pass);
        assert_eq!(step(&mut tracker, &pass), None, "one pass is not enough");
        assert_eq!(
            step(&mut tracker, &fail),
            None,
            "a failure resets the passes"
        );
        assert_eq!(step(&mut tracker, &pass), None);
        assert_eq!(step(&mut tracker, &pass), Some(HealthState::Healthy));
        assert_eq!(tracker.transitions_since(now), 3);
    }

    #[test]
    fn a_warning_degrades_at_once() {
        let now = Utc::now();
        let mut tracker = Tracker::new(HealthState::Healthy, now);
        let slow = probe(Verdict::Warn(Warning::Slow));
        let transition = tracker.observe(&slow, now, T).unwrap();
        assert_eq!(transition.to, HealthState::Degraded);
        assert!(transition.reason.contains("slow"), "{}", transition.reason);
        assert!(tracker.unsettled());
        // An offline instance that answers again with a warning is degraded, not offline.
        let mut down = Tracker::new(HealthState::Offline, now);
        assert_eq!(
            down.observe(&slow, now, T).unwrap().to,
            HealthState::Degraded
        );
    }
}
