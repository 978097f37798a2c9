//! Prometheus metrics shared by both HTTP stacks; each service owns its own [`Registry`].

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Request latency buckets, in seconds: 1 ms to 10 s. Control-plane calls sit in the low
/// milliseconds, the gateway's proxied calls anywhere up to its default timeouts; the
/// buckets are roughly ×2.5 apart so that p50 and p99 resolve within a bucket's width.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A registry with the process collector (CPU, memory, file descriptors) already in it.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    let process = prometheus::process_collector::ProcessCollector::for_self();
    // Registration fails only on a duplicate name, impossible in a fresh registry.
    let _ = registry.register(Box::new(process));
    registry
}

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(error) = encoder.encode(&registry.gather(), &mut buffer) {
        tracing::error!(%error, "cannot encode metrics");
    }
    buffer
}

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Registers `metric` in `registry`; a name clash is a programming error found at start.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// What every HTTP server records about the requests it serves.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    /// Requests served, by route template, method and status code.
    requests: IntCounterVec,
    /// Time from request head to response head, by route template, method and status class.
    duration: HistogramVec,
    /// Requests being served right now.
    in_flight: IntGauge,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            requests: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "concierge_http_requests_total",
                        "HTTP requests served, by route template, method and status code.",
                    ),
                    &["route", "method", "status"],
                )?,
            )?,
            duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "concierge_http_request_duration_seconds",
                        "Time to serve an HTTP request until its response head, by route template, method and status class (2xx, 4xx, 5xx…).",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route", "method", "status_class"],
                )?,
            )?,
            in_flight: register(
                registry,
                IntGauge::new(
                    "concierge_http_requests_in_flight",
                    "HTTP requests being served right now.",
                )?,
            )?,
        })
    }

    pub fn started(&self) {
        self.in_flight.inc();
    }

    pub fn finished(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.in_flight.dec();
        self.requests
            .with_label_values(&[route, method, status_label(status)])
            .inc();
        self.duration
            .with_label_values(&[route, method, status_class(status)])
            .observe(elapsed.as_secs_f64());
    }
}

/// Status codes as static labels, so that the hot path allocates nothing for them.
fn status_label(status: u16) -> &'static str {
    const LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        100..=599 => LABELS[usize::from(status / 100 - 1)],
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Methods as static labels; anything unusual shares one, to bound the label set.
/// Takes the method's text because actix (http 0.2) and hyper (http 1) name it differently.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_status() {
        let registry = new_registry();
        let metrics = HttpMetrics::new(&registry).unwrap();
        metrics.started();
        metrics.finished("/api/things/{id}", "GET", 404, Duration::from_millis(3));
        metrics.started();
        metrics.finished("/api/things/{id}", "GET", 418, Duration::from_millis(3));
        let text = String::from_utf8(render(&registry)).unwrap();
        assert!(text.contains(
            r#"concierge_http_requests_total{method="GET",route="/api/things/{id}",status="404"} 1"#
        ));
        assert!(text.contains(r#"status="4xx"} 1"#), "{text}");
        assert!(text.contains("concierge_http_requests_in_flight 0"));
        assert!(text.contains(
            r#"concierge_http_request_duration_seconds_count{method="GET",route="/api/things/{id}",status_class="4xx"} 2"#
        ), "{text}");
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
