//! Test support for the services' integration tests (feature `test-support`): a fresh
//! database per test on either backend, and the suite's Redis.
//!
//! `cargo xtask test` starts the servers and hands them over in `CONCIERGE_TEST_*`
//! variables; a test run without them fails and says so, rather than skip silently.

#![expect(
    clippy::panic,
    clippy::unwrap_used,
    reason = "test support fails the test loudly, with the reason"
)]

use diesel::{Connection, PgConnection, RunQueryDsl};

use crate::db::{Backend, DatabaseUrl, Db, Migrations};
use crate::secret::Secret;

fn required_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with `cargo xtask test`, which starts PostgreSQL and Redis")
    })
}

/// A port whose connection attempts hang until they time out, as to a host gone dark:
/// its listener's queue is full and it never accepts. Keep what it returns alive.
pub async fn dark_port() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut queued = Vec::new();
    loop {
        let attempt = tokio::net::TcpStream::connect(("127.0.0.1", port));
        match tokio::time::timeout(std::time::Duration::from_millis(300), attempt).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(error)) => panic!("the dark port refused a connection: {error}"),
            Err(_) => return (listener, queued, port),
        }
        assert!(queued.len() < 64, "the listener's queue never filled");
    }
}

/// The suite's Redis server.
pub fn redis_url() -> String {
    required_env(testkit::env::REDIS_URL)
}

/// A database of its own for one test; a SQLite file lives as long as this value.
#[derive(Debug)]
pub struct TestDb {
    pub url: DatabaseUrl,
    _dir: Option<testkit::TempDir>,
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => Self::postgres(),
            Backend::Sqlite => Self::sqlite(),
        }
    }

    /// A new, empty database on the suite's PostgreSQL server.
    pub fn postgres() -> Self {
        let admin = required_env(testkit::env::POSTGRES_URL);
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::establish(&admin)
            .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL server: {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        let (base, _) = admin
            .rsplit_once('/')
            .unwrap_or_else(|| panic!("{} has no database path", testkit::env::POSTGRES_URL));
        Self {
            url: parse(format!("{base}/{name}")),
            _dir: None,
        }
    }

    /// A new SQLite file in a temp dir.
    pub fn sqlite() -> Self {
        let dir = testkit::TempDir::new("concierge-sqlite")
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let path = dir.path().join("test.db");
        Self {
            url: parse(format!("sqlite://{}", path.display())),
            _dir: Some(dir),
        }
    }
}

fn parse(url: String) -> DatabaseUrl {
    DatabaseUrl::parse(Secret::new(url)).unwrap_or_else(|e| panic!("bad test database URL: {e}"))
}

/// Runs an async test body on both backends: `both_backends!(name, |backend| async { … })`
/// makes `name::postgres` and `name::sqlite`, so that a failure names its backend.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $test:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                ($test)($crate::db::Backend::Postgres).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($test)($crate::db::Backend::Sqlite).await
            }
        }
    };
}

/// A service binary running as its own process on a free loopback port, with its output
/// captured (to search it for leaked secrets); killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    output: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl ServiceProcess {
    /// Starts `binary` with a clean environment plus `envs` (`LISTEN_ADDR` is chosen here).
    pub fn spawn(binary: &str, envs: &[(&str, &str)]) -> Self {
        let port = testkit::free_port().unwrap_or_else(|e| panic!("{e}"));
        Self::spawn_at(
            binary,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            envs,
        )
    }

    /// Starts `binary` listening on `addr` (to restart a service where clients expect it).
    pub fn spawn_at(binary: &str, addr: std::net::SocketAddr, envs: &[(&str, &str)]) -> Self {
        use std::io::Read;
        use std::process::{Command, Stdio};

        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", addr.to_string())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let echo = std::env::var_os("TEST_LOG").is_some();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for mut pipe in pipes.into_iter().flatten() {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    if echo {
                        eprint!("{}", String::from_utf8_lossy(&buf[..n]));
                    }
                    if let Ok(mut all) = output.lock() {
                        all.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        Self {
            child,
            addr,
            output,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `GET /health` answers 200; panics with the process's output otherwise.
    pub async fn wait_healthy(&mut self) {
        let client = crate::client::HttpClient::new(std::time::Duration::from_secs(2));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the service exited ({status}) before it was healthy:\n{}",
                    self.output()
                );
            }
            let health = client
                .get_json::<serde_json::Value>(&self.url("/health"))
                .await;
            if health.is_ok_and(|body| body["status"] == "ok") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "the service was not healthy within 30 s:\n{}",
            self.output()
        );
    }

    /// Everything the process wrote so far, stdout and stderr.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .map(|all| String::from_utf8_lossy(&all).into_owned())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the service did not stop within 30 s of SIGTERM:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `binary` with `args` and a clean environment plus `envs`, to completion.
