//! A vault, a registry and a gateway as processes, and upstream instances served from the
//! test itself (so that a test can see what reached them and change how they answer).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::{ClientResponse, HttpClient};
use common::testing::{RegistryFixture, ServiceProcess, VaultFixture};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// The control plane for one test, with the gateway in front.
pub struct Stack {
    pub vault: VaultFixture,
    pub registry: RegistryFixture,
    pub gateway: ServiceProcess,
    pub client: HttpClient,
    redis: Option<String>,
}

impl Stack {
    /// Without Redis: the gateway learns changes on its resync (1 s here).
    pub async fn start(gateway_env: &[(&str, &str)]) -> Self {
        Self::start_inner(None, gateway_env).await
    }

    pub async fn with_redis(redis_url: &str, gateway_env: &[(&str, &str)]) -> Self {
        Self::start_inner(Some(redis_url.to_owned()), gateway_env).await
    }

    async fn start_inner(redis: Option<String>, gateway_env: &[(&str, &str)]) -> Self {
        // The gateway reaches the vault over loopback, as under `cargo xtask up`.
        let mut vault_env = vec![("VAULT_TRUSTED_PROXIES", "127.0.0.1")];
        vault_env.extend(redis.as_deref().map(|url| ("REDIS_URL", url)));
        let vault = VaultFixture::start_with(&vault_env).await;
        let registry = RegistryFixture::start(&vault, redis.as_deref()).await;
        let client = HttpClient::new(Duration::from_secs(30));
        let gateway =
            spawn_gateway(&client, &vault, &registry, redis.as_deref(), gateway_env).await;
        Self {
            gateway,
            vault,
            registry,
            client,
            redis,
        }
    }

    /// Another gateway process over the same registry (and Redis).
    pub async fn spawn_gateway(&self, extra: &[(&str, &str)]) -> ServiceProcess {
        spawn_gateway(
            &self.client,
            &self.vault,
            &self.registry,
            self.redis.as_deref(),
            extra,
        )
        .await
    }

    pub fn admin(&self) -> &str {
        self.vault.token("admin")
    }

    /// Registers an instance of `service` at `port` on 127.0.0.1; `extra` adds fields.
    pub async fn register(&self, service: &str, id: &str, port: u16, extra: Value) {
        self.registry
            .register(self.admin(), service, id, ("127.0.0.1", port), extra)
            .await;
    }

    pub async fn deregister(&self, service: &str, id: &str) {
        let url = self
            .registry
            .url(&format!("/api/services/{service}/instances/{id}"));
        let answer =
            common::testing::send_json(&self.client, "DELETE", &url, Some(self.admin()), None)
                .await;
        assert!(answer.status.is_success(), "{:?}", answer.json());
    }

    /// Sets an instance's health as the monitor would.
    pub async fn set_health(&self, service: &str, id: &str, state: &str) {
        let url = self
            .registry
            .url(&format!("/api/services/{service}/instances/{id}/health"));
        let answer = common::testing::send_json(
            &self.client,
            "PUT",
            &url,
            Some(self.vault.token("health-monitor")),
            Some(json!({"state": state, "reason": "test"})),
        )
        .await;
        assert!(answer.status.is_success(), "{:?}", answer.json());
    }

    pub async fn get(&self, path: &str) -> ClientResponse {
        get(&self.client, &self.gateway, path, None).await
    }

    pub async fn get_as(&self, path: &str, token: &str) -> ClientResponse {
        get(&self.client, &self.gateway, path, Some(token)).await
    }

    /// Waits until `GET path` through the gateway answers `status`.
    /// Starts an upstream named `service`, registers it as instance `id` of `service`
    /// and waits until `/{service}/x` answers 200 through the gateway.
    pub async fn serve(&self, service: &'static str, id: &str) -> Upstream {
        let upstream = Upstream::start(service).await;
        self.register(service, id, upstream.port, json!({})).await;
        self.wait_for(&format!("/{service}/x"), 200).await;
        upstream
    }

