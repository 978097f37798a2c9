//! The registry client every service uses, against real registry processes.

use std::time::Duration;

use common::registration::{Registration, RegistryClient};
use common::secret::Secret;
use common::testing::{ServiceProcess, TestDb, VaultFixture};
use serde_json::json;

use crate::support::{BINARY, eventually};

#[tokio::test]
async fn the_client_registers_heartbeats_comes_back_after_a_registry_that_forgot_and_deregisters() {
    let vault = VaultFixture::start().await;
    vault
        .create_credential("payments", "api-key", json!("k-1"))
        .await;
    let token = vault.issue("payments").await;
    let port = testkit::free_port().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let vault_url = vault.url();
    let registry_env = |db: &TestDb| {
        vec![
            ("DATABASE_URL".to_owned(), db.url.expose().to_owned()),
            ("VAULT_URL".to_owned(), vault_url.clone()),
            ("HEARTBEAT_INTERVAL".to_owned(), "200ms".to_owned()),
        ]
    };
    let spawn = |env: &Vec<(String, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ServiceProcess::spawn_at(BINARY, addr, &env)
    };
    let first_db = TestDb::sqlite();
    let mut registry = spawn(&registry_env(&first_db));
    registry.wait_healthy().await;

    let client = RegistryClient::new(
        &registry.url(""),
        Secret::new(token.clone()),
        Registration {
            name: "payments".into(),
            version: "2.0.0".into(),
            address: "127.0.0.1".into(),
            port: 9200,
            health_endpoint: "/health".into(),
            instance_id: "payments-a".into(),
            credentials_needed: vec!["api-key".into()],
            dependencies: vec![],
            tags: vec![],
            routes: vec![],
        },
    );
    let mut credentials = client.credentials();
    let heartbeats = client.start();
    let http = common::client::HttpClient::new(Duration::from_secs(5));
    let discover = |url: String| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            let request = http::Request::get(format!("{url}/api/discover?service=payments"))
                .header("authorization", format!("Bearer {token}"))
                .body(bytes::Bytes::new())
                .unwrap();
            http.send(request)
                .await
                .map(|r| r.status.as_u16())
                .unwrap_or(0)
        }
    };
    eventually(Duration::from_secs(5), "the first registration", || async {
        discover(registry.url("")).await == 200
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(5),
        credentials.wait_for(|c| c.get("api-key") == Some(&json!("k-1"))),
    )
    .await
    .unwrap()
    .unwrap();
    // Heartbeats keep it healthy well past the TTL (600 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(discover(registry.url("")).await, 200);

    // The registry comes back on the same address with no memory of the instance.
    registry.terminate();
    let second_db = TestDb::sqlite();
    let mut registry = spawn(&registry_env(&second_db));
    registry.wait_healthy().await;
    eventually(Duration::from_secs(10), "registering again", || async {
        discover(registry.url("")).await == 200
    })
    .await;

    heartbeats.abort();
    client.deregister().await.unwrap();
    assert_eq!(discover(registry.url("")).await, 404);
}

#[tokio::test]
async fn a_rotated_credential_reaches_the_client_through_its_event() {
    let redis = common::testing::redis_url();
    let vault = VaultFixture::start_with(&[("REDIS_URL", &redis)]).await;
    let id = vault
        .create_credential("payments", "api-key", json!("old-key"))
        .await;
    let token = vault.issue("payments").await;
    let db = TestDb::sqlite();
    let registry =
        crate::support::Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
    let client = RegistryClient::new(
        &registry.process.url(""),
        Secret::new(token),
        Registration {
            name: "payments".into(),
            version: "1".into(),
            address: "127.0.0.1".into(),
            port: 9400,
            health_endpoint: "/health".into(),
            instance_id: "payments-r".into(),
            credentials_needed: vec!["api-key".into()],
            dependencies: vec![],
            tags: vec![],
            routes: vec![],
        },
    );
    let url = common::config::RedisUrl::parse(Secret::new(redis)).unwrap();
    let metrics = events::EventMetrics::new(&prometheus::Registry::new()).unwrap();
    let _refresh = events::refresh_credentials_on_rotation(
        client.clone(),
        Some(&url),
        Duration::from_secs(60),
        metrics,
    )
    .unwrap();
    let _heartbeats = client.start();
    let mut credentials = client.credentials();
    tokio::time::timeout(
        Duration::from_secs(5),
        credentials.wait_for(|c| c.get("api-key") == Some(&json!("old-key"))),
    )
    .await
    .unwrap()
    .unwrap();
    // Give the subscriber a moment to be subscribed, then rotate.
    tokio::time::sleep(Duration::from_millis(300)).await;
    vault.rotate(&id, json!("new-key")).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        credentials.wait_for(|c| c.get("api-key") == Some(&json!("new-key"))),
    )
    .await
    .expect("the rotation did not reach the client")
    .unwrap();
}

#[tokio::test]
async fn a_concierge_service_registers_itself_even_when_the_registry_comes_up_later() {
    let vault = VaultFixture::start().await;
    let gateway_binary = common::testing::workspace_binary("gateway");
    let registry_addr = std::net::SocketAddr::from(([127, 0, 0, 1], testkit::free_port().unwrap()));
    let registry_url = format!("http://{registry_addr}");
    let token_file = vault.token_file("gateway");
    // The gateway starts first: no registry yet, and it serves all the same.
    let mut gateway = ServiceProcess::spawn(
        gateway_binary.to_str().unwrap(),
        &[
            ("REGISTRY_URL", &registry_url),
            ("TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    );
    gateway.wait_healthy().await;

    let db = TestDb::sqlite();
    let vault_url = vault.url();
    let mut registry = ServiceProcess::spawn_at(
        BINARY,
        registry_addr,
        &[
            ("DATABASE_URL", db.url.expose()),
            ("VAULT_URL", &vault_url),
            ("HEARTBEAT_INTERVAL", "1s"),
        ],
    );
    registry.wait_healthy().await;
    let http = common::client::HttpClient::new(Duration::from_secs(5));
    let admin = vault.token("admin").to_owned();
    let gateway_instances = || {
        let (http, admin, url) = (http.clone(), admin.clone(), registry_url.clone());
        async move {
            let request = http::Request::get(format!("{url}/api/services/gateway"))
                .header("authorization", format!("Bearer {admin}"))
                .body(bytes::Bytes::new())
                .unwrap();
            let answer = http.send(request).await.unwrap();
            (answer.status.as_u16(), answer.json())
        }
    };
    eventually(
        Duration::from_secs(15),
        "the gateway registering itself",
        || async { gateway_instances().await.0 == 200 },
    )
    .await;
    let (_, view) = gateway_instances().await;
    assert_eq!(view["instances"][0]["port"], gateway.addr.port());
    assert_eq!(view["instances"][0]["tags"], json!(["control-plane"]));

    // A graceful stop deregisters.
    assert!(gateway.terminate().success());
    assert_eq!(gateway_instances().await.0, 404);
    assert!(registry.terminate().success());
}