pub fn run_binary(binary: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(binary)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"))
}

/// What every service binary must do with its configuration and subcommands: exit 2 with
/// one line naming a missing or malformed variable, answer `healthcheck`, stop on SIGTERM.
/// `valid` is a complete environment; each of `required` is removed in turn.
pub async fn check_binary_basics(binary: &str, valid: &[(&str, &str)], required: &[&str]) {
    for missing in required {
        let envs: Vec<_> = valid
            .iter()
            .copied()
            .filter(|(k, _)| k != missing)
            .collect();
        let output = run_binary(binary, &[], &envs);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(crate::config::EXIT_CONFIG),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line, not a trace: {stderr}");
        assert!(
            stderr.contains(missing) && stderr.contains("required"),
            "{stderr}"
        );
    }
    for (var, bad) in [
        ("LISTEN_ADDR", "not-an-address"),
        ("LOG_FORMAT", "xml"),
        ("RESYNC_INTERVAL", "soon"),
        ("REDIS_URL", "http://redis"),
    ] {
        let mut envs: Vec<_> = valid.iter().copied().filter(|(k, _)| *k != var).collect();
        envs.push((var, bad));
        let output = run_binary(binary, &[], &envs);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(crate::config::EXIT_CONFIG),
            "{var}: {stderr}"
        );
        assert!(stderr.contains(var), "{stderr}");
    }
    let unknown = run_binary(binary, &["frobnicate"], valid);
    assert_eq!(unknown.status.code(), Some(crate::config::EXIT_CONFIG));

    let mut service = ServiceProcess::spawn(binary, valid);
    service.wait_healthy().await;
    let addr = service.addr.to_string();
    let probe = [("LISTEN_ADDR", addr.as_str())];
    let healthy = run_binary(binary, &["healthcheck"], &probe);
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let status = service.terminate();
    assert!(
        status.success(),
        "SIGTERM should stop it cleanly: {status}\n{}",
        service.output()
    );
    let gone = run_binary(binary, &["healthcheck"], &probe);
    assert_eq!(gone.status.code(), Some(1));
}

/// Migrations apply on `backend`, a second run applies nothing, every one of `tables`
/// exists afterwards, and both backends hold the same migration names.
pub async fn check_migrations(migrations: &'static Migrations, backend: Backend, tables: &[&str]) {
    let test_db = TestDb::new(backend);
    let db = Db::new(&test_db.url, 2);
    let applied = db
        .migrate(migrations)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!applied.is_empty(), "no migration applied on {backend:?}");
    let again = db
        .migrate(migrations)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.is_empty(), "a second run applied {again:?}");
    for table in tables {
        let query = format!("SELECT COUNT(*) FROM {table}");
        db.run(move |conn| Ok(diesel::sql_query(query).execute(conn)?))
            .await
            .unwrap_or_else(|e| panic!("table {table} on {backend:?}: {e}"));
    }
    assert_eq!(
        migrations.names(Backend::Postgres),
        migrations.names(Backend::Sqlite),
        "the backends' migrations differ"
    );
}

/// A binary of this workspace, built beside the running test (`target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
    let binary = dir.join(name);
    assert!(
        binary.is_file(),
        "{} is not built: run the tests with `cargo xtask test` (it builds the workspace)",
        binary.display()
    );
    binary
}

/// A real credential-vault process on its own SQLite database, initialized, for the
/// other services' tests (their tokens and credentials come from it).
#[derive(Debug)]
pub struct VaultFixture {
    pub process: ServiceProcess,
    pub dir: testkit::TempDir,
    _db: TestDb,
    tokens: std::collections::HashMap<String, String>,
    client: crate::client::HttpClient,
}

