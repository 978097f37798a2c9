//! Checks and states: every failure reason produced on purpose, thresholds, faster
//! probing while failing, reports to the registry and events.

use std::time::Duration;

use common::api::{Channel, Event};
use serde_json::json;

use crate::support::{FAST, MONITOR, Mode, Stack, Upstream, closed_port};

#[tokio::test]
async fn states_and_failure_reasons_follow_the_instances() {
    let redis = testkit::RedisServer::start().unwrap();
    let stack = Stack::start(Some(&redis.url()), &[]).await;
    let cases = [
        ("ok", Mode::Healthy, "healthy", None),
        ("slow", Mode::Slow, "degraded", None),
        ("degraded", Mode::Degraded, "degraded", None),
        ("body", Mode::BodyDown, "offline", Some("body")),
        ("status", Mode::Failing, "offline", Some("status")),
        ("hanging", Mode::Hanging, "offline", Some("timeout")),
    ];
    let mut upstreams = Vec::new();
    for (name, mode, _, _) in &cases {
        let upstream = Upstream::start(*mode).await;
        stack
            .register(
                name,
                &format!("{name}-1"),
                "127.0.0.1",
                upstream.port,
                json!({}),
            )
            .await;
        upstreams.push(upstream);
    }
    stack
        .register(
            "refused",
            "refused-1",
            "127.0.0.1",
            closed_port(),
            json!({}),
        )
        .await;
    stack
        .register(
            "unknown",
            "unknown-1",
            "no-such-host.invalid",
            80,
            json!({}),
        )
        .await;
    let tcp = Upstream::start(Mode::Failing).await;
    stack
        .register(
            "tcp",
            "tcp-1",
            "127.0.0.1",
            tcp.port,
            json!({"metadata": {"check": "tcp"}}),
        )
        .await;

    let mut subscription = events::subscribe(
        Some(&common::config::RedisUrl::parse(common::secret::Secret::new(redis.url())).unwrap()),
        &[Channel::Health],
        Duration::from_secs(3600),
        events::EventMetrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .unwrap();

    for (name, _, state, reason) in cases.iter().map(|(n, m, s, r)| (*n, *m, *s, *r)).chain([
        ("refused", Mode::Healthy, "offline", Some("connect")),
        ("unknown", Mode::Healthy, "offline", Some("dns")),
        ("tcp", Mode::Healthy, "healthy", None),
    ]) {
        let (view, _) = stack.wait_state(name, &format!("{name}-1"), state).await;
        assert_eq!(
            view["last_error"]["reason"].as_str(),
            reason,
            "{name}: {view:#}"
        );
        if state != "healthy" {
            // The report follows the change in the monitor by a request.
            let started = std::time::Instant::now();
            while stack.registry_health(name, &format!("{name}-1")).await != state {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{name} not reported {state}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    // The registry published each change with the check's latency.
    let mut offline_seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while offline_seen == 0 {
        let signal = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .expect("no health event within 10 s")
            .unwrap();
        if let events::Signal::Event(envelope) = signal
            && let Event::HealthChanged {
                to,
                latency_ms,
                reason,
                ..
            } = envelope.event
            && to == common::api::HealthState::Offline
        {
            assert!(latency_ms.is_some(), "{reason}");
            offline_seen += 1;
        }
    }

    // Back to healthy after two passing checks.
    upstreams[4].set(Mode::Healthy);
    stack.wait_state("status", "status-1", "healthy").await;
    let page = stack.monitor_get("/metrics").await;
    let page = String::from_utf8_lossy(&page.body).into_owned();
    for reason in ["dns", "connect", "timeout", "status", "body"] {
        assert!(
            page.contains(&format!(
                r#"concierge_monitor_checks_total{{outcome="fail",reason="{reason}"}}"#
            )),
            "{reason} missing from the metrics"
        );
    }
    let system = stack.monitor_get("/api/health/system").await.json();
    assert_eq!(
        system["instances"], 9,
        "every registered instance but the monitor itself: {system:#}"
    );
    assert!(
        system["services_without_healthy_instance"]
            .as_array()
            .unwrap()
            .contains(&json!("refused"))
    );
}

#[tokio::test]
async fn a_dead_instance_is_offline_within_one_interval_and_fast_rechecks() {
    // A long interval: only the faster probing after the first failure explains a quick
    // offline once the first failing check has happened.
    let stack = Stack::start(
        None,
        &[("CHECK_INTERVAL", "2s"), ("FAST_INTERVAL", "100ms")],
    )
    .await;
    let upstream = Upstream::start(Mode::Healthy).await;
    stack
        .register("web", "web-1", "127.0.0.1", upstream.port, json!({}))
        .await;
    stack.wait_state("web", "web-1", "healthy").await;
    // Wait for a check to have happened, so that the instance is on its normal schedule.
    while stack.instance("web", "web-1").await["last_check_at"].is_null() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    upstream.stop();
    let (view, took) = stack.wait_state("web", "web-1", "offline").await;
    // interval + 2 fast re-checks + slack: far less than 3 full intervals.
    assert!(
        took < Duration::from_millis(2000 + 2 * 100 + 3 * 300 + 700),
        "offline after {took:?}: {view:#}"
    );
    assert_eq!(view["consecutive_failures"], 3);
    assert_eq!(view["last_error"]["reason"], "connect");
}

#[tokio::test]
async fn bad_configuration_stops_the_monitor_with_a_clear_error() {
    let db = common::testing::TestDb::sqlite();
    let dir = testkit::TempDir::new("monitor-rules").unwrap();
    let rules = dir.path().join("rules.json");
    std::fs::write(&rules, r#"{"escalate_after": "soon"}"#).unwrap();
    let cases = [
        ("ALERT_WEBHOOKS", "http://no-such-host.invalid/hook"),
        ("ALERT_WEBHOOKS", "ftp://127.0.0.1/hook"),
        ("ALERT_RULES_FILE", rules.to_str().unwrap()),
        ("CHECK_TIMEOUT", "1h"),
    ];
    for (var, value) in cases {
        let mut env: Vec<(&str, &str)> = vec![("DATABASE_URL", db.url.expose())];
        env.extend_from_slice(FAST);
        env.push((var, value));
        let out = common::testing::run_binary(MONITOR, &[], &env);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_served_operations() {
    let stack = Stack::start(None, &[]).await;
    common::testing::check_openapi_routes(&stack.monitor.url(""), stack.admin(), 8).await;
}

#[tokio::test]
async fn one_upstream_switched_through_every_mode_changes_state_each_time() {
    let stack = Stack::start(None, &[]).await;
    let upstream = Upstream::start(Mode::Healthy).await;
    stack
        .register("switch", "switch-1", "127.0.0.1", upstream.port, json!({}))
        .await;
    stack.wait_state("switch", "switch-1", "healthy").await;
    for (mode, state) in [
        (Mode::Slow, "degraded"),
        (Mode::Healthy, "healthy"),
        (Mode::Degraded, "degraded"),
        (Mode::Healthy, "healthy"),
        (Mode::Failing, "offline"),
        (Mode::Healthy, "healthy"),
    ] {
        upstream.set(mode);
        stack.wait_state("switch", "switch-1", state).await;
    }
    // Dead: the process is gone, its port closed and its connections with it.
    upstream.stop();
    let (view, _) = stack.wait_state("switch", "switch-1", "offline").await;
    assert_eq!(view["last_error"]["reason"], "connect", "{view:#}");
}

/// A verdict the registry does not have goes to it again: here a re-registration set a
/// failing instance healthy in the registry, and the checks, still failing, change no
/// state of their own to report.
#[tokio::test]
async fn the_registry_gets_the_checks_verdict_again_when_it_says_better() {
    let stack = Stack::start(None, FAST).await;
    let upstream = Upstream::start(Mode::Healthy).await;
    stack
        .register("web", "web-1", "127.0.0.1", upstream.port, json!({}))
        .await;
    stack.wait_state("web", "web-1", "healthy").await;
    upstream.set(Mode::Failing);
    stack.wait_state("web", "web-1", "offline").await;
    let registry_says = |expected: &'static str| {
        let stack = &stack;
        async move {
            let started = std::time::Instant::now();
            while stack.registry_health("web", "web-1").await != expected {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the registry never said {expected}\n{}",
                    stack.monitor.output()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    registry_says("offline").await;

    // The registry sets a registration healthy; the checks, still failing, say otherwise.
    stack
        .register("web", "web-1", "127.0.0.1", upstream.port, json!({}))
        .await;
    registry_says("offline").await;
    assert!(
        stack.monitor.output().contains("reporting again"),
        "{}",
        stack.monitor.output()
    );
}
