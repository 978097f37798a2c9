//! Tokens at the monitor: a revoked one is refused, learned from the vault's event with
//! Redis and from reconciliation without (DESIGN.md, "Identity and access").

use std::time::{Duration, Instant};

use crate::support::Stack;

async fn status_with(stack: &Stack, token: &str) -> http::StatusCode {
    let url = stack.monitor.url("/api/health/services");
    common::testing::send_json(&stack.client, "GET", &url, Some(token), None)
        .await
        .status
}

/// How long a revoked token kept working at the monitor.
async fn refused_after_revocation(stack: &Stack) -> Duration {
    let (id, token) = stack.vault.issue_with_id("orders").await;
    assert_eq!(
        status_with(stack, &token).await,
        200,
        "a service token reads health"
    );
    stack.vault.revoke(&id).await;
    let revoked = Instant::now();
    while status_with(stack, &token).await != 401 {
        assert!(
            revoked.elapsed() < Duration::from_secs(10),
            "the monitor still accepts a token revoked {:?} ago",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    revoked.elapsed()
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once_with_redis_and_within_a_resync_without() {
    // A resync far off: only the vault's event can explain a quick refusal.
    let redis = testkit::RedisServer::start().unwrap();
    let stack = Stack::start(Some(&redis.url()), &[("RESYNC_INTERVAL", "60s")]).await;
    // Two subscriptions: the registry's and health channels, and the vault's.
    common::testing::wait_subscribed(&stack.monitor, 2).await;
    let took = refused_after_revocation(&stack).await;
    assert!(took < Duration::from_secs(2), "with Redis: {took:?}");

    let stack = Stack::start(None, &[("RESYNC_INTERVAL", "1s")]).await;
    let took = refused_after_revocation(&stack).await;
    assert!(took < Duration::from_secs(5), "without Redis: {took:?}");
}
