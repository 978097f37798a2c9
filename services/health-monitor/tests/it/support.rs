//! A vault, a registry and a monitor as processes; switchable upstreams and a webhook
//! receiver inside the test.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::{ClientResponse, HttpClient};
use common::db::DatabaseUrl;
use common::testing::{RegistryFixture, ServiceProcess, TestDb, VaultFixture};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

pub const MONITOR: &str = env!("CARGO_BIN_EXE_health-monitor");

/// The monitor's test settings: quick checks, so that states settle in a second or two.
pub const FAST: &[(&str, &str)] = &[
    ("CHECK_INTERVAL", "500ms"),
    ("FAST_INTERVAL", "100ms"),
    ("CHECK_TIMEOUT", "300ms"),
    ("SLOW_THRESHOLD", "150ms"),
    ("FAILURES_TO_OFFLINE", "3"),
    ("PASSES_TO_HEALTHY", "2"),
    ("RESYNC_INTERVAL", "1s"),
    ("ALERT_GROUP_WAIT", "1s"),
];

pub struct Stack {
    pub vault: VaultFixture,
    pub registry: RegistryFixture,
    pub monitor: ServiceProcess,
    pub monitor_db: TestDb,
    pub client: HttpClient,
    redis: Option<String>,
}

impl Stack {
    pub async fn start(redis: Option<&str>, monitor_env: &[(&str, &str)]) -> Self {
        let redis_env: Vec<(&str, &str)> =
            redis.map(|r| vec![("REDIS_URL", r)]).unwrap_or_default();
        let vault = VaultFixture::start_with(&redis_env).await;
        let registry = RegistryFixture::start(&vault, redis).await;
        let monitor_db = TestDb::sqlite();
        let client = HttpClient::new(Duration::from_secs(30));
        let monitor = spawn_monitor(&vault, &registry, &monitor_db.url, redis, monitor_env).await;
        Self {
            vault,
            registry,
            monitor,
            monitor_db,
            client,
            redis: redis.map(str::to_owned),
        }
    }

    /// Stops the monitor (SIGTERM) and starts another on the same database.
    pub async fn restart_monitor(&mut self, monitor_env: &[(&str, &str)]) {
        assert!(self.monitor.terminate().success());
        self.monitor = spawn_monitor(
            &self.vault,
            &self.registry,
            &self.monitor_db.url,
            self.redis.as_deref(),
            monitor_env,
        )
        .await;
    }

    pub fn admin(&self) -> &str {
        self.vault.token("admin")
    }

    pub async fn register(&self, service: &str, id: &str, address: &str, port: u16, extra: Value) {
        self.registry
            .register(self.admin(), service, id, (address, port), extra)
            .await;
    }

    pub async fn monitor_get(&self, path: &str) -> ClientResponse {
        common::testing::send_json(
            &self.client,
            "GET",
            &self.monitor.url(path),
            Some(self.admin()),
            None,
        )
        .await
    }

