//! What Consul and Eureka users ask for: history, flap detection, the dependency graph,
//! draining, and self-preservation when most instances would expire at once.

use std::time::Duration;

use common::both_backends;
use common::testing::{TestDb, VaultFixture};
use serde_json::json;

use crate::support::{Registry, eventually};

fn instance(service: &str, id: &str, dependencies: &[&str]) -> serde_json::Value {
    json!({
        "name": service, "address": "127.0.0.1", "port": 9300, "health_endpoint": "/health",
        "instance_id": id, "dependencies": dependencies,
    })
}

both_backends!(
    history_draining_and_the_dependency_graph,
    |backend| async move {
        let vault = VaultFixture::start().await;
        let payments = vault.issue("payments").await;
        let orders = vault.issue("orders").await;
        let monitor = vault.token("health-monitor").to_owned();
        let db = TestDb::new(backend);
        let registry = Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
        assert_eq!(
            registry
                .register(&payments, instance("payments", "p-1", &["orders"]))
                .await
                .status,
            201
        );
        assert_eq!(
            registry
                .register(&orders, instance("orders", "o-1", &[]))
                .await
                .status,
            201
        );

        for (state, reason) in [("degraded", "slow answers"), ("healthy", "recovered")] {
            let set = registry
                .call(
                    "PUT",
                    "/api/services/payments/instances/p-1/health",
                    Some(&monitor),
                    Some(json!({"state": state, "reason": reason})),
                )
                .await;
            assert_eq!(set.status, 204);
        }
        let history = registry
            .get("/api/services/payments/instances/p-1/history", &payments)
            .await
            .json();
        let steps: Vec<String> = history["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                format!(
                    "{}->{}:{}",
                    t["from"].as_str().unwrap_or("-"),
                    t["to"].as_str().unwrap(),
                    t["reason"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            steps,
            [
                "-->healthy:registered",
                "healthy->degraded:slow answers",
                "degraded->healthy:recovered"
            ]
        );

        // Draining: no new traffic until the operator is done.
        let drained = registry
            .call(
                "PUT",
                "/api/services/payments/instances/p-1/drain",
                Some(&payments),
                Some(json!({"draining": true})),
            )
            .await;
        assert_eq!(drained.status, 200);
        assert_eq!(
            registry
                .get("/api/discover?service=payments", &payments)
                .await
                .status,
            503
        );
        let back = registry
            .call(
                "PUT",
                "/api/services/payments/instances/p-1/drain",
                Some(&payments),
                Some(json!({"draining": false})),
            )
            .await;
        assert_eq!(back.status, 200);
        assert_eq!(
            registry
                .get("/api/discover?service=payments", &payments)
                .await
                .status,
            200
        );

        let graph = registry.get("/api/services/graph", &payments).await.json();
        assert_eq!(
            graph["edges"],
            json!([{"from": "payments", "to": "orders"}])
        );
        let orders_view = registry.get("/api/services/orders", &orders).await.json();
        assert_eq!(orders_view["dependents"], json!(["payments"]));
    }
);

#[tokio::test]
async fn a_flapping_instance_is_held_out_of_discovery_until_it_settles() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let monitor = vault.token("health-monitor").to_owned();
    let db = TestDb::sqlite();
    let registry = Registry::start(
        &vault,
        &db.url,
        &[
            ("HEARTBEAT_INTERVAL", "30s"),
            ("FLAP_THRESHOLD", "3"),
            ("FLAP_WINDOW", "1s"),
        ],
    )
    .await;
    assert_eq!(
        registry
            .register(&payments, instance("payments", "p-1", &[]))
            .await
            .status,
        201
    );
    for state in ["degraded", "healthy", "degraded", "healthy"] {
        let set = registry
            .call(
                "PUT",
                "/api/services/payments/instances/p-1/health",
                Some(&monitor),
                Some(json!({"state": state, "reason": "flip"})),
            )
            .await;
        assert_eq!(set.status, 204);
    }
    let held = registry
        .get("/api/services/payments", &payments)
        .await
        .json();
    assert_eq!(held["instances"][0]["flapping"], true);
    assert_eq!(held["instances"][0]["health"], "healthy");
    assert_eq!(
        registry
            .get("/api/discover?service=payments", &payments)
            .await
            .status,
        503
    );
    eventually(Duration::from_secs(5), "settling", || async {
        registry
            .get("/api/discover?service=payments", &payments)
            .await
            .status
            == 200
    })
    .await;
}

#[tokio::test]
async fn when_most_instances_would_expire_at_once_nothing_is_evicted() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let db = TestDb::sqlite();
    let registry = std::sync::Arc::new(
        Registry::start(
            &vault,
            &db.url,
            &[("HEARTBEAT_INTERVAL", "200ms"), ("DEREGISTER_AFTER", "1s")],
        )
        .await,
    );
    for i in 0..4 {
        assert_eq!(
            registry
                .register(&payments, instance("payments", &format!("p-{i}"), &[]))
                .await
                .status,
            201
        );
    }
    // One keeps beating; three go silent at once, as if the registry's network failed.
    let beating = {
        let (registry, payments) = (registry.clone(), payments.clone());
        tokio::spawn(async move {
            loop {
                registry
                    .call(
                        "PUT",
                        "/api/services/payments/instances/p-0/heartbeat",
                        Some(&payments),
                        None,
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let metric = || async {
        let text =
            String::from_utf8(registry.get("/metrics", &payments).await.body.to_vec()).unwrap();
        text.lines()
            .any(|l| l == "concierge_registry_self_preservation 1")
    };
    eventually(Duration::from_secs(5), "self-preservation", metric).await;
    // Well past TTL and DEREGISTER_AFTER: all four are still there and healthy.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let listed = registry
        .get("/api/services/payments", &payments)
        .await
        .json();
    assert_eq!(listed["counts"]["healthy"], 4, "{listed}");
    assert!(
        registry
            .process
            .output()
            .contains("more than half of all instances would expire")
    );
    beating.abort();
}
