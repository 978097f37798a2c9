//! Failures upstream: a killed instance, circuits that open and recover by themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::testing::{ServiceProcess, dark_port};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::support::{GATEWAY, Stack, Upstream, burst, get, instance_status, metric};

#[tokio::test]
async fn a_killed_instance_costs_no_failed_get_and_gets_nothing_once_its_circuit_is_open() {
    killed_instance("http1").await;
}

/// The same over h2c, where every request in flight to the instance dies with its one
/// connection.
#[tokio::test]
async fn a_killed_h2c_instance_costs_no_failed_get_either() {
    killed_instance("h2c").await;
}

async fn killed_instance(protocol: &str) {
    // A long cool-down: the dead instance must not even be probed during the test.
    let stack = Stack::start(&[
        ("CIRCUIT_COOLDOWN", "5m"),
        ("CIRCUIT_MAX_COOLDOWN", "5m"),
        ("UPSTREAM_PROTOCOL", protocol),
    ])
    .await;
    // Three real processes as the instances (gateways with no routes answer /health).
    let mut instances = Vec::new();
    for i in 0..3 {
        let mut process = ServiceProcess::spawn(GATEWAY, &[]);
        process.wait_healthy().await;
        stack
            .register("echo", &format!("e-{i}"), process.addr.port(), json!({}))
            .await;
        instances.push(process);
    }
    stack.wait_for("/echo/health", 200).await;
    // Our own services speak HTTP/1.1 whatever UPSTREAM_PROTOCOL says.
    let services = stack.get_as("/api/services", stack.admin()).await;
    assert_eq!(services.status, 200, "{:?}", services.json());

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = stack.client.clone();
        let gateway = stack.gateway.url("");
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = http::Request::get(format!("{gateway}/echo/health"))
                    .body(bytes::Bytes::new())
                    .unwrap();
                match client.send(request).await {
                    Ok(answer) if answer.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = ok.load(Ordering::Relaxed);
    drop(instances.remove(1)); // SIGKILL
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let status = stack.status().await;
    let dead = instance_status(&status, "echo", "e-1");
    assert_eq!(dead["circuit"], "open", "{dead:#}");
    let requests_when_open = dead["requests"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let status = stack.status().await;
    assert_eq!(
        instance_status(&status, "echo", "e-1")["requests"]
            .as_u64()
            .unwrap(),
        requests_when_open,
        "the dead instance was sent requests after its circuit opened"
    );
    let total = ok.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed GETs ({total} succeeded)"
    );
    if protocol == "h2c" {
        // Four clients at once, yet one connection from the gateway (and this scrape's).
        for survivor in &instances {
            let metrics = get(&stack.client, survivor, "/metrics", None).await;
            let page = String::from_utf8_lossy(&metrics.body).into_owned();
            assert_eq!(
                metric(&page, "concierge_http_connections_open"),
                Some(2.0),
                "{page}"
            );
        }
    }
    assert!(
        total > before_kill + 100,
        "the client kept going after the kill: {before_kill} → {total}"
    );
    let metrics = get(&stack.client, &stack.gateway, "/metrics", None).await;
    let page = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(
        metric(
            &page,
            r#"concierge_gateway_circuit_state{instance_id="e-1",service="echo"}"#
        ),
        Some(2.0)
    );
}

/// A gateway whose circuits open after 3 failures, cool down for 1 s and close after 2
/// good probes, and one instance of `flaky` behind it, routed.
async fn flaky_stack() -> (Stack, Upstream) {
    let stack = Stack::start(&[
        ("CIRCUIT_FAILURES", "3"),
        ("CIRCUIT_COOLDOWN", "1s"),
        ("CIRCUIT_PROBES", "2"),
    ])
    .await;
    let flaky = Upstream::start("flaky").await;
    stack.register("flaky", "f-1", flaky.port, json!({})).await;
    stack.wait_for("/flaky/flaky", 200).await;
    (stack, flaky)
}

#[tokio::test]
async fn a_circuit_opens_half_opens_and_closes_with_its_metric() {
    let (stack, flaky) = flaky_stack().await;
    let state = || async {
        let page = get(&stack.client, &stack.gateway, "/metrics", None).await;
        metric(
            &String::from_utf8_lossy(&page.body),
            r#"concierge_gateway_circuit_state{instance_id="f-1",service="flaky"}"#,
        )
    };
    assert_eq!(state().await, Some(0.0));

    flaky.failing.store(true, Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(
            stack.get("/flaky/flaky").await.status,
            500,
            "passed through as it is"
        );
    }
    assert_eq!(state().await, Some(2.0));
    let hits = flaky.hits.load(Ordering::Relaxed);
    let refused = stack.get("/flaky/flaky").await;
    assert_eq!(refused.status, 503);
    assert_eq!(
        flaky.hits.load(Ordering::Relaxed),
        hits,
        "an open circuit sends nothing"
    );

    // After the cool-down, probes go through; two successes close the circuit.
    flaky.failing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(stack.get("/flaky/flaky").await.status, 200);
    assert_eq!(state().await, Some(1.0), "half-open after one good probe");
    assert_eq!(stack.get("/flaky/flaky").await.status, 200);
    assert_eq!(state().await, Some(0.0));
    let page = get(&stack.client, &stack.gateway, "/metrics", None).await;
    let page = String::from_utf8_lossy(&page.body).into_owned();
    for (state, times) in [("open", 1.0), ("half_open", 1.0), ("closed", 1.0)] {
        assert_eq!(
            metric(
                &page,
                &format!(
                    r#"concierge_gateway_circuit_transitions_total{{service="flaky",state="{state}"}}"#
                )
            ),
            Some(times),
            "{state}"
        );
    }
}

/// An h2c instance that refuses every stream (RST_STREAM REFUSED_STREAM), as one shedding
/// load or shutting down does: nothing it refused was processed.
async fn refusing_h2c_instance() -> u16 {
    h2_only_instance(|mut respond| respond.send_reset(h2::Reason::REFUSED_STREAM)).await
}

/// An instance that speaks HTTP/2 alone, and answers every stream with `answer`.
async fn h2_only_instance(answer: fn(h2::server::SendResponse<bytes::Bytes>)) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_request, respond))) = connection.accept().await {
                    answer(respond);
                }
            });
        }
    });
    port
}