    /// The monitor's view of one instance.
    pub async fn instance(&self, service: &str, id: &str) -> Value {
        let answer = self
            .monitor_get(&format!("/api/health/services/{service}"))
            .await;
        if answer.status != 200 {
            return Value::Null;
        }
        answer.json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance_id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until the instance is in `state`; returns its view and how long it took.
    pub async fn wait_state(&self, service: &str, id: &str, state: &str) -> (Value, Duration) {
        let started = Instant::now();
        loop {
            let view = self.instance(service, id).await;
            if view["state"] == state {
                return (view, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{service}/{id} never became {state}: {view:#}\n{}",
                self.monitor.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn registry_health(&self, service: &str, id: &str) -> String {
        let answer = common::testing::send_json(
            &self.client,
            "GET",
            &self.registry.url(&format!("/api/services/{service}")),
            Some(self.admin()),
            None,
        )
        .await
        .json();
        answer["instances"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["instance_id"] == id))
            .map(|i| i["health"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }
}

async fn spawn_monitor(
    vault: &VaultFixture,
    registry: &RegistryFixture,
    db: &DatabaseUrl,
    redis: Option<&str>,
    extra: &[(&str, &str)],
) -> ServiceProcess {
    let vault_url = vault.url();
    let registry_url = registry.url("");
    let token = vault.token_file("health-monitor");
    let mut env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", db.expose()),
        ("VAULT_URL", vault_url.as_str()),
        ("REGISTRY_URL", registry_url.as_str()),
        ("TOKEN_FILE", token.to_str().unwrap()),
    ];
    env.extend_from_slice(FAST);
    if let Some(redis) = redis {
        env.push(("REDIS_URL", redis));
    }
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key, value));
    }
    let mut monitor = ServiceProcess::spawn(MONITOR, &env);
    monitor.wait_healthy().await;
    monitor
}

/// How a switchable upstream answers `GET /health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Healthy,
    Slow,
    Degraded,
    /// 200 with `{"status": "down"}`.
    BodyDown,
    /// 503.
    Failing,
    /// Answers after two seconds (past any check timeout here).
    Hanging,
}

/// An upstream whose answers the test switches; `stop` closes its port.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub port: u16,
    pub mode: Arc<Mutex<Mode>>,
    /// Checks received.
    pub hits: Arc<std::sync::atomic::AtomicU64>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Upstream {
    pub async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Self {
            port: listener.local_addr().unwrap().port(),
            mode: Arc::new(Mutex::new(mode)),
            hits: Arc::default(),
            task: Arc::default(),
        };
        let mode = upstream.mode.clone();
        let hits = upstream.hits.clone();
        let task = tokio::spawn(async move {
            // The connections belong to this task: stopping it closes them all, as the
            // death of a process does.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (mode, hits) = (mode.clone(), hits.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mode = *mode.lock().unwrap();
                        async move { Ok::<_, Infallible>(answer(mode).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *upstream.task.lock().unwrap() = Some(task);
        upstream
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Dies: closes the port and every open connection; connections are refused from now on.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

async fn answer(mode: Mode) -> Response<Full<Bytes>> {
    let (status, body) = match mode {
        Mode::Healthy => (StatusCode::OK, r#"{"status":"ok"}"#),
        Mode::Slow => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            (StatusCode::OK, r#"{"status":"ok"}"#)
        }
        Mode::Degraded => (StatusCode::OK, r#"{"status":"degraded"}"#),
        Mode::BodyDown => (StatusCode::OK, r#"{"status":"down"}"#),
        Mode::Failing => (StatusCode::SERVICE_UNAVAILABLE, "{}"),
        Mode::Hanging => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            (StatusCode::OK, "{}")
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// A webhook receiver: records every JSON body posted to it, by path; answers 503 while down.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub port: u16,
    pub received: Arc<Mutex<Vec<(String, Value)>>>,
    pub down: Arc<Mutex<bool>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Self {
            port: listener.local_addr().unwrap().port(),
            received: Arc::default(),
            down: Arc::default(),
        };
        let state = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut response = Response::new(Full::new(Bytes::new()));
                            if *state.down.lock().unwrap() {
                                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            } else {
                                let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                state.received.lock().unwrap().push((path, json));
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The bodies posted to `path` so far.
    pub fn at(&self, path: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Waits until `check` holds for the bodies posted to `path`.
    pub async fn wait(
        &self,
        path: &str,
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let bodies = self.at(path);
            if check(&bodies) {
                return bodies;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{what}: {bodies:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Stack {
    /// Another monitor over the same registry, database and Redis.
    pub async fn another_monitor(&self, monitor_env: &[(&str, &str)]) -> ServiceProcess {
        spawn_monitor(
            &self.vault,
            &self.registry,
            &self.monitor_db.url,
            self.redis.as_deref(),
            monitor_env,
        )
        .await
    }
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    testkit::free_port().unwrap()
}
