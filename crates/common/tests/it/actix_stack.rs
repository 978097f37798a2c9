//! The actix-web server every API service runs: shared routes, problems, limits, shutdown.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use bytes::Bytes;
use common::http::{ServerSettings, serve};
use common::readiness::Readiness;
use http::Request;

use super::{client, sigterm_self, wait_until_up};

fn settings(readiness: Readiness) -> ServerSettings {
    ServerSettings {
        registry: common::metrics::new_registry(),
        readiness,
        max_body_bytes: 1024,
        workers: 1,
        shutdown_timeout: Duration::from_secs(10),
    }
}

fn routes(config: &mut web::ServiceConfig) {
    config
        .route(
            "/slow",
            web::get().to(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                HttpResponse::Ok().body("finished")
            }),
        )
        .route(
            "/items/{id}",
            web::post().to(
                |id: web::Path<u32>, body: web::Json<serde_json::Value>| async move {
                    HttpResponse::Ok()
                        .json(serde_json::json!({ "id": *id, "body": body.into_inner() }))
                },
            ),
        )
        .service(
            common::http::resource("/things/{id}")
                .route(web::get().to(|id: web::Path<u32>| async move { id.to_string() })),
        );
}

fn listener() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    (listener, base)
}

fn post(url: &str, body: impl Into<Bytes>) -> Request<Bytes> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

#[tokio::test]
async fn shared_routes_problems_and_limits() {
    let (listener, base) = listener();
    let readiness = Readiness::new().with_check("database", || async { Err("refused".to_owned()) });
    let server = tokio::spawn(serve(
        settings(readiness),
        listener,
        routes,
        std::future::pending(),
    ));
    wait_until_up(&format!("{base}/health")).await;
    let client = client();

    let ready = client
        .send(
            Request::get(format!("{base}/ready"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(ready.json()["type"], "urn:concierge:problem:not-ready");
    assert_eq!(ready.json()["checks"]["database"], "down");

    let ok = client
        .send(post(&format!("{base}/items/7"), r#"{"a":1}"#))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["id"], 7);
    assert!(uuid::Uuid::parse_str(ok.header("x-request-id").unwrap()).is_ok());

    let too_big = client
        .send(post(&format!("{base}/items/7"), vec![b' '; 2048]))
        .await
        .unwrap();
    assert_eq!(too_big.status, 413);
    assert_eq!(
        too_big.json()["type"],
        "urn:concierge:problem:payload-too-large"
    );

    let malformed = client
        .send(post(&format!("{base}/items/7"), "{nope"))
        .await
        .unwrap();
    assert_eq!(malformed.status, 400);
    assert_eq!(
        malformed.json()["type"],
        "urn:concierge:problem:malformed-json"
    );

    let bad_path = client
        .send(post(&format!("{base}/items/seven"), "{}"))
        .await
        .unwrap();
    assert_eq!(bad_path.status, 400);
    assert_eq!(
        bad_path.json()["type"],
        "urn:concierge:problem:invalid-path"
    );

    let mut with_id = Request::get(format!("{base}/nowhere"))
        .body(Bytes::new())
        .unwrap();
    with_id
        .headers_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    let missing = client.send(with_id).await.unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("x-request-id"), Some("trace-me-42"));
    assert_eq!(missing.json()["type"], "urn:concierge:problem:not-found");

    // A labelled resource: its template names it in the metrics without a second
    // match, and a wrong method is a 405 problem.
    let thing = client
        .send(
            Request::get(format!("{base}/things/7"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(thing.status, 200);
    assert_eq!(thing.body.as_ref(), b"7");
    let wrong = client
        .send(
            Request::delete(format!("{base}/things/7"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(wrong.status, 405);
    assert_eq!(
        wrong.json()["type"],
        "urn:concierge:problem:method-not-allowed"
    );

    let metrics = client
        .send(
            Request::get(format!("{base}/metrics"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains(
            r#"concierge_http_requests_total{method="POST",route="/items/{id}",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/items/{id}",status="413"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="unmatched",status="404"} 1"#),
        "{text}"
    );
    for expected in [
        r#"concierge_http_requests_total{method="GET",route="/things/{id}",status="200"} 1"#,
        r#"concierge_http_requests_total{method="DELETE",route="/things/{id}",status="405"} 1"#,
        r#"concierge_http_requests_total{method="GET",route="/ready",status="503"} 1"#,
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    server.abort();
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish() {
    let (listener, base) = listener();
    let server = tokio::spawn(serve(
        settings(Readiness::new()),
        listener,
        routes,
        common::shutdown::signal_received(),
    ));
    wait_until_up(&format!("{base}/health")).await;
    let slow = tokio::spawn(async move {
        client()
            .send(
                Request::get(format!("{base}/slow"))
                    .body(Bytes::new())
                    .unwrap(),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm_self();
    let answer = slow
        .await
        .unwrap()
        .expect("the in-flight request must complete");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "finished");
    let stopped = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the server should stop cleanly: {stopped:?}"
    );
}