    pub async fn wait_for(&self, path: &str, status: u16) -> Duration {
        wait_for(&self.client, &self.gateway, path, status).await
    }

    /// Waits until the status page lists the instance `id`: routed, and sent no request.
    pub async fn wait_until_listed(&self, id: &str) {
        let started = Instant::now();
        let quoted = format!("\"{id}\"");
        while !self.status().await.to_string().contains(&quoted) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{id} never routed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn status(&self) -> Value {
        let answer = self.get_as("/api/gateway/status", self.admin()).await;
        assert_eq!(answer.status, 200, "{:?}", answer.json());
        answer.json()
    }
}

async fn spawn_gateway(
    client: &HttpClient,
    vault: &VaultFixture,
    registry: &RegistryFixture,
    redis: Option<&str>,
    extra: &[(&str, &str)],
) -> ServiceProcess {
    let vault_url = vault.url();
    let registry_url = registry.url("");
    let token = vault.token_file("gateway");
    let mut env = vec![
        ("REGISTRY_URL", registry_url.as_str()),
        ("VAULT_URL", vault_url.as_str()),
        ("TOKEN_FILE", token.to_str().unwrap()),
        ("RESYNC_INTERVAL", "1s"),
    ];
    if let Some(redis) = redis {
        env.push(("REDIS_URL", redis));
    }
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key, value));
    }
    let mut gateway = ServiceProcess::spawn(GATEWAY, &env);
    gateway.wait_healthy().await;
    wait_ready(client, &gateway).await;
    gateway
}

