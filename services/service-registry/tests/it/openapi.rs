//! The OpenAPI document is served, and every operation it describes is a real route.

use common::testing::{TestDb, VaultFixture};

use crate::support::Registry;

#[tokio::test]
async fn every_documented_operation_is_served() {
    let vault = VaultFixture::start().await;
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[]).await;
    // The routes of api::routes plus /health, /ready and /metrics.
    common::testing::check_openapi_routes(&registry.process.url(""), vault.token("admin"), 17)
        .await;
}
