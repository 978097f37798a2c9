//! What every service does: configuration errors, healthcheck, SIGTERM, migrations.

use common::both_backends;
use common::testing::{TestDb, check_binary_basics, check_migrations};

const BINARY: &str = env!("CARGO_BIN_EXE_health-monitor");

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
        &health_monitor::MIGRATIONS,
        backend,
        &["alerts", "recovery_attempts"],
    )
    .await;
});
