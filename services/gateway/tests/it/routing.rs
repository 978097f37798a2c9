//! Routes come from the registry: prefixes, stripping, the longest prefix, and changes
//! that apply without a restart.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Stack, Upstream};

#[tokio::test]
async fn routes_follow_the_registry_within_one_resync() {
    let stack = Stack::start(&[]).await;
    let shop = Upstream::start("shop").await;
    let cart = Upstream::start("cart").await;

    let unknown = stack.get("/shop/items").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["type"], "urn:concierge:problem:no-route");
    assert_eq!(
        unknown.header("content-type"),
        Some("application/problem+json")
    );

    stack
        .register("shop", "s-1", shop.port, json!({"routes": ["/store"]}))
        .await;
    stack
        .register("cart", "c-1", cart.port, json!({"routes": ["/store/cart"]}))
        .await;
    let waited = stack.wait_for("/cart/x", 200).await;
    assert!(
        waited < Duration::from_secs(3),
        "took {waited:?} with a 1 s resync"
    );

    let seen = |path: &'static str| {
        let stack = &stack;
        async move {
            let answer = stack.get(path).await;
            assert_eq!(answer.status, 200, "{path}: {:?}", answer.json());
            let body = answer.json();
            (
                body["instance"].as_str().unwrap().to_owned(),
                body["path"].as_str().unwrap().to_owned(),
            )
        }
    };
    assert_eq!(
        seen("/shop/items?page=2").await,
        ("shop".into(), "/items?page=2".into())
    );
    assert_eq!(seen("/shop").await, ("shop".into(), "/".into()));
    assert_eq!(
        seen("/store/items").await,
        ("shop".into(), "/store/items".into())
    );
    assert_eq!(
        seen("/store/cart/1").await,
        ("cart".into(), "/store/cart/1".into())
    );
    assert_eq!(
        seen("/store/cartoon").await,
        ("shop".into(), "/store/cartoon".into())
    );
    assert_eq!(stack.get("/shopping").await.status, 404);

    // Offline: 503 with Retry-After. Degraded: used, since nothing healthy is left.
    stack.set_health("cart", "c-1", "offline").await;
    stack.wait_for("/cart/x", 503).await;
    let unavailable = stack.get("/cart/x").await;
    assert_eq!(
        unavailable.json()["type"],
        "urn:concierge:problem:no-healthy-instance"
    );
    assert!(unavailable.header("retry-after").is_some());
    stack.set_health("cart", "c-1", "degraded").await;
    stack.wait_for("/cart/x", 200).await;

    stack.deregister("shop", "s-1").await;
    let waited = stack.wait_for("/shop/items", 404).await;
    assert!(
        waited < Duration::from_secs(3),
        "took {waited:?} with a 1 s resync"
    );
    assert_eq!(stack.get("/store/items").await.status, 404);
}

#[tokio::test]
async fn with_redis_a_change_routes_within_100_ms() {
    let redis = testkit::RedisServer::start().unwrap();
    // A long resync: only the events can explain a fast change.
    let stack = Stack::with_redis(&redis.url(), &[("RESYNC_INTERVAL", "5m")]).await;
    let upstream = Upstream::start("fast").await;
    // Let the subscriber settle (its first resync comes after connecting).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    stack
        .register("fast", "f-1", upstream.port, json!({}))
        .await;
    let registered = started.elapsed();
    let routed = stack.wait_for("/fast/x", 200).await;
    assert!(
        routed < Duration::from_millis(100),
        "routed {routed:?} after the registration's 201 (which took {registered:?})"
    );
    stack.deregister("fast", "f-1").await;
    let removed = stack.wait_for("/fast/x", 404).await;
    assert!(
        removed < Duration::from_millis(100),
        "removed after {removed:?}"
    );
}

/// A service registers with its own token alone: the routes it declares must not take
/// another service's paths, or the control plane's.
#[tokio::test]
async fn a_service_cannot_take_another_services_paths() {
    let stack = Stack::start(&[]).await;
    let payments = Upstream::start("payments").await;
    let evil = Upstream::start("evil").await;
    stack
        .register("payments", "p-1", payments.port, json!({}))
        .await;
    stack
        .register(
            "evil",
            "e-1",
            evil.port,
            json!({"routes": ["/payments", "/payments/admin", "/api/credentials/mine", "/evil-zone"]}),
        )
        .await;
    stack.wait_for("/evil-zone/x", 200).await;
    for path in ["/payments/charge", "/payments/admin/x"] {
        let answer = stack.get(path).await;
        assert_eq!(answer.json()["instance"], "payments", "{path}");
    }
    assert_eq!(stack.get("/api/credentials/mine").await.status, 401);
    assert_eq!(evil.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
}
