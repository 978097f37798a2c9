//! The hyper server the gateway runs: the same shared routes, ids and shutdown behaviour.

use std::time::Duration;

use bytes::Bytes;
use common::hyper_server::{self, Arrival, Builtins, Routed};
use common::readiness::Readiness;
use http::Request;

use super::{client, sigterm_self, wait_until_up};

async fn start(
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let registry = common::metrics::new_registry();
    let builtins = Builtins::new(registry.clone(), readiness);
    let handler = move |req: Request<hyper::body::Incoming>, _: Arrival| {
        let builtins = builtins.clone();
        async move {
            if let Some(routed) = builtins.respond(req.method(), req.uri().path()).await {
                return routed;
            }
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let response = http::Response::new(hyper_server::full("finished"));
                return Routed::new(response, "/slow");
            }
            Routed::unmatched(common::problem::Problem::not_found("nothing here").to_hyper())
        }
    };
    let server = tokio::spawn(async move {
        hyper_server::serve(
            listener,
            &registry,
            handler,
            shutdown,
            &hyper_server::ServerOptions {
                drain: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await
    });
    wait_until_up(&format!("{base}/health")).await;
    (base, server)
}

fn get(url: String) -> Request<Bytes> {
    Request::get(url).body(Bytes::new()).unwrap()
}

#[tokio::test]
async fn shared_routes_and_request_ids() {
    let readiness = Readiness::new().with_check("redis", || async { Err("refused".to_owned()) });
    let (base, server) = start(readiness, std::future::pending()).await;
    let client = client();

    let ready = client.send(get(format!("{base}/ready"))).await.unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["redis"], "down");
    assert_eq!(
        ready.header("content-type"),
        Some("application/problem+json")
    );

    let mut with_id = get(format!("{base}/elsewhere"));
    with_id
        .headers_mut()
        .insert("x-request-id", "bad id with spaces".parse().unwrap());
    let missing = client.send(with_id).await.unwrap();
    assert_eq!(missing.status, 404);
    let id = missing.header("x-request-id").unwrap();
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "a malformed id is replaced: {id}"
    );

    let post = Request::post(format!("{base}/metrics"))
        .body(Bytes::new())
        .unwrap();
    assert_eq!(client.send(post).await.unwrap().status, 405);

    let metrics = client.send(get(format!("{base}/metrics"))).await.unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains(
            r#"concierge_http_requests_total{method="GET",route="/ready",status="503"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"route="unmatched",status="404"} 1"#),
        "{text}"
    );
    server.abort();
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish() {
    let (base, server) = start(Readiness::new(), common::shutdown::signal_received()).await;
    let slow_url = format!("{base}/slow");
    let slow = tokio::spawn(async move { client().send(get(slow_url)).await });
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
    // And it no longer accepts connections.
    assert!(client().send(get(format!("{base}/health"))).await.is_err());
}

#[tokio::test]
async fn a_drain_does_not_wait_for_a_client_that_sent_nothing() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (base, server) = start(Readiness::new(), async move {
        let _ = stopped.await;
    })
    .await;
    // Connected, silent: a preconnect, say. The header-read timeout is 10 s.
    let address = base.trim_start_matches("http://").to_owned();
    let _silent = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), server).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the drain waited for a silent client: {ended:?}"
    );
}
