//! Alerts end to end: fire, escalate, deduplicate, resolve; a receiver that is down loses
//! nothing; a restart repeats nothing; dependencies inhibit; recovery webhooks.

use std::time::Duration;

use serde_json::json;

use crate::support::{Mode, Receiver, Stack, Upstream};

fn rules_file(dir: &testkit::TempDir, json: serde_json::Value) -> String {
    let path = dir.path().join("rules.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// (rule, status, severity) of each notice, in order.
fn notices(bodies: &[serde_json::Value], rule: &str) -> Vec<(String, String)> {
    bodies
        .iter()
        .filter(|b| b["rule"] == rule)
        .map(|b| {
            (
                b["status"].as_str().unwrap().to_owned(),
                b["severity"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn alerts_fire_escalate_resolve_and_survive_a_down_receiver_and_a_restart() {
    let receiver = Receiver::start().await;
    let dir = testkit::TempDir::new("monitor-rules").unwrap();
    let rules = rules_file(&dir, json!({"escalate_after": "2s"}));
    let hooks = format!(
        "{}, alertmanager={}",
        receiver.url("/hook"),
        receiver.url("/api/v2/alerts")
    );
    let env = [
        ("ALERT_RULES_FILE", rules.as_str()),
        ("ALERT_WEBHOOKS", hooks.as_str()),
    ];
    let mut stack = Stack::start(None, &env).await;
    let upstream = Upstream::start(Mode::Healthy).await;
    stack
        .register("db", "db-1", "127.0.0.1", upstream.port, json!({}))
        .await;
    stack.wait_state("db", "db-1", "healthy").await;

    upstream.set(Mode::Failing);
    let fired = receiver
        .wait("/hook", "the warning", |b| {
            notices(b, "instance_offline").contains(&("firing".into(), "warning".into()))
        })
        .await;
    assert_eq!(fired[0]["service"], "db");
    assert!(fired[0]["fingerprint"].as_str().unwrap().len() == 16);
    let escalated = receiver
        .wait("/hook", "the escalation", |b| {
            notices(b, "instance_offline").contains(&("firing".into(), "critical".into()))
        })
        .await;
    assert_eq!(
        notices(&escalated, "instance_offline"),
        [
            ("firing".into(), "warning".into()),
            ("firing".into(), "critical".into())
        ],
        "each notice once"
    );
    let am = receiver
        .wait("/api/v2/alerts", "Alertmanager's format", |b| b.len() >= 2)
        .await;
    assert!(am[0].as_array().unwrap()[0]["labels"]["alertname"].is_string());

    // The receiver goes down; the alert resolves meanwhile; the notice waits for it.
    *receiver.down.lock().unwrap() = true;
    upstream.set(Mode::Healthy);
    stack.wait_state("db", "db-1", "healthy").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = receiver.at("/hook").len();
    *receiver.down.lock().unwrap() = false;
    receiver
        .wait(
            "/hook",
            "the resolved notice after the receiver came back",
            |b| {
                notices(b, "instance_offline").last()
                    == Some(&("resolved".into(), "critical".into()))
            },
        )
        .await;
    assert!(receiver.at("/hook").len() > before);

    // A restart sends nothing again, and a new outage after it is delivered once.
    let delivered = receiver.at("/hook").len();
    stack.restart_monitor(&env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let repeated = receiver.at("/hook");
    assert_eq!(
        repeated.len(),
        delivered,
        "a restart repeated notices: {:#?}",
        &repeated[delivered.min(repeated.len())..]
    );
    upstream.set(Mode::Failing);
    let after = receiver
        .wait("/hook", "a new warning after the restart", |b| {
            notices(b, "instance_offline")
                .iter()
                .filter(|n| n.0 == "firing")
                .count()
                == 3
        })
        .await;
    let alerts = stack.monitor_get("/api/health/alerts").await.json();
    assert!(
        alerts["active"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["rule"] == "instance_offline"),
        "{alerts:#}"
    );
    assert!(after.len() > delivered);
}

#[tokio::test]
async fn a_dependency_down_inhibits_its_dependents_and_recovery_is_called_with_limits() {
    let receiver = Receiver::start().await;
    let hook = receiver.url("/hook");
    let stack = Stack::start(None, &[("ALERT_WEBHOOKS", hook.as_str())]).await;
    let db = Upstream::start(Mode::Healthy).await;
    let api = Upstream::start(Mode::Healthy).await;
    let worker = Upstream::start(Mode::Healthy).await;
    let recovery = json!({"webhook": receiver.url("/recover"), "after": "300ms", "cooldown": "1s", "max_attempts": 2});
    stack
        .register("db", "db-1", "127.0.0.1", db.port, json!({}))
        .await;
    stack
        .register(
            "api",
            "api-1",
            "127.0.0.1",
            api.port,
            json!({"dependencies": ["db"], "metadata": {"recovery": recovery}}),
        )
        .await;
    stack
        .register(
            "worker",
            "worker-1",
            "127.0.0.1",
            worker.port,
            json!({"metadata": {"recovery": recovery}}),
        )
        .await;
    for (service, id) in [("db", "db-1"), ("api", "api-1"), ("worker", "worker-1")] {
        stack.wait_state(service, id, "healthy").await;
    }

    // The database goes down and takes the API with it.
    db.stop();
    api.stop();
    stack.wait_state("db", "db-1", "offline").await;
    stack.wait_state("api", "api-1", "offline").await;
    receiver
        .wait("/hook", "the database's alerts", |b| {
            b.iter()
                .any(|n| n["service"] == "db" && n["rule"] == "no_healthy_instance")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bodies = receiver.at("/hook");
    assert!(
        bodies.iter().all(|n| n["service"] != "api"),
        "the API's alerts were paged separately: {bodies:#?}"
    );
    let alerts = stack.monitor_get("/api/health/alerts").await.json();
    let api_alerts: Vec<_> = alerts["active"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["service"] == "api")
        .collect();
    assert!(!api_alerts.is_empty());
    assert!(
        api_alerts.iter().all(|a| a["caused_by"] == "db"),
        "{api_alerts:#?}"
    );
    assert!(
        receiver
            .at("/recover")
            .iter()
            .all(|r| r["service"] != "api"),
        "never for a dependency's outage"
    );

    // A worker that dies on its own is recovered: twice at most, a cool-down apart.
    worker.stop();
    stack.wait_state("worker", "worker-1", "offline").await;
    let calls = receiver
        .wait("/recover", "two recovery calls", |b| {
            b.iter().filter(|r| r["service"] == "worker").count() >= 2
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let calls_later: Vec<_> = receiver
        .at("/recover")
        .into_iter()
        .filter(|r| r["service"] == "worker")
        .collect();
    assert_eq!(calls_later.len(), 2, "max_attempts is 2: {calls:#?}");
    assert_eq!(calls_later[0]["attempt"], 1);
    assert_eq!(calls_later[1]["attempt"], 2);
    let view = stack.instance("worker", "worker-1").await;
    let attempts = view["recovery_attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{view:#}");
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(attempts[i]["at"].as_str().unwrap()).unwrap()
    };
    assert!(
        at(1) - at(0) >= chrono::Duration::milliseconds(1000),
        "cool-down: {attempts:#?}"
    );
}