impl VaultFixture {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// With extra environment for the vault process (e.g. `REDIS_URL`).
    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        let binary = workspace_binary("credential-vault");
        let binary = binary.to_str().unwrap();
        let db = TestDb::sqlite();
        let dir = testkit::TempDir::new("concierge-vault").unwrap();
        let key = dir.path().join("master-key");
        let key = key.to_str().unwrap();
        let out = run_binary(binary, &["generate-master-key", "--out", key], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tokens_dir = dir.path().join("tokens");
        let env = [
            ("DATABASE_URL", db.url.expose()),
            ("VAULT_MASTER_KEY_FILE", key),
        ];
        let out = run_binary(
            binary,
            &["init", "--out", tokens_dir.to_str().unwrap()],
            &env,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut tokens = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&tokens_dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            tokens.insert(
                name.trim_end_matches("-token").to_owned(),
                std::fs::read_to_string(entry.path()).unwrap(),
            );
        }
        let mut env = env.to_vec();
        env.extend_from_slice(extra);
        let mut process = ServiceProcess::spawn(binary, &env);
        process.wait_healthy().await;
        Self {
            process,
            dir,
            _db: db,
            tokens,
            client: crate::client::HttpClient::new(std::time::Duration::from_secs(10)),
        }
    }

    /// The vault's base URL.
    pub fn url(&self) -> String {
        self.process.url("")
    }

    /// Runs the operator command `args` (`rotate-signing-key`, say) on the vault's
    /// database and master key, with `extra` environment (`REDIS_URL`, say).
    pub fn operator(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
        let binary = workspace_binary("credential-vault");
        let key = self.dir.path().join("master-key");
        let mut env = vec![
            ("DATABASE_URL", self._db.url.expose()),
            ("VAULT_MASTER_KEY_FILE", key.to_str().unwrap()),
        ];
        env.extend_from_slice(extra);
        run_binary(binary.to_str().unwrap(), args, &env)
    }

    /// A token written by `init`: `admin`, `gateway`, `service-registry`, `health-monitor`.
    pub fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }

    /// The path of a token file written by `init`.
    pub fn token_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("tokens").join(format!("{name}-token"))
    }

    async fn admin_post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = self.process.url(path);
        let answer = send_json(
            &self.client,
            "POST",
            &url,
            Some(self.token("admin")),
            Some(body),
        )
        .await;
        assert_eq!(answer.status, 201, "{path}: {:?}", answer.json());
        answer.json()
    }

    /// A service token for `service`, issued by the admin.
    pub async fn issue(&self, service: &str) -> String {
        self.issue_with_id(service).await.1
    }

    /// A service token for `service`, issued by the admin, after its id.
    pub async fn issue_with_id(&self, service: &str) -> (String, String) {
        let issued = self
            .admin_post("/api/tokens", serde_json::json!({ "service": service }))
            .await;
        (
            issued["id"].as_str().unwrap().to_owned(),
            issued["token"].as_str().unwrap().to_owned(),
        )
    }

    /// Revokes the token `id`, as the admin.
    pub async fn revoke(&self, id: &str) {
        let url = self.process.url(&format!("/api/tokens/{id}"));
        let answer = send_json(
            &self.client,
            "DELETE",
            &url,
            Some(self.token("admin")),
            None,
        )
        .await;
        assert!(answer.status.is_success(), "revoke: {:?}", answer.json());
    }

    /// Rotates a credential to `value`.
    pub async fn rotate(&self, id: &str, value: serde_json::Value) {
        let url = self.process.url(&format!("/api/credentials/{id}"));
        let body = serde_json::json!({ "value": value });
        let answer = send_json(
            &self.client,
            "PUT",
            &url,
            Some(self.token("admin")),
            Some(body),
        )
        .await;
        assert_eq!(answer.status, 200, "rotate: {:?}", answer.json());
    }

    /// Creates a credential and returns its id.
    pub async fn create_credential(
        &self,
        service: &str,
        name: &str,
        value: serde_json::Value,
    ) -> String {
        let created = self
            .admin_post(
                "/api/credentials",
                serde_json::json!({ "service": service, "name": name, "value": value }),
            )
            .await;
        created["id"].as_str().unwrap().to_owned()
    }
}

/// A real service-registry process beside a [`VaultFixture`], on its own SQLite file, for
/// the tests of the registry's consumers (the gateway, the monitor). Heartbeats are slow
/// enough that instances registered by a test stay healthy unless it says otherwise.
#[derive(Debug)]
pub struct RegistryFixture {
    pub process: ServiceProcess,
    _db: TestDb,
}

