//! The edge: header hygiene, tokens, bad input, and the gateway's own endpoints.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Stack, Upstream, get, metric, raw_exchange, routes_file, wait_for};

#[tokio::test]
async fn hop_by_hop_headers_go_forged_identity_goes_request_ids_stay() {
    let dir = testkit::TempDir::new("gateway-routes").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [{"prefix": "/private", "require_token": true}]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let echo = Upstream::start("echo").await;
    stack.register("echo", "e-1", echo.port, json!({})).await;
    stack.register("private", "p-1", echo.port, json!({})).await;
    stack.wait_for("/echo/x", 200).await;
    stack.wait_for("/private/x", 401).await;

    let request = http::Request::get(stack.gateway.url("/echo/x"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-concierge-subject", "admin")
        .header("X_Concierge_Subject", "admin")
        .header("x_forwarded_for", "198.51.100.6")
        .header("x_app_flag", "1")
        .header("x-request-id", "client-chosen-id-1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("x-forwarded-for", "203.0.113.9")
        .body(bytes::Bytes::new())
        .unwrap();
    let answer = stack.client.send(request).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-request-id"), Some("client-chosen-id-1"));
    let seen = answer.json()["headers"].clone();
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "x-concierge-subject",
        // What WSGI, PHP and Rack would read as the subject and the forwarded address.
        "x_concierge_subject",
        "x_forwarded_for",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the upstream: {seen:#}"
        );
    }
    assert_eq!(
        seen["x_app_flag"], "1",
        "other names with underscores go on"
    );
    assert_eq!(seen["x-request-id"], "client-chosen-id-1");
    assert_eq!(
        seen["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], stack.gateway.addr.to_string());

    // Without an id the gateway makes one, and the upstream sees the same one.
    let answer = stack.get("/echo/x").await;
    let id = answer.header("x-request-id").unwrap().to_owned();
    assert_eq!(answer.json()["headers"]["x-request-id"], id.as_str());

    // A verified token's subject goes upstream, whatever the client claimed.
    let token = stack.vault.issue("orders").await;
    let request = http::Request::get(stack.gateway.url("/private/x"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-concierge-subject", "admin")
        .body(bytes::Bytes::new())
        .unwrap();
    let answer = stack.client.send(request).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["headers"]["x-concierge-subject"], "orders");
    assert!(
        !stack.gateway.output().contains(&token),
        "a token reached the log"
    );
}

#[tokio::test]
async fn control_plane_routes_need_a_token_and_revocations_take_hold() {
    let stack = Stack::start(&[]).await;
    let anonymous = stack.get("/api/services").await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        anonymous.json()["type"],
        "urn:concierge:problem:unauthenticated"
    );
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        stack.get_as("/api/services", "not-a-token").await.status,
        401
    );
    let listed = stack.get_as("/api/services", stack.admin()).await;
    assert_eq!(listed.status, 200, "{:?}", listed.json());
    assert!(
        listed.json()["services"].is_array(),
        "the registry answered"
    );
    let jwks = stack.get("/api/auth/jwks").await;
    assert_eq!(jwks.status, 200, "the vault's public keys need no token");
    assert!(jwks.json()["keys"].is_array());

    let issued = common::testing::send_json(
        &stack.client,
        "POST",
        &stack.vault.process.url("/api/tokens"),
        Some(stack.admin()),
        Some(json!({"service": "orders"})),
    )
    .await
    .json();
    let token = issued["token"].as_str().unwrap();
    assert_eq!(
        stack.get_as("/api/discover?service=x", token).await.status,
        404
    );
    let revoked = common::testing::send_json(
        &stack.client,
        "DELETE",
        &stack
            .vault
            .process
            .url(&format!("/api/tokens/{}", issued["id"].as_str().unwrap())),
        Some(stack.admin()),
        None,
    )
    .await;
    assert!(revoked.status.is_success());
    // Without Redis the gateway learns it on its next resync (1 s here).
    let started = std::time::Instant::now();
    while stack.get_as("/api/discover?service=x", token).await.status != 401 {
        assert!(started.elapsed() < Duration::from_secs(5), "still accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends raw bytes and reads the status line's code.
pub async fn raw_status(stack: &Stack, request: &[u8]) -> u16 {
    raw_status_from(stack, [127, 0, 0, 1], request).await
}

/// The same from another loopback address.
async fn raw_status_from(stack: &Stack, from: [u8; 4], request: &[u8]) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut socket = socket.connect(stack.gateway.addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test]
async fn bad_input_gets_a_4xx_never_a_crash() {
    let stack = Stack::start(&[]).await;
    let _echo = stack.serve("echo", "e-1").await;
    let long_path = format!("GET /echo/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let huge_header = format!(
        "GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(100_000)
    );
    let header_of = |bytes: usize| {
        format!(
            "GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "b".repeat(bytes)
        )
        .into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "dot segments",
            b"GET /echo/../secret HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "encoded dots",
            b"GET /echo/%2e%2e/secret HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "encoded slash",
            b"GET /echo%2fx HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "broken encoding",
            b"GET /echo/%zz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "asterisk",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        ("overlong path", long_path.into_bytes(), 414),
        ("huge header", huge_header.into_bytes(), 431),
        // Just over and just under the 64 KiB default, however the reads fall.
        ("header just over the limit", header_of(66 * 1024), 431),
        ("header just under the limit", header_of(60 * 1024), 200),
        (
            "invalid method",
            b"G(T /echo/x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        ("garbage", b"\x16\x03\x01 hello\r\n\r\n".to_vec(), 400),
        (
            "bad content length",
            b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".to_vec(),
            400,
        ),
        (
            "declared body too big",
            b"POST /echo/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
        ),
    ];
    for (what, request, expected) in cases {
        assert_eq!(raw_status(&stack, &request).await, expected, "{what}");
    }
    assert_eq!(stack.get("/echo/x").await.status, 200, "still serving");
    assert_eq!(stack.get("/health").await.status, 200);
}

/// Reads from `socket` until the gateway closes it; how long after `since` that came.
async fn closed_after(socket: &mut tokio::net::TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(8), socket.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was still open 8 s after the last read"),
        }
    }
}

#[tokio::test]
async fn silent_slow_and_idle_clients_are_cut_off_after_the_header_timeout() {
    // Slowloris: connections that never finish a request head must not be held.
    let stack = Stack::start(&[("HEADER_READ_TIMEOUT", "1s")]).await;
    let _echo = stack.serve("echo", "e-1").await;
    let cases: [(&str, &[u8]); 3] = [
        ("silent from the start", b""),
        (
            "a head never finished",
            b"GET /echo/x HTTP/1.1\r\nHost: x\r\n",
        ),
        (
            "idle after a request",
            b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ];
    for (what, sent) in cases {
        let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
            .await
            .unwrap();
        socket.write_all(sent).await.unwrap();
        let since = Instant::now();
        if what == "idle after a request" {
            let mut answer = [0u8; 4096];
            let read = socket.read(&mut answer).await.unwrap();
            assert!(answer[..read].starts_with(b"HTTP/1.1 200"), "{what}");
        }
        let closed = closed_after(&mut socket, since).await;
        assert!(
            closed >= Duration::from_millis(700) && closed < Duration::from_secs(5),
            "{what}: closed after {closed:?}, the timeout is 1 s"
        );
    }
    assert_eq!(stack.get("/echo/x").await.status, 200, "still serving");
}

#[tokio::test]
async fn the_status_page_and_the_proxy_endpoint() {
    let stack = Stack::start(&[]).await;
    let echo = Upstream::start("echo").await;
    stack
        .register("echo", "e-1", echo.port, json!({"weight": 3}))
        .await;
    stack.wait_for("/echo/x", 200).await;

    assert_eq!(stack.get("/api/gateway/status").await.status, 401);
    let orders = stack.vault.issue("orders").await;
    let status = stack.get_as("/api/gateway/status", &orders).await;
    assert_eq!(
        status.status, 200,
        "a service token with discover may read it"
    );
    let status = stack.status().await;
    let instance = crate::support::instance_status(&status, "echo", "e-1");
    assert_eq!(instance["circuit"], "closed");
    assert_eq!(instance["weight"], 3);
    assert_eq!(instance["in_flight"], 0);
    assert!(instance["requests"].as_u64().unwrap() >= 1);
    assert!(
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["prefix"] == "/echo" && r["strip_prefix"] == true)
    );

    let proxied = common::testing::send_json(
        &stack.client,
        "POST",
        &stack.gateway.url("/api/gateway/proxy"),
        Some(&orders),
        Some(json!({
            "service": "echo", "method": "PUT", "path": "/things/1?dry=true",
            "headers": {
                "x-custom": "yes", "x-concierge-subject": "admin", "x-forwarded-for": "10.9.9.9",
            },
            "body": {"k": 1},
        })),
    )
    .await;
    assert_eq!(proxied.status, 200, "{:?}", proxied.json());
    let seen = proxied.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/things/1?dry=true");
    assert_eq!(seen["headers"]["x-custom"], "yes");
    assert_eq!(seen["headers"]["x-concierge-subject"], "orders");
    // The caller's address is appended, as for any request: the list's last entry is
    // never one the caller wrote.
    assert_eq!(seen["headers"]["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(seen["headers"]["content-type"], "application/json");

    // The gateway frames the body: a stated length that disagrees is not sent on.
    let framed = common::testing::send_json(
        &stack.client,
        "POST",
        &stack.gateway.url("/api/gateway/proxy"),
        Some(&orders),
        Some(json!({
            "service": "echo", "method": "POST", "path": "/upload",
            "headers": {"content-length": "999", "transfer-encoding": "chunked"}, "body": "abc",
        })),
    )
    .await;
    assert_eq!(framed.status, 200, "{:?}", framed.json());
    assert_eq!(framed.json()["received"], 3);

    for (body, code) in [
        (
            json!({"service": "Not A Name", "method": "GET", "path": "/"}),
            400,
        ),
        (
            json!({"service": "echo", "method": "G T", "path": "/"}),
            400,
        ),
        (
            json!({"service": "echo", "method": "GET", "path": "/../x"}),
            400,
        ),
        (
            json!({"service": "echo", "method": "GET", "path": "/", "extra": 1}),
            400,
        ),
        (
            json!({"service": "nowhere", "method": "GET", "path": "/"}),
            503,
        ),
    ] {
        let answer = common::testing::send_json(
            &stack.client,
            "POST",
            &stack.gateway.url("/api/gateway/proxy"),
            Some(&orders),
            Some(body.clone()),
        )
        .await;
        assert_eq!(answer.status, code, "{body}: {:?}", answer.json());
    }
}

#[tokio::test]
async fn http2_clients_are_served_too() {
    let stack = Stack::start(&[]).await;
    let _echo = stack.serve("echo", "e-1").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = http::Request::get(stack.gateway.url("/echo/over-h2"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let answer = client.request(request).await.unwrap();
    assert_eq!(answer.version(), http::Version::HTTP_2);
    assert_eq!(answer.status(), 200);
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/over-h2");
    assert_eq!(
        seen["headers"]["x-forwarded-host"],
        stack.gateway.addr.to_string()
    );
    // HTTP/2 names the host in `:authority`; the instance's HTTP/1.1 gets it as `Host`, as
    // it would from an HTTP/1.1 client.
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["host"], stack.gateway.addr.to_string());
    // HTTP/2 may split cookies into fields; HTTP/1.1 takes one line (RFC 9113 §8.2.3).
    assert_eq!(seen["headers"]["cookie"], "a=1; b=2");
}

#[tokio::test]
async fn the_openapi_document_describes_served_operations() {
    let stack = Stack::start(&[]).await;
    common::testing::check_openapi_routes_at(
        &stack.gateway.url(""),
        "/api/gateway/openapi.json",
        stack.admin(),
        6,
    )
    .await;
}

/// The access log's line for the request with `id`, once the gateway has written it.
async fn access_line(gateway: &common::testing::ServiceProcess, id: &str) -> Option<Value> {
    for _ in 0..50 {
        let line = gateway
            .output()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["target"] == "access" && line["request_id"] == id);
        if line.is_some() {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn every_request_gets_one_access_line_and_its_metrics() {
    let stack = Stack::start(&[]).await;
    let _echo = stack.serve("echo", "e-1").await;

    let request = http::Request::get(stack.gateway.url("/echo/thing?secret=s3cret"))
        .header("x-request-id", "access-line-1")
        .body(bytes::Bytes::new())
        .unwrap();
    let answer = stack.client.send(request).await.unwrap();
    assert_eq!(answer.status, 200);
    let line = access_line(&stack.gateway, "access-line-1")
        .await
        .unwrap_or_else(|| panic!("no access line:\n{}", stack.gateway.output()));
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/echo/thing", "the query stays out: {line}");
    assert_eq!(line["route"], "/echo", "{line}");
    assert_eq!(line["instance"], "e-1", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["bytes"], answer.body.len(), "{line}");
    assert_eq!(line["completed"], true, "{line}");
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    let lines = stack.gateway.output();
    assert_eq!(lines.matches("\"access-line-1\"").count(), 1, "{lines}");
    assert!(!lines.contains("s3cret"));

    let metrics = get(&stack.client, &stack.gateway, "/metrics", None).await;
    let page = String::from_utf8_lossy(&metrics.body).into_owned();
    for series in [
        r#"concierge_http_requests_total{method="GET",route="/echo",status="200"}"#,
        r#"concierge_http_request_duration_seconds_count{method="GET",route="/echo",status_class="2xx"}"#,
        r#"concierge_gateway_upstream_duration_seconds_count{service="echo"}"#,
        r#"concierge_gateway_upstream_attempts_total{outcome="ok",service="echo"}"#,
    ] {
        assert!(
            metric(&page, series).is_some_and(|n| n >= 1.0),
            "{series}:\n{page}"
        );
    }

    // Sampled out, a success leaves no line; an error always does.
    let sampled = stack.spawn_gateway(&[("ACCESS_LOG_SAMPLE", "0")]).await;
    wait_for(&stack.client, &sampled, "/echo/x", 200).await;
    for (path, id) in [
        ("/echo/quiet", "sampled-out"),
        ("/nowhere", "always-logged"),
    ] {
        let request = http::Request::get(sampled.url(path))
            .header("x-request-id", id)
            .body(bytes::Bytes::new())
            .unwrap();
        stack.client.send(request).await.unwrap();
    }
    let error = access_line(&sampled, "always-logged").await;
    assert_eq!(error.map(|line| line["status"].clone()), Some(json!(404)));
    assert!(!sampled.output().contains("\"sampled-out\""));
}

/// A gRPC client learns a failure of the gateway's own from `grpc-status`, as from Envoy:
/// HTTP 200 and a Trailers-Only answer. Other clients keep problem+json.
#[tokio::test]
async fn grpc_clients_get_the_gateways_failures_as_grpc_status() {
    let dir = testkit::TempDir::new("gateway-grpc-errors").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [
            {"prefix": "/slow", "upstream_protocol": "h2c", "timeout": "300ms"},
            {"prefix": "/quota", "rate_limit": {"per_service": "1/m"}}
        ]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let upstream = Upstream::start("grpc").await;
    for service in ["slow", "quota", "down"] {
        let id = format!("{service}-1");
        stack.register(service, &id, upstream.port, json!({})).await;
    }
    stack.set_health("down", "down-1", "offline").await;
    stack.wait_for("/down/x", 503).await;
    stack.wait_for("/slow/x", 200).await;

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let call = |path: &str, content_type: &'static str| {
        let request = http::Request::post(stack.gateway.url(path))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap();
        client.request(request)
    };
    let grpc_status = |answer: &http::Response<hyper::body::Incoming>| {
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["content-type"], "application/grpc");
        let status = answer.headers()["grpc-status"].to_str().unwrap().to_owned();
        let message = answer.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .to_owned();
        (status, message)
    };

    let answer = call("/nowhere/pkg.Svc/Call", "application/grpc")
        .await
        .unwrap();
    assert_eq!(grpc_status(&answer).0, "12", "UNIMPLEMENTED");
    let answer = call("/down/pkg.Svc/Call", "application/grpc+proto")
        .await
        .unwrap();
    let (status, message) = grpc_status(&answer);
    assert_eq!(status, "14", "UNAVAILABLE");
    assert_eq!(message, "no instance of down can take requests right now");
    assert_eq!(answer.headers()["retry-after"], "5");
    let answer = call("/slow/sleep/2000", "application/grpc").await.unwrap();
    let (status, message) = grpc_status(&answer);
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert_eq!(message, "the upstream instance did not answer within 300ms");
    assert_eq!(
        call("/quota/x", "application/grpc").await.unwrap().status(),
        200
    );
    let answer = call("/quota/x", "application/grpc-web").await.unwrap();
    assert_eq!(grpc_status(&answer).0, "8", "RESOURCE_EXHAUSTED");
    assert!(answer.headers().contains_key("retry-after"));
    assert_eq!(answer.headers()["ratelimit-remaining"], "0");

    // Anything else still gets problem+json.
    let answer = call("/nowhere/x", "application/json").await.unwrap();
    assert_eq!(answer.status(), 404);
    assert_eq!(
        answer.headers()["content-type"],
        common::problem::CONTENT_TYPE
    );
    assert!(!answer.headers().contains_key("grpc-status"));
}

/// The stack's vault trusts the gateway's `X-Forwarded-For` (`VAULT_TRUSTED_PROXIES`
/// 127.0.0.1, as `cargo xtask up` sets it): its audit log names the client behind the
/// gateway, not the gateway, and not the address the client claimed.
#[tokio::test]
async fn the_vaults_audit_log_names_the_client_behind_the_gateway() {
    let stack = Stack::start(&[]).await;
    let body = r#"{"service":"payments","name":"via-the-gateway","value":"x"}"#;
    let request = format!(
        "POST /api/credentials HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nx-forwarded-for: 6.6.6.6\r\n\r\n{body}",
        stack.admin(),
        body.len()
    );
    assert_eq!(
        raw_status_from(&stack, [127, 0, 0, 2], request.as_bytes()).await,
        201
    );
    let audit = stack.get_as("/api/audit?limit=1000", stack.admin()).await;
    assert_eq!(audit.status, 200);
    let audit = audit.json();
    let created: Vec<&Value> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|record| record["action"] == "credential.create")
        .collect();
    assert_eq!(created.len(), 1, "{audit}");
    assert_eq!(created[0]["client_addr"], "127.0.0.2");
}

#[tokio::test]
async fn a_policy_holds_for_every_spelling_of_its_path() {
    let dir = testkit::TempDir::new("gateway-routes").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [
            {"prefix": "/echo/admin", "require_token": true},
            {"prefix": "/echo/deep/admin", "require_token": true},
        ]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let echo = Upstream::start("echo").await;
    stack.register("echo", "e-1", echo.port, json!({})).await;
    stack.wait_for("/echo/x", 200).await;

    // An upstream would read each of these as /admin/users: each needs the token.
    for path in [
        "/echo/admin/users",
        "/echo/%61dmin/users",
        "/echo/%61%64%6D%69%6E/users",
        "/echo/admin;v=1/users",
        "/echo/deep;v=1/admin/users",
    ] {
        assert_eq!(stack.get(path).await.status, 401, "{path}");
    }
    // Tomcat and Spring read `..;` as `..`.
    assert_eq!(stack.get("/echo/x/..;/admin/users").await.status, 400);
    // The upstream gets the path in the one spelling the gateway matched on.
    let answer = stack.get("/echo/%7euser/a%2db%3f?q=%61").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["path"], "/~user/a-b%3F?q=%61");
}

#[tokio::test]
async fn one_host_goes_upstream_and_the_targets_authority_wins() {
    let stack = Stack::start(&[]).await;
    let _echo = stack.serve("echo", "e-1").await;
    // Two hosts could route one way here and another upstream (RFC 9112 §3.2).
    assert_eq!(
        raw_status(
            &stack,
            b"GET /echo/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"
        )
        .await,
        400
    );
    // An absolute-form target's authority, not Host (RFC 9112 §3.2.2).
    let text = raw_exchange(
        &stack,
        b"GET http://a.example/echo/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let seen: Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["headers"]["host"], "a.example");
    assert_eq!(seen["headers"]["x-forwarded-host"], "a.example");
    // Userinfo never goes on.
    let text = raw_exchange(
        &stack,
        b"GET http://user:secret@a.example:8080/echo/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains(r#""host":"a.example:8080""#), "{text}");
}
