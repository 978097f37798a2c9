//! What every service does: configuration errors, healthcheck, SIGTERM, migrations.

use common::both_backends;
use common::db::Backend;
use common::testing::{check_binary_basics, check_migrations, run_binary};

use crate::support::{BINARY, Fixture};

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
