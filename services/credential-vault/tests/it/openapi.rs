//! The OpenAPI document is served, and every operation it describes is a real route.

use common::db::Backend;

use crate::support::Fixture;

#[tokio::test]
async fn every_documented_operation_is_served() {
    let fixture = Fixture::new(Backend::Sqlite);
    let vault = fixture.start().await;
    // The routes of api::routes plus /health, /ready and /metrics.
    common::testing::check_openapi_routes(&vault.process.url(""), fixture.admin(), 19).await;
}