/// Sends `request` as it is on a connection of its own and reads what comes back until
/// the gateway closes it (the request should say `Connection: close`).
pub async fn raw_exchange(stack: &Stack, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer))
        .await
        .expect("the gateway closed the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

pub async fn get(
    client: &HttpClient,
    gateway: &ServiceProcess,
    path: &str,
    token: Option<&str>,
) -> ClientResponse {
    common::testing::send_json(client, "GET", &gateway.url(path), token, None).await
}

pub async fn wait_for(
    client: &HttpClient,
    gateway: &ServiceProcess,
    path: &str,
    status: u16,
) -> Duration {
    let started = Instant::now();
    loop {
        let answer = get(client, gateway, path, None).await;
        if answer.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "GET {path} still answers {} ({:?}), not {status}",
            answer.status,
            answer.json()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_ready(client: &HttpClient, gateway: &ServiceProcess) {
    let started = Instant::now();
    while get(client, gateway, "/ready", None).await.status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the gateway never became ready:\n{}",
            gateway.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream instance inside the test process.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub port: u16,
    pub name: &'static str,
    /// Requests it received.
    pub hits: Arc<AtomicU64>,
    /// While set, `/flaky` answers 500.
    pub failing: Arc<AtomicBool>,
    /// Connections it accepted.
    pub connections: Arc<AtomicU64>,
    /// Connections that have ended since.
    pub closed: Arc<AtomicU64>,
}

impl Upstream {
    /// Serves:
    /// - `/bytes/N`: N bytes, streamed in 64 KiB chunks;
    /// - `/upload`: reads the body as it streams in and answers `{"received": N}`;
    /// - `/status/N`: an empty answer with status N;
    /// - `/sleep/MS`: an empty 200 after MS milliseconds;
    /// - `/flaky`: 500 while `failing` is set, else 200;
    /// - `/ws`: a protocol upgrade, then echoes every byte;
    /// - `/trailers`: `ok`, then the trailer `grpc-status: 0` (declared in `Trailer`), with
    ///   the request's `TE` in the header `x-saw-te` (`-` for none), as a gRPC server answers;
    /// - anything else: `{"instance", "method", "path", "version", "headers"}` as JSON.
    ///
    /// It speaks HTTP/1.1 and, by prior knowledge, HTTP/2.
    pub async fn start(name: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Self {
            port: listener.local_addr().unwrap().port(),
            name,
            hits: Arc::default(),
            failing: Arc::default(),
            connections: Arc::default(),
            closed: Arc::default(),
        };
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                state.connections.fetch_add(1, Ordering::Relaxed);
                let state = state.clone();
                let closed = state.closed.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                    closed.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        upstream
    }

    async fn answer(&self, mut req: Request<Incoming>) -> Response<common::hyper_server::Body> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let path = req.uri().path().to_owned();
        if let Some(n) = path.strip_prefix("/bytes/") {
            let total: usize = n.parse().unwrap();
            let chunks = (0..total.div_ceil(65536)).map(move |i| {
                let len = (total - i * 65536).min(65536);
                Ok::<_, common::hyper_server::BoxError>(Frame::data(Bytes::from(vec![b'x'; len])))
            });
            let body = StreamBody::new(futures_util::stream::iter(chunks));
            return Response::new(BodyExt::boxed(body));
        }
        if path == "/upload" {
            let mut received = 0usize;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return json_answer(StatusCode::BAD_REQUEST, json!({ "received": received }));
                };
                if let Ok(data) = frame.into_data() {
                    received += data.len();
                }
            }
            return json_answer(StatusCode::OK, json!({ "received": received }));
        }
        if let Some(ms) = path.strip_prefix("/sleep/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            return Response::new(common::hyper_server::full(Bytes::new()));
        }
        if let Some(code) = path.strip_prefix("/status/") {
            let mut response = Response::new(common::hyper_server::full(Bytes::new()));
            *response.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
            return response;
        }
        if path == "/flaky" {
            let status = if self.failing.load(Ordering::Relaxed) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            return json_answer(status, json!({ "instance": self.name }));
        }
        if path == "/trailers" {
            let saw_te = req
                .headers()
                .get("te")
                .map_or_else(|| "-".to_owned(), |v| v.to_str().unwrap().to_owned());
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = [
                Ok::<_, common::hyper_server::BoxError>(Frame::data(Bytes::from_static(b"ok"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let mut response = Response::new(BodyExt::boxed(body));
            response
                .headers_mut()
                .insert("x-saw-te", saw_te.parse().unwrap());
            // Over HTTP/1.1 a server sends the trailer fields it declares.
            response
                .headers_mut()
                .insert("trailer", "grpc-status".parse().unwrap());
            return response;
        }
        if path == "/ws" {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
            let mut response = Response::new(common::hyper_server::full(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            response
                .headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            response
                .headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            return response;
        }
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or(path.clone(), |pq| pq.as_str().to_owned());
        json_answer(
            StatusCode::OK,
            json!({
                "instance": self.name,
                "method": req.method().as_str(),
                "path": path_and_query,
                "version": format!("{:?}", req.version()),
                "headers": headers,
            }),
        )
    }
}

fn json_answer(status: StatusCode, body: Value) -> Response<common::hyper_server::Body> {
    let mut response = Response::new(BodyExt::boxed(
        Full::new(Bytes::from(body.to_string())).map_err(|never| match never {}),
    ));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// Writes a routes file into `dir`; its path, for `ROUTES_FILE`.
pub fn routes_file(dir: &testkit::TempDir, json: Value) -> String {
    let path = dir.path().join("routes.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `count` GETs of `path` at once, spread over `gateways`; the answers.
pub async fn burst(
    stack: &Stack,
    gateways: &[&ServiceProcess],
    path: &str,
    token: Option<&str>,
    count: usize,
) -> Vec<ClientResponse> {
    let mut calls = Vec::new();
    for i in 0..count {
        let client = stack.client.clone();
        let url = gateways[i % gateways.len()].url(path);
        let token = token.map(str::to_owned);
        calls.push(tokio::spawn(async move {
            common::testing::send_json(&client, "GET", &url, token.as_deref(), None).await
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

/// A metric's value in a Prometheus text page (the first series whose line starts so).
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The instance named `id` of `service` on the status page.
pub fn instance_status<'a>(status: &'a Value, service: &str, id: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| {
            s["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["instance_id"] == id)
        })
        .unwrap_or_else(|| panic!("no {service}/{id} in {status:#}"))
}