impl RegistryFixture {
    pub async fn start(vault: &VaultFixture, redis: Option<&str>) -> Self {
        let db = TestDb::sqlite();
        let vault_url = vault.url();
        let token = vault.token_file("service-registry");
        let mut env = vec![
            ("DATABASE_URL", db.url.expose()),
            ("VAULT_URL", vault_url.as_str()),
            ("TOKEN_FILE", token.to_str().unwrap()),
            ("HEARTBEAT_INTERVAL", "10m"),
            ("DEREGISTER_AFTER", "1h"),
        ];
        if let Some(redis) = redis {
            env.push(("REDIS_URL", redis));
        }
        let binary = workspace_binary("service-registry");
        let mut process = ServiceProcess::spawn(binary.to_str().unwrap(), &env);
        process.wait_healthy().await;
        Self { process, _db: db }
    }

    pub fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// Registers an instance of `service` at `address:port` with `token` (an admin's, say);
    /// `extra` adds or replaces fields of the registration. Panics unless the answer is 201.
    pub async fn register(
        &self,
        token: &str,
        service: &str,
        id: &str,
        (address, port): (&str, u16),
        extra: serde_json::Value,
    ) {
        let mut body = serde_json::json!({
            "name": service, "instance_id": id, "address": address, "port": port,
            "health_endpoint": "/health",
        });
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        let client = crate::client::HttpClient::new(std::time::Duration::from_secs(30));
        let url = self.url("/api/services/register");
        let answer = send_json(&client, "POST", &url, Some(token), Some(body)).await;
        assert_eq!(answer.status, 201, "{:?}", answer.json());
    }
}

/// The service at `base` serves its OpenAPI document at `/api/openapi.json`, and every
/// operation the document describes is a real route (not the "no route" 404, not a 405).
/// Path parameters are filled with a UUID (`{id}`) or `payments` (any other name).
pub async fn check_openapi_routes(base: &str, token: &str, expected_operations: usize) {
    check_openapi_routes_at(base, "/api/openapi.json", token, expected_operations).await;
}

/// [`check_openapi_routes`] for a document served at `document_path`.
pub async fn check_openapi_routes_at(
    base: &str,
    document_path: &str,
    token: &str,
    expected_operations: usize,
) {
    let client = crate::client::HttpClient::new(std::time::Duration::from_secs(10));
    let send = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let (client, url, method) = (client.clone(), format!("{base}{path}"), method.to_owned());
        async move { send_json(&client, &method, &url, Some(token), body).await }
    };
    let document = send("GET", document_path, None).await;
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
            let mut concrete = String::new();
            for segment in path.split('/') {
                if !concrete.is_empty() || !segment.is_empty() {
                    concrete.push('/');
                }
                concrete.push_str(match segment {
                    "{id}" => "9b2e7a0c-5d1e-4f7a-8c3b-2a6d9e0f1b4c",
                    s if s.starts_with('{') => "payments",
                    s => s,
                });
            }
            let body = matches!(method, "post" | "put").then(|| serde_json::json!({}));
            let answer = send(&method.to_uppercase(), &concrete, body).await;
            let unrouted = answer.status == 404
                && answer.json()["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("no route"));
            assert!(
                !unrouted && answer.status != 405,
                "{method} {path} is documented but not served ({})",
                answer.status
            );
        }
    }
    assert_eq!(operations, expected_operations, "documented operations");
}

/// Waits until `service` has `subscriptions` event subscriptions connected to Redis (its
/// `concierge_events_resyncs_total{reason="connected"}`), so that an event published
/// next reaches it.
pub async fn wait_subscribed(service: &ServiceProcess, subscriptions: u64) {
    let client = crate::client::HttpClient::new(std::time::Duration::from_secs(5));
    let url = service.url("/metrics");
    let started = std::time::Instant::now();
    loop {
        let answer = send_json(&client, "GET", &url, None, None).await;
        let text = String::from_utf8_lossy(&answer.body);
        let connected: u64 = text
            .lines()
            .filter(|line| {
                line.starts_with("concierge_events_resyncs_total")
                    && line.contains(r#"reason="connected""#)
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if connected >= subscriptions {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{connected} of {subscriptions} subscriptions connected:\n{}",
            service.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sends `method url` with an optional bearer token and JSON body, and reads the answer;
/// panics, naming the request, if nothing answers.
pub async fn send_json(
    client: &crate::client::HttpClient,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> crate::client::ClientResponse {
    let mut request = http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(json) => {
            request = request.header("content-type", "application/json");
            bytes::Bytes::from(json.to_string())
        }
        None => bytes::Bytes::new(),
    };
    client
        .send(request.body(body).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}
