//! `/ready` follows the database: red while PostgreSQL is stopped, green again after, with
//! no restart of the service.

use std::time::Duration;

use bytes::Bytes;
use common::client::HttpClient;
use common::db::DatabaseUrl;
use common::secret::Secret;
use common::testing::ServiceProcess;
use testkit::PgCluster;

use crate::support::Fixture;

async fn ready_status(client: &HttpClient, service: &ServiceProcess) -> (u16, serde_json::Value) {
    let request = http::Request::get(service.url("/ready"))
        .body(Bytes::new())
        .unwrap();
    match client.send(request).await {
        Ok(answer) => (answer.status.as_u16(), answer.json()),
        Err(error) => panic!("/ready did not answer: {error}"),
    }
}

async fn wait_for_status(
    client: &HttpClient,
    service: &ServiceProcess,
    want: u16,
) -> serde_json::Value {
    for _ in 0..300 {
        let (status, body) = ready_status(client, service).await;
        if status == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/ready never answered {want}:\n{}", service.output());
}

#[tokio::test]
async fn ready_is_503_while_postgres_is_stopped_and_200_after_it_is_back() {
    let postgres = PgCluster::start().unwrap();
    let url = DatabaseUrl::parse(Secret::new(postgres.url("postgres"))).unwrap();
    let fixture = Fixture::on(url);
    let service = fixture.start().await.process;
    let client = HttpClient::new(Duration::from_secs(10));

    let body = wait_for_status(&client, &service, 200).await;
    assert_eq!(body["checks"]["database"], "up");

    postgres.stop().unwrap();
    let problem = wait_for_status(&client, &service, 503).await;
    assert_eq!(problem["type"], "urn:concierge:problem:not-ready");
    assert_eq!(problem["checks"]["database"], "down");
    assert_eq!(problem["detail"], "down: database");
    // Liveness is not readiness: the process itself is fine.
    let health = client
        .get_json::<serde_json::Value>(&service.url("/health"))
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");

    postgres.start_server().unwrap();
    let body = wait_for_status(&client, &service, 200).await;
    assert_eq!(body["checks"]["database"], "up");
    assert!(
        !service.output().contains("panicked"),
        "{}",
        service.output()
    );
}
