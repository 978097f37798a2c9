//! What every service does: configuration errors, healthcheck, SIGTERM, migrations.

use common::both_backends;
use common::db::Backend;
use common::testing::{check_binary_basics, check_migrations, run_binary};

use crate::support::{BINARY, Fixture, mode};

#[tokio::test]
async fn the_binary_validates_config_answers_healthcheck_and_stops_on_sigterm() {
    let fixture = Fixture::new(Backend::Sqlite);
    check_binary_basics(
        BINARY,
        &fixture.env(&[]),
        &["DATABASE_URL", "VAULT_MASTER_KEY_FILE"],
    )
    .await;

    let bad_key = fixture.dir.path().join("bad-key");
    std::fs::write(&bad_key, "dG9vIHNob3J0").unwrap();
    let out = run_binary(
        BINARY,
        &[],
        &fixture.env(&[("VAULT_MASTER_KEY_FILE", bad_key.to_str().unwrap())]),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VAULT_MASTER_KEY_FILE"));
}

#[tokio::test]
async fn init_refuses_a_second_run_and_the_vault_refuses_to_start_uninitialized() {
    let fixture = Fixture::new(Backend::Sqlite);
    let again = fixture.dir.path().join("again");
    let out = run_binary(
        BINARY,
        &["init", "--out", again.to_str().unwrap()],
        &fixture.env(&[]),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already initialized"));
    assert!(
        !again.exists() || std::fs::read_dir(&again).unwrap().next().is_none(),
        "no token files"
    );

    let fresh = common::testing::TestDb::sqlite();
    let env = fixture.env(&[("DATABASE_URL", fresh.url.expose())]);
    let out = run_binary(BINARY, &[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not initialized"));
}

/// `issue-admin-token` mints a new admin token from the master key and the database: it
/// works at once, can revoke the old one, is recorded, and never reaches stdout.
#[tokio::test]
async fn an_operator_can_issue_a_new_admin_token_and_revoke_the_old_one() {
    let fixture = Fixture::new(Backend::Sqlite);
    let path = fixture.dir.path().join("new-admin-token");
    let out = run_binary(
        BINARY,
        &["issue-admin-token", "--out", path.to_str().unwrap()],
        &fixture.env(&[]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&path), 0o600);
    let new_admin = std::fs::read_to_string(&path).unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&new_admin));
    // A file already there is never overwritten.
    let again = run_binary(
        BINARY,
        &["issue-admin-token", "--out", path.to_str().unwrap()],
        &fixture.env(&[]),
    );
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), new_admin);

    let vault = fixture.start().await;
    let old_admin = fixture.admin();
    let old_id = token_id(old_admin);
    // The admin tokens still valid are listed by id, to revoke one that leaked.
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(&format!("  {old_id} issued ")), "{listed}");
    assert!(
        !listed.contains(&format!("  {} issued ", token_id(&new_admin))),
        "{listed}"
    );
    let revoked = vault
        .call(
            "DELETE",
            &format!("/api/tokens/{old_id}"),
            Some(&new_admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, 204, "{:?}", revoked.json());
    assert_eq!(vault.get("/api/audit?limit=1", old_admin).await.status, 401);
    let audit = vault.get("/api/audit?limit=1000", &new_admin).await;
    assert_eq!(audit.status, 200);
    let issued: Vec<_> = audit.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "token.issue")
        .map(|r| (r["actor"].clone(), r["outcome"].clone()))
        .collect();
    assert_eq!(issued, [("operator (cli)".into(), "success".into())]);
    vault.assert_never_logged(&[&new_admin]);
}

/// The `jti` of a token, from its payload (no check of the signature: the vault does it).
fn token_id(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&json).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

both_backends!(migrations_apply, |backend| async move {
    check_migrations(
        &credential_vault::MIGRATIONS,
        backend,
        &[
            "credentials",
            "credential_versions",
            "sealed_keys",
            "tokens",
            "audit_log",
        ],
    )
    .await;
});
