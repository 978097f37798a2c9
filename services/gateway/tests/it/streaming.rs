//! Bodies stream both ways without being held whole; upgraded connections are left alone
//! by route changes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Stack, Upstream, burst, raw_exchange, routes_file};

const TEN_MIB: usize = 10 * 1024 * 1024;

/// The process's peak resident memory, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
async fn ten_mib_each_way_stream_through_in_little_memory() {
    let stack = Stack::start(&[("MAX_BODY_BYTES", "16777216")]).await;
    let files = stack.serve("files", "f-1").await;
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    for _ in 0..3 {
        let upload = http::Request::post(stack.gateway.url("/files/upload"))
            .body(Full::new(Bytes::from(vec![7u8; TEN_MIB])))
            .unwrap();
        let answer = client.request(upload).await.unwrap();
        assert_eq!(answer.status(), 200);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["received"], TEN_MIB);

        let download = http::Request::get(stack.gateway.url(&format!("/files/bytes/{TEN_MIB}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = client.request(download).await.unwrap();
        assert_eq!(answer.status(), 200);
        let mut body = answer.into_body();
        let mut received = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                received += data.len();
            }
        }
        assert_eq!(received, TEN_MIB);
    }
    let peak = peak_rss(stack.gateway.pid());
    assert!(
        peak < 64 * 1024 * 1024,
        "the gateway peaked at {} MiB",
        peak / 1024 / 1024
    );

    // Over the limit: 413, whether the length is declared or the body is chunked. Raw
    // sockets, because the gateway answers before the client has sent everything, and a
    // client that stops at its first failed write would never read the answer.
    let mut declared = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    declared
        .write_all(b"POST /files/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 17825792\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut declared, b"\r\n\r\n").await;
    assert!(
        head.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    let mut chunked = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    chunked
        .write_all(b"POST /files/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut chunk = b"100000\r\n".to_vec();
    chunk.extend(vec![b'z'; 1024 * 1024]);
    chunk.extend_from_slice(b"\r\n");
    for _ in 0..17 {
        if chunked.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let head = read_until(&mut chunked, b"\r\n\r\n").await;
    assert!(
        head.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert!(
        files.hits.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the upstream saw the uploads"
    );
}

async fn read_until(stream: &mut tokio::net::TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// gRPC's needs of a proxy, over h2c and HTTP/1.1 alike: `TE: trailers` passed on, and the
/// response's trailers passed back.
#[tokio::test]
async fn trailers_and_te_trailers_pass_through_whatever_the_protocols() {
    let dir = testkit::TempDir::new("gateway-trailers").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [{"prefix": "/grpc", "upstream_protocol": "h2c"}]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let upstream = Upstream::start("grpc").await;
    stack
        .register("grpc", "g-1", upstream.port, json!({}))
        .await;
    stack
        .register("plain", "p-1", upstream.port, json!({}))
        .await;
    stack.wait_for("/grpc/x", 200).await;
    stack.wait_for("/plain/x", 200).await;

    let h2_client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let call = |path: &str| {
        http::Request::post(stack.gateway.url(path))
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let answer = h2_client.request(call("/grpc/trailers")).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-saw-te"], "trailers");
    let body = answer.into_body().collect().await.unwrap();
    let trailers = body.trailers().cloned().expect("the trailers came back");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(body.to_bytes(), "ok");

    // Over an HTTP/1.1 instance too: TE is hop-by-hop there, and the gateway, which takes
    // trailers on to the client, says so on its own hop.
    let answer = h2_client.request(call("/plain/trailers")).await.unwrap();
    assert_eq!(answer.headers()["x-saw-te"], "trailers");
    let body = answer.into_body().collect().await.unwrap();
    let trailers = body.trailers().cloned().expect("the trailers came back");
    assert_eq!(trailers["grpc-status"], "0");

    // And to an HTTP/1.1 client that takes them, in the chunked body's trailer section.
    let answer = raw_exchange(
        &stack,
        b"GET /plain/trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_lowercase();
    assert!(answer.contains("trailer: grpc-status\r\n"), "{answer}");
    assert!(answer.ends_with("0\r\ngrpc-status: 0\r\n\r\n"), "{answer}");
    // Without TE: trailers, none: the client said it would not read them.
    let answer = raw_exchange(
        &stack,
        b"GET /plain/trailers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.ends_with("0\r\n\r\n"), "{answer}");
}

/// A WebSocket handshake through the gateway; the socket once it has switched protocols.
async fn open_websocket(stack: &Stack, path: &str) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    let handshake = format!(
        "GET {path} HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    socket.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_until(&mut socket, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    socket
}

#[tokio::test]
async fn an_upgraded_connection_survives_route_changes() {
    let stack = Stack::start(&[]).await;
    let _chat = stack.serve("chat", "c-1").await;

    let mut socket = open_websocket(&stack, "/chat/ws").await;
    socket.write_all(b"hello").await.unwrap();
    read_until(&mut socket, b"hello").await;

    // Other services come and go; each change rebuilds the route table.
    let other = Upstream::start("other").await;
    for round in 0..3 {
        let id = format!("o-{round}");
        stack.register("other", &id, other.port, json!({})).await;
        stack.wait_for("/other/x", 200).await;
        stack.deregister("other", &id).await;
        stack.wait_for("/other/x", 404).await;
        socket
            .write_all(format!("round {round}").as_bytes())
            .await
            .unwrap();
        read_until(&mut socket, format!("round {round}").as_bytes()).await;
    }
}

/// A route that speaks h2c to its instances multiplexes its requests on one connection,
/// streams large bodies both ways through it, and still upgrades over HTTP/1.1.
#[tokio::test]
async fn an_h2c_route_shares_one_connection_and_still_upgrades() {
    let dir = testkit::TempDir::new("gateway-h2c").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [{"prefix": "/fast", "upstream_protocol": "h2c"}]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes), ("MAX_BODY_BYTES", "16777216")]).await;
    let fast = Upstream::start("fast").await;
    let slow = Upstream::start("slow").await;
    stack.register("fast", "f-1", fast.port, json!({})).await;
    stack.register("slow", "s-1", slow.port, json!({})).await;
    stack.wait_for("/fast/x", 200).await;
    stack.wait_for("/slow/x", 200).await;

    let first = stack.get("/fast/echo").await;
    assert_eq!(first.json()["version"], "HTTP/2.0", "{:?}", first.json());
    assert_eq!(first.json()["path"], "/echo");
    // The client's host moves to X-Forwarded-Host: in HTTP/2 the authority is the instance's.
    let headers = &first.json()["headers"];
    assert!(headers.get("host").is_none(), "{headers:?}");
    assert!(
        headers["x-forwarded-host"]
            .as_str()
            .is_some_and(|host| host.starts_with("127.0.0.1:")),
        "{headers:?}"
    );
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let client = stack.client.clone();
            let url = stack.gateway.url(&format!("/fast/item/{i}"));
            tokio::spawn(async move {
                common::testing::send_json(&client, "GET", &url, None, None).await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["path"], format!("/item/{i}"));
        assert_eq!(answer.json()["version"], "HTTP/2.0");
    }
    let download = stack.get(&format!("/fast/bytes/{TEN_MIB}")).await;
    assert_eq!(download.status, 200);
    assert_eq!(download.body.len(), TEN_MIB);
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let upload = http::Request::post(stack.gateway.url("/fast/upload"))
        .body(Full::new(Bytes::from(vec![7u8; TEN_MIB])))
        .unwrap();
    let answer = client.request(upload).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["received"], TEN_MIB);
    assert_eq!(
        fast.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "every request to the h2c instance went over one connection"
    );
    // Routes without the policy keep HTTP/1.1.
    assert_eq!(stack.get("/slow/echo").await.json()["version"], "HTTP/1.1");

    // An upgrade is HTTP/1.1's, so it takes a connection of its own.
    let mut socket = open_websocket(&stack, "/fast/ws").await;
    socket.write_all(b"over h1").await.unwrap();
    read_until(&mut socket, b"over h1").await;
    assert_eq!(
        fast.connections.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn an_h2c_connection_is_made_once_and_follows_its_instance_to_a_new_address() {
    let dir = testkit::TempDir::new("gateway-h2c-move").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [{"prefix": "/moving", "upstream_protocol": "h2c"}]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let before = Upstream::start("before").await;
    let after = Upstream::start("after").await;
    stack
        .register("moving", "m-1", before.port, json!({}))
        .await;
    stack.wait_until_listed("m-1").await;
    // The instance's first 32 requests arrive at once: they wait for one connection.
    for answer in burst(&stack, &[&stack.gateway], "/moving/echo", None, 32).await {
        assert_eq!(answer.status, 200, "{:?}", answer.json());
        assert_eq!(answer.json()["instance"], "before");
    }
    let connections = |upstream: &Upstream| {
        upstream
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(connections(&before), 1);

    // Registered again under the same id at another address: the connection moves too.
    follow_a_move(&stack, &after).await;
    assert_eq!(connections(&after), 1);
}

/// Registers instance `m-1` of `moving` again at `to`'s address, and waits until
/// requests reach it there, and only there.
async fn follow_a_move(stack: &Stack, to: &Upstream) {
    stack.register("moving", "m-1", to.port, json!({})).await;
    let started = std::time::Instant::now();
    loop {
        let answer = stack.get("/moving/echo").await;
        assert_eq!(answer.status, 200, "{:?}", answer.json());
        if answer.json()["instance"] == to.name {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "requests still reach the old address"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        assert_eq!(stack.get("/moving/echo").await.json()["instance"], to.name);
    }
}

#[tokio::test]
async fn an_http1_connection_follows_its_instance_to_a_new_address() {
    let stack = Stack::start(&[]).await;
    let before = Upstream::start("before").await;
    let after = Upstream::start("after").await;
    stack
        .register("moving", "m-1", before.port, json!({}))
        .await;
    stack.wait_for("/moving/echo", 200).await;
    follow_a_move(&stack, &after).await;
}

/// An HTTP/1.1 connection to an instance serves request after request, whatever the
/// response's length was (fixed, chunked, none), and never one whose last response was
/// left unread.
#[tokio::test]
async fn http1_connections_are_reused_only_after_a_whole_response() {
    let stack = Stack::start(&[]).await;
    let upstream = stack.serve("keep", "k-1").await;
    let connections = || {
        upstream
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for i in 0..5 {
        let answer = stack.get(&format!("/keep/echo/{i}")).await;
        assert_eq!(answer.json()["path"], format!("/echo/{i}"));
        let url = stack.gateway.url("/keep/echo");
        let head = common::testing::send_json(&stack.client, "HEAD", &url, None, None).await;
        assert_eq!(head.status, 200);
        assert_eq!(stack.get("/keep/status/204").await.status, 204);
        let chunked = stack.get("/keep/bytes/300000").await;
        assert_eq!(chunked.body.len(), 300_000);
    }
    assert_eq!(
        connections(),
        1,
        "every request went over the first connection"
    );

    // An upgraded connection is the WebSocket's alone: requests meanwhile take another.
    let mut socket = open_websocket(&stack, "/keep/ws").await;
    for i in 0..3 {
        let answer = stack.get(&format!("/keep/beside/{i}")).await;
        assert_eq!(answer.json()["path"], format!("/beside/{i}"));
        socket.write_all(b"still mine").await.unwrap();
        read_until(&mut socket, b"still mine").await;
    }
    drop(socket);
    assert_eq!(connections(), 2);

    // A download the client gives up on: its connection is not used again.
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    socket
        .write_all(
            format!("GET /keep/bytes/{TEN_MIB} HTTP/1.1\r\nHost: keep.example\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_until(&mut socket, b"xxxxxxxx").await;
    drop(socket);
    for i in 0..5 {
        let answer = stack.get(&format!("/keep/after/{i}")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["path"], format!("/after/{i}"));
    }
    assert_eq!(connections(), 3);

    // Bursts of 16 at once: a connection is free again by the next burst, so 16 serve all.
    for _ in 0..5 {
        for answer in burst(&stack, &[&stack.gateway], "/keep/echo", None, 16).await {
            assert_eq!(answer.status, 200);
        }
    }
    let opened = connections() - 3;
    assert!(opened <= 16, "{opened} more connections for bursts of 16");
}

/// An idle connection is used again within `UPSTREAM_IDLE_TIMEOUT`, and closed by the
/// gateway once it has waited longer, with no request needed to notice.
#[tokio::test]
async fn idle_http1_connections_close_after_the_idle_timeout() {
    idle_connections_close("http1").await;
}

#[tokio::test]
async fn an_idle_h2c_connection_closes_after_the_idle_timeout_too() {
    idle_connections_close("h2c").await;
}

async fn idle_connections_close(protocol: &str) {
    let stack = Stack::start(&[
        ("UPSTREAM_IDLE_TIMEOUT", "2s"),
        ("UPSTREAM_PROTOCOL", protocol),
    ])
    .await;
    let upstream = stack.serve("idle", "i-1").await;
    let count =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = stack.get("/idle/again").await;
    assert_eq!(answer.status, 200);
    let version = if protocol == "h2c" {
        "HTTP/2.0"
    } else {
        "HTTP/1.1"
    };
    assert_eq!(answer.json()["version"], version);
    assert_eq!(
        count(&upstream.connections),
        1,
        "used again within the timeout"
    );
    assert_eq!(count(&upstream.closed), 0);
    // The resync (every second here) closes it 2 to 3 s after its last use.
    let started = std::time::Instant::now();
    while count(&upstream.closed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the idle connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(stack.get("/idle/later").await.status, 200);
    assert_eq!(count(&upstream.connections), 2);
}

/// A client that asks `Expect: 100-continue` before an upload gets its `100 Continue`
/// and then the instance's answer, the body streamed through.
#[tokio::test]
async fn an_upload_that_expects_100_continue_goes_through() {
    let stack = Stack::start(&[]).await;
    let _upstream = stack.serve("files", "f-1").await;
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    let body = vec![b'u'; 100_000];
    socket
        .write_all(
            format!(
                "POST /files/upload HTTP/1.1\r\nHost: files.example\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let interim = read_until(&mut socket, b"\r\n\r\n").await;
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    socket.write_all(&body).await.unwrap();
    let answer = read_until(&mut socket, b"}").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"received":100000}"#), "{answer}");
}
