//! The monitor's metrics.

use std::time::Duration;

use common::api::HealthState;
use common::metrics::{LATENCY_BUCKETS, register};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct MonitorMetrics {
    /// Checks, by outcome (pass, warn, fail) and reason (none, slow, degraded, dns, …).
    checks: IntCounterVec,
    /// Check latency, by outcome.
    check_duration: HistogramVec,
    /// Instances per state.
    pub instances: IntGaugeVec,
    /// State changes reported, by the state entered.
    transitions: IntCounterVec,
    /// Alerts firing, by severity (inhibited ones included).
    pub alerts_firing: IntGaugeVec,
    /// Webhook deliveries, by outcome (ok, failed).
    deliveries: IntCounterVec,
    /// Recovery attempts, by outcome (ok, failed).
    recoveries: IntCounterVec,
}

impl MonitorMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let metrics = Self {
            checks: counter(
                "concierge_monitor_checks_total",
                "Checks made, by outcome (pass, warn, fail) and reason (none, slow, degraded, dns, connect, timeout, status, body).",
                &["outcome", "reason"],
            )?,
            check_duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "concierge_monitor_check_duration_seconds",
                        "Time a check took, by outcome.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["outcome"],
                )?,
            )?,
            instances: gauge(
                "concierge_monitor_instances",
                "Instances checked, by state.",
                &["state"],
            )?,
            transitions: counter(
                "concierge_monitor_transitions_total",
                "State changes seen and reported, by the state entered.",
                &["state"],
            )?,
            alerts_firing: gauge(
                "concierge_monitor_alerts_firing",
                "Alerts firing, by severity.",
                &["severity"],
            )?,
            deliveries: counter(
                "concierge_monitor_webhook_deliveries_total",
                "Alert notices posted to webhooks, by outcome (ok, failed).",
                &["outcome"],
            )?,
            recoveries: counter(
                "concierge_monitor_recovery_attempts_total",
                "Recovery webhooks called, by outcome (ok, failed).",
                &["outcome"],
            )?,
        };
        // The series every monitor has, at 0 until the first event: a rate or an alert
        // over them then reads 0, not nothing.
        metrics.checks.with_label_values(&["pass", "none"]);
        for outcome in ["pass", "warn", "fail"] {
            metrics.check_duration.with_label_values(&[outcome]);
        }
        for state in [
            HealthState::Healthy,
            HealthState::Degraded,
            HealthState::Offline,
        ] {
            metrics.transitions.with_label_values(&[state.as_str()]);
        }
        for outcome in ["ok", "failed"] {
            metrics.deliveries.with_label_values(&[outcome]);
            metrics.recoveries.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }

    pub fn checked(&self, outcome: &str, reason: &str, elapsed: Duration) {
        self.checks.with_label_values(&[outcome, reason]).inc();
        self.check_duration
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }

    pub fn transition(&self, to: &str) {
        self.transitions.with_label_values(&[to]).inc();
    }

    pub fn delivery(&self, ok: bool) {
        self.deliveries
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    pub fn recovery(&self, ok: bool) {
        self.recoveries
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }
}