/// A refused stream never reached the application, so even a POST goes to another instance.
#[tokio::test]
async fn a_refused_h2c_stream_is_retried_elsewhere_whatever_the_method() {
    let stack = Stack::start(&[("UPSTREAM_PROTOCOL", "h2c")]).await;
    let good = Upstream::start("good").await;
    stack
        .register(
            "jobs",
            "j-refusing",
            refusing_h2c_instance().await,
            json!({}),
        )
        .await;
    stack.register("jobs", "j-good", good.port, json!({})).await;
    stack.wait_for("/jobs/x", 200).await;

    for _ in 0..6 {
        let request = http::Request::post(stack.gateway.url("/jobs/run"))
            .body(bytes::Bytes::new())
            .unwrap();
        let answer = stack.client.send(request).await.unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.json());
        assert_eq!(answer.json()["instance"], "good");
        assert_eq!(answer.json()["method"], "POST");
    }
    let metrics = get(&stack.client, &stack.gateway, "/metrics", None).await;
    let page = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metric(
            &page,
            r#"concierge_gateway_retries_total{reason="refused",service="jobs"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{page}"
    );
}

/// The requests that wait for a connection being made to an h2c instance fail with it and
/// go elsewhere, rather than each trying again, one connect timeout after another.
#[tokio::test]
async fn requests_waiting_on_a_dark_h2c_instance_fail_over_together() {
    let dir = testkit::TempDir::new("gateway-dark").unwrap();
    let routes = crate::support::routes_file(
        &dir,
        json!({"routes": [{"prefix": "/reports", "upstream_protocol": "h2c",
                           "connect_timeout": "1s", "timeout": "3s"}]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let (_listener, _queued, dark) = dark_port().await;
    let good = Upstream::start("good").await;
    stack.register("reports", "r-dark", dark, json!({})).await;
    stack
        .register("reports", "r-good", good.port, json!({}))
        .await;
    stack.wait_until_listed("r-dark").await;
    stack.wait_until_listed("r-good").await;
    // Round robin sends half of them to the dark instance, all waiting for its one
    // connection. One after another, the fourth would be past the 3 s request timeout.
    for answer in burst(&stack, &[&stack.gateway], "/reports/daily", None, 16).await {
        assert_eq!(answer.status, 200, "{:?}", answer.json());
        assert_eq!(answer.json()["instance"], "good");
    }
}

/// An instance that serves one request per connection and keeps it open, then reads the
/// next request on it and closes it unanswered: what an instance does when its keep-alive
/// timeout closes a connection just as the gateway sends on it. Counts connections.
async fn closing_after_one_request() -> (u16, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicU64::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // The next request arrives as the instance gives up on the connection.
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    (port, connections)
}

/// A GET that meets a connection the instance closed as it was sent goes again on a new
/// one, even with no other instance to try; a POST does not, as it may have been acted on.
#[tokio::test]
async fn a_get_on_a_connection_closed_under_it_goes_again_on_a_new_one() {
    let stack = Stack::start(&[("UPSTREAM_IDLE_TIMEOUT", "1m")]).await;
    let (port, connections) = closing_after_one_request().await;
    stack.register("brief", "b-1", port, json!({})).await;
    stack.wait_for("/brief/x", 200).await;
    for round in 0..3 {
        // Unused long enough for an instance's keep-alive timeout to have run out.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let answer = stack.get("/brief/again").await;
        assert_eq!(answer.status, 200, "round {round}: {:?}", answer.json());
    }
    assert_eq!(connections.load(Ordering::Relaxed), 4);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let request = http::Request::post(stack.gateway.url("/brief/act"))
        .body(bytes::Bytes::new())
        .unwrap();
    let answer = stack.client.send(request).await.unwrap();
    assert_eq!(answer.status, 502, "{:?}", answer.json());
}

/// A half-open circuit's probes whose clients go away before the answer teach nothing of
/// the instance: their slots come back, and the next request probes.
#[tokio::test]
async fn probes_whose_clients_go_away_leave_the_circuit_able_to_close() {
    let (stack, flaky) = flaky_stack().await;
    flaky.failing.store(true, Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(stack.get("/flaky/flaky").await.status, 500);
    }
    assert_eq!(stack.get("/flaky/flaky").await.status, 503, "open");
    flaky.failing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Both probe slots go to slow requests whose clients hang up.
    for _ in 0..2 {
        let hits = flaky.hits.load(Ordering::Relaxed);
        let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
            .await
            .unwrap();
        socket
            .write_all(b"GET /flaky/sleep/5000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        while flaky.hits.load(Ordering::Relaxed) == hits {
            assert!(started.elapsed() < Duration::from_secs(5), "never probed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(socket);
    }
    // The gateway has seen both clients go once nothing is in flight to the instance.
    let started = std::time::Instant::now();
    while instance_status(&stack.status().await, "flaky", "f-1")["in_flight"] != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stack.get("/flaky/flaky").await.status, 200, "probed again");
    assert_eq!(stack.get("/flaky/flaky").await.status, 200);
    let status = stack.status().await;
    assert_eq!(
        instance_status(&status, "flaky", "f-1")["circuit"],
        "closed"
    );
}

/// A client's broken request body is the client's failure, not the instance's: it gets a
/// 400, and no number of them opens a healthy instance's circuit.
#[tokio::test]
async fn broken_request_bodies_never_open_a_circuit() {
    for protocol in ["http1", "h2c"] {
        let stack =
            Stack::start(&[("CIRCUIT_FAILURES", "3"), ("UPSTREAM_PROTOCOL", protocol)]).await;
        let echo = Upstream::start("echo").await;
        stack.register("echo", "e-1", echo.port, json!({})).await;
        stack.wait_for("/echo/x", 200).await;
        for _ in 0..5 {
            let status = crate::edge::raw_status(
                &stack,
                b"POST /echo/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\nzz-not-a-size\r\n\r\n",
            )
            .await;
            assert_eq!(status, 400, "{protocol}: {}", stack.gateway.output());
        }
        assert_eq!(stack.get("/echo/x").await.status, 200, "{protocol}");
        let status = stack.status().await;
        assert_eq!(
            instance_status(&status, "echo", "e-1")["circuit"],
            "closed",
            "{protocol}"
        );
    }
}

/// An instance's 503 reaches the client when no other instance can take the request on,
/// rather than a 502 the gateway makes up.
#[tokio::test]
async fn a_503_reaches_the_client_when_no_other_instance_can_take_the_request() {
    let stack = Stack::start(&[]).await;
    let busy = Upstream::start("busy").await;
    let spare = Upstream::start("spare").await;
    stack.register("busy", "b-1", busy.port, json!({})).await;
    stack.register("busy", "b-2", spare.port, json!({})).await;
    stack.set_health("busy", "b-2", "offline").await;
    let mut in_a_row = 0;
    let started = std::time::Instant::now();
    while in_a_row < 10 {
        assert!(started.elapsed() < Duration::from_secs(5), "b-2 still used");
        let answer = stack.get("/busy/x").await;
        in_a_row = if answer.status == 200 && answer.json()["instance"] == "busy" {
            in_a_row + 1
        } else {
            0
        };
    }
    let (busy_hits, spare_hits) = (
        busy.hits.load(Ordering::Relaxed),
        spare.hits.load(Ordering::Relaxed),
    );
    let answer = stack.get("/busy/status/503").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body.len(), 0, "the instance's answer, not a problem");
    assert_eq!(busy.hits.load(Ordering::Relaxed), busy_hits + 1);
    assert_eq!(spare.hits.load(Ordering::Relaxed), spare_hits);
    // No instance took it again: no retry counted, none taken from the budget.
    let page = get(&stack.client, &stack.gateway, "/metrics", None).await;
    let page = String::from_utf8_lossy(&page.body);
    assert_eq!(
        metric(
            &page,
            r#"concierge_gateway_retries_total{reason="status_503",service="busy"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{page}"
    );
}

/// An upgrade goes over HTTP/1.1 even on an h2c route; an instance that speaks HTTP/2 alone
/// fails it, and that must not open its circuit: any client could shut the route.
#[tokio::test]
async fn upgrades_an_h2c_instance_cannot_take_never_open_its_circuit() {
    let stack = Stack::start(&[("CIRCUIT_FAILURES", "3"), ("UPSTREAM_PROTOCOL", "h2c")]).await;
    let port = h2_only_instance(|mut respond| {
        let _ = respond.send_response(http::Response::new(()), true);
    })
    .await;
    stack.register("grpc", "g-1", port, json!({})).await;
    stack.wait_for("/grpc/x", 200).await;
    for _ in 0..5 {
        let status = crate::edge::raw_status(
            &stack,
            b"GET /grpc/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await;
        assert_eq!(status, 502);
    }
    assert_eq!(stack.get("/grpc/x").await.status, 200);
    let status = stack.status().await;
    assert_eq!(instance_status(&status, "grpc", "g-1")["circuit"], "closed");
}

/// A request with a body goes once, but a connect error hands it back unsent: another
/// instance takes it, and the client never learns an instance was down.
#[tokio::test]
async fn a_request_body_goes_to_another_instance_when_the_first_cannot_be_reached() {
    let stack = Stack::start(&[]).await;
    let up = Upstream::start("up").await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    stack.register("store", "s-1", up.port, json!({})).await;
    stack.register("store", "s-2", closed, json!({})).await;
    // Both routed, neither tried yet (a GET could find s-2 down first).
    let started = std::time::Instant::now();
    loop {
        let status = stack.status().await;
        let routed = status["services"].as_array().unwrap().iter().any(|s| {
            s["name"] == "store" && s["instances"].as_array().is_some_and(|i| i.len() == 2)
        });
        if routed {
            assert_eq!(
                instance_status(&status, "store", "s-2")["circuit"],
                "closed"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..4 {
        let request = http::Request::post(stack.gateway.url("/store/upload"))
            .body(bytes::Bytes::from(vec![b'x'; 100_000]))
            .unwrap();
        let answer = stack.client.send(request).await.unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.json());
        assert_eq!(answer.json()["received"], 100_000);
    }
    let status = stack.status().await;
    assert_eq!(
        instance_status(&status, "store", "s-2")["circuit"],
        "open",
        "the down instance was tried"
    );
}
