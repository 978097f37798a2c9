//! The gateway's own metrics, beside the shared HTTP ones (requests by route and status,
//! latency by route, open connections) that the hyper stack records.

use std::time::Duration;

use common::metrics::{LATENCY_BUCKETS, register};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::breaker::CircuitState;

/// Why a request went to another instance: the `reason` label of the retries.
pub const RETRY_REASONS: [&str; 3] = ["connect", "reset", "status_503"];

#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// Time from sending a request upstream to its response head, by service.
    upstream_duration: HistogramVec,
    /// Attempts sent upstream, by service and outcome.
    upstream_attempts: IntCounterVec,
    /// Retries, by service and reason (connect, reset, status_503).
    retries: IntCounterVec,
    /// Retries refused because the service's retry budget was spent.
    budget_exhausted: IntCounterVec,
    /// Circuit state per instance: 0 closed, 1 half-open, 2 open.
    circuit_state: IntGaugeVec,
    /// Circuit transitions, by service and the state entered.
    circuit_transitions: IntCounterVec,
    /// Requests refused by a rate limit, by route and scope (client, service).
    rate_limited: IntCounterVec,
    /// Rate-limit decisions, by where they were made (redis, local, fallback).
    rate_decisions: IntCounterVec,
    /// Route-table rebuilds, by cause (resync, event).
    table_updates: IntCounterVec,
    /// Instances in the route table.
    instances: IntGauge,
}

impl GatewayMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        Ok(Self {
            upstream_duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "concierge_gateway_upstream_duration_seconds",
                        "Time from sending a request to an instance to its response head, by service.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["service"],
                )?,
            )?,
            upstream_attempts: counter(
                "concierge_gateway_upstream_attempts_total",
                "Requests sent to instances, by service and outcome (ok, status_5xx, connect, reset, timeout).",
                &["service", "outcome"],
            )?,
            retries: counter(
                "concierge_gateway_retries_total",
                "Requests retried on another instance, by service and reason (connect, refused, reset, status_503).",
                &["service", "reason"],
            )?,
            budget_exhausted: counter(
                "concierge_gateway_retry_budget_exhausted_total",
                "Retries not made because the service's retry budget was spent.",
                &["service"],
            )?,
            circuit_state: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "concierge_gateway_circuit_state",
                        "Circuit-breaker state per instance: 0 closed, 1 half-open, 2 open.",
                    ),
                    &["service", "instance_id"],
                )?,
            )?,
            circuit_transitions: counter(
                "concierge_gateway_circuit_transitions_total",
                "Circuit-breaker transitions, by service and the state entered.",
                &["service", "state"],
            )?,
            rate_limited: counter(
                "concierge_gateway_rate_limited_total",
                "Requests refused with 429, by route and limit scope (client, service).",
                &["route", "scope"],
            )?,
            rate_decisions: counter(
                "concierge_gateway_rate_limit_decisions_total",
                "Rate-limit decisions, one per request a route limits (all its limits at once), by where they were made (redis, local, fallback when Redis failed).",
                &["backend"],
            )?,
            table_updates: counter(
                "concierge_gateway_route_table_updates_total",
                "Route-table rebuilds, by cause (resync, event).",
                &["cause"],
            )?,
            instances: register(
                registry,
                IntGauge::new(
                    "concierge_gateway_instances",
                    "Instances in the route table.",
                )?,
            )?,
        })
    }

    /// One service's series, looked up once per route-table build rather than per request.
    /// Its retry, budget and circuit-transition counters start at 0 here, so that rates
    /// and alerts see a series (0 until the first event) rather than nothing.
    pub fn for_service(&self, service: &str) -> ServiceMetrics {
        for reason in RETRY_REASONS {
            self.retries.with_label_values(&[service, reason]);
        }
        self.budget_exhausted.with_label_values(&[service]);
        for state in [
            CircuitState::Closed,
            CircuitState::HalfOpen,
            CircuitState::Open,
        ] {
            self.circuit_transitions
                .with_label_values(&[service, state.as_str()]);
        }
        let attempts = |outcome: &str| {
            self.upstream_attempts
                .with_label_values(&[service, outcome])
        };
        ServiceMetrics {
            ok: attempts("ok"),
            status_5xx: attempts("status_5xx"),
            connect: attempts("connect"),
            reset: attempts("reset"),
            timeout: attempts("timeout"),
            duration: self.upstream_duration.with_label_values(&[service]),
        }
    }

    /// `reason` is one of [`RETRY_REASONS`].
    pub fn retried(&self, service: &str, reason: &str) {
        self.retries.with_label_values(&[service, reason]).inc();
    }

    pub fn budget_exhausted(&self, service: &str) {
        self.budget_exhausted.with_label_values(&[service]).inc();
    }

    pub fn circuit(&self, service: &str, instance: &str, state: CircuitState) {
        self.circuit_state
            .with_label_values(&[service, instance])
            .set(state.gauge());
        self.circuit_transitions
            .with_label_values(&[service, state.as_str()])
            .inc();
    }

    /// Shows a new instance's circuit as closed, so that the series exists from the start.
    pub fn circuit_seen(&self, service: &str, instance: &str, state: CircuitState) {
        self.circuit_state
            .with_label_values(&[service, instance])
            .set(state.gauge());
    }

    pub fn circuit_gone(&self, service: &str, instance: &str) {
        let _ = self.circuit_state.remove_label_values(&[service, instance]);
    }

    pub fn rate_limited(&self, route: &str, scope: &str) {
        self.rate_limited.with_label_values(&[route, scope]).inc();
    }

    pub fn rate_decision(&self, backend: &str) {
        self.rate_decisions.with_label_values(&[backend]).inc();
    }

    pub fn table_updated(&self, cause: &str, instances: usize) {
        self.table_updates.with_label_values(&[cause]).inc();
        self.instances
            .set(i64::try_from(instances).unwrap_or(i64::MAX));
    }
}

/// How an attempt upstream ended, for [`ServiceMetrics::upstream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Ok,
    Status5xx,
    Connect,
    Reset,
    Timeout,
}

/// A service's upstream series, resolved ahead of time.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    ok: IntCounter,
    status_5xx: IntCounter,
    connect: IntCounter,
    reset: IntCounter,
    timeout: IntCounter,
    duration: Histogram,
}

impl ServiceMetrics {
    pub fn upstream(&self, attempt: Attempt, elapsed: Duration) {
        match attempt {
            Attempt::Ok => &self.ok,
            Attempt::Status5xx => &self.status_5xx,
            Attempt::Connect => &self.connect,
            Attempt::Reset => &self.reset,
            Attempt::Timeout => &self.timeout,
        }
        .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}
