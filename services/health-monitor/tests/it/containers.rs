//! Restarting an unhealthy container through the Docker Engine API, proved against
//! Podman's (`podman system service`) with real containers: restarted once, within the
//! budget and the cool-down, and never when a dependency is the cause.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::testing::workspace_binary;
use serde_json::json;

use crate::support::{Mode, Stack, Upstream};

/// A private Podman (its own storage and API socket) for one test, with the settings
/// these machines need (../shared/ENVIRONMENT.md); its containers are removed on drop.
struct Podman {
    dir: testkit::TempDir,
    service: Child,
    containers: Vec<String>,
}

impl Podman {
    fn start() -> Self {
        let dir = testkit::TempDir::new("concierge-podman").unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .unwrap();
        let socket = dir.path().join("api.sock");
        let service = Self::command_in(dir.path(), "podman")
            .args(["system", "service", "--time", "0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman system service");
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no Podman API socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            dir,
            service,
            containers: Vec::new(),
        }
    }

    fn command_in(dir: &Path, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("CONTAINERS_CONF", dir.join("containers.conf"))
            .args(["--root"])
            .arg(dir.join("root"))
            .args(["--runroot"])
            .arg(dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        if program == "podman" {
            command.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
        }
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Self::command_in(self.dir.path(), program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// An image from scratch holding `binary` and the shared libraries it needs.
    fn image(&self, binary: &Path, name: &str) {
        let container = self.run("buildah", &["from", "scratch"]);
        self.run(
            "buildah",
            &["copy", &container, binary.to_str().unwrap(), "/service"],
        );
        let ldd = Command::new("ldd").arg(binary).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line
                .split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(str::to_owned);
            if let Some(path) = path {
                self.run("buildah", &["copy", &container, &path, &path]);
            }
        }
        self.run(
            "buildah",
            &["config", "--entrypoint", r#"["/service"]"#, &container],
        );
        self.run("buildah", &["commit", &container, name]);
    }

    /// Runs `image` as `name`, listening on `port` on the host's loopback, labelled as
    /// the container of service `name` (`concierge.service=name`).
    fn container(&mut self, image: &str, name: &str, port: u16) {
        let publish = format!("127.0.0.1:{port}:{port}");
        let listen = format!("LISTEN_ADDR=0.0.0.0:{port}");
        let label = format!("concierge.service={name}");
        self.run(
            "podman",
            &[
                "run", "-d", "--name", name, "-p", &publish, "-e", &listen, "--label", &label,
                image,
            ],
        );
        self.containers.push(name.to_owned());
    }

    /// When the container last started.
    fn started_at(&self, name: &str) -> String {
        self.run(
            "podman",
            &["inspect", "--format", "{{.State.StartedAt}}", name],
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = Self::command_in(self.dir.path(), "podman")
                .args(["rm", "-f", "-t", "0", name])
                .output();
        }
        let _ = self.service.kill();
        let _ = self.service.wait();
    }
}

async fn wait_healthy(port: u16) {
    let client = common::client::HttpClient::new(Duration::from_secs(2));
    let started = Instant::now();
    while client
        .get_json::<serde_json::Value>(&format!("http://127.0.0.1:{port}/health"))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the container never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn unhealthy_containers_are_restarted_within_budget_and_never_for_a_dependency() {
    let mut podman = Podman::start();
    // The gateway binary makes a small real service: /health answers, other paths 404.
    podman.image(&workspace_binary("gateway"), "concierge-test-service");
    let ports: Vec<u16> = (0..3).map(|_| testkit::free_port().unwrap()).collect();
    for (name, port) in ["alpha", "beta", "gamma"].iter().zip(&ports) {
        podman.container("concierge-test-service", name, *port);
    }
    for port in &ports {
        wait_healthy(*port).await;
    }
    let socket = format!("unix://{}", podman.socket().display());
    let stack = Stack::start(
        None,
        &[
            ("DOCKER_HOST", socket.as_str()),
            ("RESTART_BUDGET", "1"),
            ("RESTART_BUDGET_WINDOW", "1h"),
        ],
    )
    .await;
    let recovery = |container: &str| json!({"recovery": {"container": container, "after": "500ms", "cooldown": "1h", "max_attempts": 3}});
    // gamma depends on a database that is down: its outage is the database's fault.
    let database = Upstream::start(Mode::Failing).await;
    stack
        .register("database", "db-1", "127.0.0.1", database.port, json!({}))
        .await;
    for (name, port) in ["alpha", "beta", "gamma"].iter().zip(&ports) {
        let mut extra = json!({"metadata": recovery(name)});
        if *name == "gamma" {
            extra["dependencies"] = json!(["database"]);
        }
        stack
            .register(name, &format!("{name}-1"), "127.0.0.1", *port, extra)
            .await;
        stack
            .wait_state(name, &format!("{name}-1"), "healthy")
            .await;
    }
    stack.wait_state("database", "db-1", "offline").await;
    // Another service names alpha's container in its registration: its outage must never
    // restart alpha, nor spend the budget.
    let intruder = Upstream::start(Mode::Failing).await;
    stack
        .register(
            "intruder",
            "intruder-1",
            "127.0.0.1",
            intruder.port,
            json!({"metadata": recovery("alpha")}),
        )
        .await;
    let before: Vec<String> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|n| podman.started_at(n))
        .collect();

    // Their health endpoints fail from now on (a path the service does not serve).
    for (name, port) in ["alpha", "beta", "gamma"].iter().zip(&ports) {
        let mut extra = json!({"metadata": recovery(name), "health_endpoint": "/broken"});
        if *name == "gamma" {
            extra["dependencies"] = json!(["database"]);
        }
        stack
            .register(name, &format!("{name}-1"), "127.0.0.1", *port, extra)
            .await;
    }
    for name in ["alpha", "beta", "gamma"] {
        let (view, _) = stack
            .wait_state(name, &format!("{name}-1"), "offline")
            .await;
        assert_eq!(view["last_error"]["reason"], "status");
    }
    // One restart fits the budget; the cool-down holds every further attempt.
    let started = Instant::now();
    let restarted = loop {
        let now: Vec<String> = ["alpha", "beta", "gamma"]
            .iter()
            .map(|n| podman.started_at(n))
            .collect();
        let changed: Vec<usize> = (0..3).filter(|&i| now[i] != before[i]).collect();
        if !changed.is_empty() {
            break changed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no container was restarted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<String> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|n| podman.started_at(n))
        .collect();
    let changed: Vec<usize> = (0..3).filter(|&i| after[i] != before[i]).collect();
    assert_eq!(
        changed.len(),
        1,
        "the budget allows one restart: {changed:?}"
    );
    assert!(
        restarted[0] < 2,
        "gamma's outage is its dependency's: {restarted:?}"
    );
    let name = ["alpha", "beta"][restarted[0]];
    let view = stack.instance(name, &format!("{name}-1")).await;
    let attempts = view["recovery_attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{view:#}");
    assert_eq!(attempts[0]["action"], "restart");
    assert_eq!(attempts[0]["outcome"], "ok", "{view:#}");
    let gamma = stack.instance("gamma", "gamma-1").await;
    assert!(
        gamma["recovery_attempts"].as_array().unwrap().is_empty(),
        "{gamma:#}"
    );
    let intruder = stack.instance("intruder", "intruder-1").await;
    let attempts = intruder["recovery_attempts"].as_array().unwrap();
    assert!(!attempts.is_empty(), "{intruder:#}");
    for attempt in attempts {
        assert_eq!(attempt["action"], "restart_refused", "{intruder:#}");
        assert_eq!(attempt["outcome"], "failed", "{intruder:#}");
    }
}
