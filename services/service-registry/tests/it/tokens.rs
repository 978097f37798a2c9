//! Tokens at the registry: a revoked one is refused, learned from the vault's event with
//! Redis and from reconciliation without (DESIGN.md, "Identity and access"); so is one
//! signed by a key the vault retired.

use std::time::{Duration, Instant};

use common::testing::{TestDb, VaultFixture};

use crate::support::Registry;

/// How long a revoked token kept working at the registry.
async fn refused_after_revocation(vault: &VaultFixture, registry: &Registry) -> Duration {
    let (id, token) = vault.issue_with_id("orders").await;
    assert_eq!(registry.get("/api/services", &token).await.status, 200);
    vault.revoke(&id).await;
    let revoked = Instant::now();
    while registry.get("/api/services", &token).await.status != 401 {
        assert!(
            revoked.elapsed() < Duration::from_secs(10),
            "the registry still accepts a token revoked {:?} ago",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    revoked.elapsed()
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once_with_redis_and_within_a_resync_without() {
    // A resync far off: only the vault's event can explain a quick refusal.
    let redis = common::testing::redis_url();
    let vault = VaultFixture::start_with(&[("REDIS_URL", &redis)]).await;
    let db = TestDb::sqlite();
    let registry = Registry::start(
        &vault,
        &db.url,
        &[("REDIS_URL", &redis), ("RESYNC_INTERVAL", "60s")],
    )
    .await;
    common::testing::wait_subscribed(&registry.process, 1).await;
    let took = refused_after_revocation(&vault, &registry).await;
    assert!(took < Duration::from_secs(2), "with Redis: {took:?}");

    let vault = VaultFixture::start().await;
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[("RESYNC_INTERVAL", "1s")]).await;
    let took = refused_after_revocation(&vault, &registry).await;
    assert!(took < Duration::from_secs(5), "without Redis: {took:?}");
}

/// Retires the signing keys (`--retire-previous`) with `cli_env`; how long the registry
/// still took the admin token they signed, once it had verified and cached it.
async fn retired_key_refused_after(
    vault: &VaultFixture,
    registry: &Registry,
    cli_env: &[(&str, &str)],
) -> Duration {
    let old_admin = vault.token("admin");
    assert_eq!(registry.get("/api/services", old_admin).await.status, 200);
    let dir = vault.dir.path().join("after-leak");
    let args = [
        "rotate-signing-key",
        "--retire-previous",
        "--out",
        dir.to_str().unwrap(),
    ];
    let out = vault.operator(&args, cli_env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_admin = std::fs::read_to_string(dir.join("admin-token")).unwrap();
    // The registry learns the new key at a resync, from the vault's event, or from the
    // new token's unknown kid. Whichever way, from then on the token it had verified and
    // cached is refused.
    let retired = Instant::now();
    while registry.get("/api/services", &new_admin).await.status != 200 {
        assert!(
            retired.elapsed() < Duration::from_secs(5),
            "the registry never accepted the token signed by the new key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(registry.get("/api/services", old_admin).await.status, 401);
    retired.elapsed()
}

#[tokio::test]
async fn tokens_signed_by_a_retired_key_are_refused_within_a_resync() {
    // The vault drops the old key at its next resync (1 s); the registry at its own
    // (300 ms) after that.
    let vault = VaultFixture::start_with(&[("RESYNC_INTERVAL", "1s")]).await;
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[]).await;
    retired_key_refused_after(&vault, &registry, &[]).await;
}

#[tokio::test]
async fn with_redis_tokens_signed_by_a_retired_key_are_refused_at_once() {
    // Resyncs far off: only the CLI's and the vault's events can explain a quick refusal.
    let redis = common::testing::redis_url();
    let slow = [("REDIS_URL", redis.as_str()), ("RESYNC_INTERVAL", "60s")];
    let vault = VaultFixture::start_with(&slow).await;
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &slow).await;
    common::testing::wait_subscribed(&vault.process, 1).await;
    common::testing::wait_subscribed(&registry.process, 1).await;
    let took = retired_key_refused_after(&vault, &registry, &[("REDIS_URL", &redis)]).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
}
