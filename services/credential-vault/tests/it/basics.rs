//! What every service does: configuration errors, healthcheck, SIGTERM, migrations.

use common::both_backends;
use common::testing::{TestDb, check_binary_basics, check_migrations};

const BINARY: &str = env!("CARGO_BIN_EXE_credential-vault");

#[tokio::test]
async fn the_binary_validates_config_answers_healthcheck_and_stops_on_sigterm() {
    let db = TestDb::sqlite();
    check_binary_basics(
        BINARY,
        &[("DATABASE_URL", db.url.expose())],
        &["DATABASE_URL"],
    )
    .await;
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
