//! The OpenAPI document is served, and every operation it describes is a real route.

use common::db::Backend;

use crate::support::Fixture;

#[tokio::test]
async fn every_documented_operation_is_served() {
    let fixture = Fixture::new(Backend::Sqlite);
    let vault = fixture.start().await;
    let admin = fixture.admin().to_owned();
    let document = vault.call("GET", "/api/openapi.json", None, None).await;
    assert_eq!(document.status, 200);
    let document = document.json();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));

    let mut operations = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete", "patch"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            operations += 1;
            assert!(
                operation["responses"].is_object(),
                "{method} {path} has no responses"
            );
            let concrete = path
                .replace("{id}", &uuid::Uuid::new_v4().to_string())
                .replace("{name}", "payments");
            let body = matches!(method, "post" | "put").then(|| serde_json::json!({}));
            let answer = vault
                .call(&method.to_uppercase(), &concrete, Some(&admin), body)
                .await;
            let json = answer.json();
            let unrouted = answer.status == 404
                && json["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("no route"));
            assert!(
                !unrouted && answer.status != 405,
                "{method} {path} is documented but not served ({})",
                answer.status
            );
        }
    }
    // The routes of api::routes plus /health, /ready and /metrics.
    assert_eq!(operations, 19);
}
