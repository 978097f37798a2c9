//! Every PromQL expression we ship, run against a real Prometheus scraping a live stack.
//!
//! `cargo xtask up` starts the four services (in a temp data dir, a low per-client rate
//! limit on the gateway), some traffic goes through the gateway (successes, a 404, a 401,
//! a credential written and read, a vault denial, a burst over the rate limit), and
//! Debian's Prometheus scrapes all four every second with our alert rules loaded. Then
//! every panel query of every dashboard in `deploy/grafana/dashboards` must return data,
//! and every alert rule must evaluate without error.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::Tools;
use crate::http;

/// The stack's services: Prometheus job name and port (as in `cargo xtask up`).
const SERVICES: [(&str, u16); 4] = [
    ("credential-vault", 8081),
    ("service-registry", 8082),
    ("health-monitor", 8083),
    ("gateway", 8080),
];
const GATEWAY: u16 = 8080;
/// How long queries may take to return data: rates need two scrapes in their window.
const DATA_TIMEOUT: Duration = Duration::from_secs(90);
/// What Grafana would put for `$__rate_interval` at a 1 s scrape interval, and more.
const RATE_INTERVAL: &str = "1m";

pub fn prove(_: &Tools, root: &Path) -> Result<Vec<String>> {
    let panels = dashboard_queries(&root.join("deploy/grafana/dashboards"))?;
    let dir = testkit::TempDir::new("concierge-dashboards").context("no temp dir")?;
    let stack = Stack::start(dir.path())?;
    let result = prove_with(root, dir.path(), &stack, &panels);
    drop(stack);
    if result.is_err() {
        // The temp dir goes; the logs stay where one can read them.
        let kept = root.join("target/deploy-checks");
        std::fs::create_dir_all(&kept)?;
        for log in ["stack.log", "prometheus.log"] {
            let _ = std::fs::copy(dir.path().join(log), kept.join(log));
        }
        eprintln!(
            "xtask: the stack's and Prometheus' logs are in {}",
            kept.display()
        );
    }
    result
}

fn prove_with(
    root: &Path,
    dir: &Path,
    stack: &Stack,
    panels: &[(String, String)],
) -> Result<Vec<String>> {
    let prometheus = Prometheus::start(root, dir)?;
    drive_traffic(&stack.data).context("driving traffic")?;

    let deadline = Instant::now() + DATA_TIMEOUT;
    let mut empty: Vec<&(String, String)>;
    loop {
        empty = Vec::new();
        for panel in panels {
            let result = prometheus
                .query(&panel.1)
                .with_context(|| panel.0.clone())?;
            if result_is_empty(&result) {
                empty.push(panel);
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        // Keep the traffic flowing while rates fill their windows, once the client's
        // rate limit has refilled after the last burst.
        thread::sleep(Duration::from_secs(2));
        drive_traffic(&stack.data)?;
    }
    ensure!(
        empty.is_empty(),
        "panel queries with no data after {DATA_TIMEOUT:?}:\n{}",
        empty
            .iter()
            .map(|(panel, expr)| format!("    {panel}: {expr}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let rules = prometheus.rules()?;
    for (name, query) in &rules {
        prometheus
            .query(query)
            .with_context(|| format!("alert {name}"))?;
    }
    Ok(vec![
        format!(
            "{} panel queries from {} dashboards returned data",
            panels.len(),
            panels
                .iter()
                .map(|(panel, _)| panel.split(" / ").next().unwrap_or_default())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        ),
        format!(
            "{} alert rules loaded by Prometheus, evaluated without error",
            rules.len()
        ),
    ])
}

/// Every panel target's `expr` of every dashboard, as ("dashboard / panel", expr) with
/// Grafana's interval variables filled in.
fn dashboard_queries(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut queries = Vec::new();
    for file in super::files_in(dir, "json")? {
        let text = std::fs::read_to_string(&file)?;
        let dashboard: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let title = file.file_stem().unwrap_or_default().to_string_lossy();
        let mut pending: Vec<&Value> = dashboard["panels"]
            .as_array()
            .with_context(|| format!("{} has no panels", file.display()))?
            .iter()
            .collect();
        let mut count = 0;
        while let Some(panel) = pending.pop() {
            if let Some(nested) = panel["panels"].as_array() {
                pending.extend(nested);
            }
            if panel["type"] == "row" {
                continue;
            }
            let name = format!("{title} / {}", panel["title"].as_str().unwrap_or("?"));
            let exprs: Vec<&str> = panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|target| target["expr"].as_str())
                .collect();
            ensure!(!exprs.is_empty(), "{name} has no query");
            for expr in exprs {
                let expr = expr
                    .replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$__interval", "15s")
                    .replace("$__range", "5m");
                ensure!(
                    !expr.contains('$'),
                    "{name} uses a variable the test cannot fill: {expr}"
                );
                queries.push((name.clone(), expr));
                count += 1;
            }
        }
        ensure!(count > 0, "{} has no queries", file.display());
    }
    Ok(queries)
}

fn result_is_empty(data: &Value) -> bool {
    match data["resultType"].as_str() {
        Some("vector" | "matrix") => data["result"].as_array().is_none_or(Vec::is_empty),
        _ => data["result"].is_null(),
    }
}

/// `cargo xtask up` as a child, in its own process group, stopped with SIGINT on drop.
struct Stack {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    _interrupt: crate::interrupt::Registered,
}

impl Stack {
    fn start(dir: &Path) -> Result<Self> {
        let data = dir.join("data");
        let log = dir.join("stack.log");
        let output = File::create(&log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["up", "--data"])
            .arg(&data)
            // Low enough that a burst from one client is limited.
            .env("RATE_LIMIT_PER_CLIENT", "20/s")
            // Checks within seconds of the start, not within the default 30 s.
            .env("CHECK_INTERVAL", "3s")
            .env("CHECK_TIMEOUT", "1s")
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .process_group(0)
            .spawn()
            .context("cannot start `cargo xtask up`")?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let mut stack = Self {
            child,
            data,
            log,
            _interrupt: crate::interrupt::on_interrupt(move || stop_group(pid)),
        };
        let log = &stack.log.clone();
        let deadline = Instant::now() + Duration::from_secs(180);
        while !SERVICES
            .iter()
            .all(|(_, port)| http::status(*port, "/ready") == Some(200))
        {
            if let Some(status) = stack.child.try_wait()? {
                bail!("`cargo xtask up` exited ({status}):\n{}", tail(&stack.log));
            }
            if Instant::now() > deadline {
                stack.stop();
                bail!("the stack was not ready in time:\n{}", tail(log));
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(stack)
    }

    /// SIGINT, as Ctrl-C would (`up` stops its services in order); after 30 s, SIGKILL
    /// to its whole process group (`up` and a build it may still be running).
    fn stop(&mut self) {
        let group = i32::try_from(self.child.id()).map(|pid| Pid::from_raw(-pid));
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Ok(group) = group {
            let _ = kill(group, Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// From the signal handler, where the child cannot be waited for: SIGINT to `up`, up
/// to 30 s for it to stop its services, then SIGKILL to its process group.
fn stop_group(pid: i32) {
    if pid <= 0 {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // Gone, or a zombie nobody will reap now: stopped either way.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some(Some('Z'))) {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Requests of every kind the dashboards show, through the gateway.
fn drive_traffic(data: &Path) -> Result<()> {
    let admin = std::fs::read_to_string(data.join("admin-token"))?;
    let gateway = std::fs::read_to_string(data.join("gateway-token"))?;
    let bearer = |token: &str| format!("Bearer {}", token.trim());
    let admin = bearer(&admin);
    let as_admin = [("Authorization", admin.as_str())];

    let (status, body) = http::request(
        GATEWAY,
        "POST",
        "/api/credentials",
        &as_admin,
        Some(&format!(
            r#"{{"service":"payments","name":"db-password-{}","value":"not-a-real-secret"}}"#,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        )),
    )?;
    ensure!(status == 201, "creating a credential: {status} {body}");
    let created: Value = serde_json::from_str(&body)?;
    let id = created["id"].as_str().context("no credential id")?;
    let path = format!("/api/credentials/{id}");
    let (status, _) = http::request(GATEWAY, "GET", &path, &as_admin, None)?;
    ensure!(status == 200, "reading the credential: {status}");
    // The gateway's own token may not read credentials: a denial.
    let gateway = bearer(&gateway);
    let (status, _) = http::request(GATEWAY, "GET", &path, &[("Authorization", &gateway)], None)?;
    ensure!(status == 403, "a read without the scope: {status}");

    for (path, expected) in [
        ("/api/services", 200),
        ("/api/instances", 200),
        ("/api/health/services", 200),
        ("/no-such-service/", 404),
    ] {
        let (status, _) = http::request(GATEWAY, "GET", path, &as_admin, None)?;
        ensure!(status == expected, "GET {path}: {status}, not {expected}");
    }
    let (status, _) = http::request(GATEWAY, "GET", "/api/services", &[], None)?;
    ensure!(status == 401, "GET /api/services without a token: {status}");

    // Over the per-client limit: some of these are refused with 429.
    let mut limited = 0;
    for _ in 0..60 {
        if http::request(GATEWAY, "GET", "/api/services", &as_admin, None)?.0 == 429 {
            limited += 1;
        }
    }
    ensure!(limited > 0, "a burst of 60 was never rate limited");
    Ok(())
}

/// Debian's Prometheus on a free loopback port, scraping the stack every second with
/// our alert rules, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _interrupt: crate::interrupt::Registered,
}

impl Prometheus {
    fn start(root: &Path, dir: &Path) -> Result<Self> {
        let rules = super::files_in(&root.join("deploy/prometheus/rules"), "yml")?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n",
        );
        for rule in &rules {
            writeln!(config, "  - {}", rule.display())?;
        }
        config.push_str("scrape_configs:\n");
        for (job, port) in SERVICES {
            writeln!(
                config,
                "  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']"
            )?;
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let port = testkit::free_port().context("no free port")?;
        let log = File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start prometheus")?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let prometheus = Self {
            child,
            port,
            _interrupt: crate::interrupt::on_interrupt(move || {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http::status(port, "/-/ready") != Some(200) {
            ensure!(
                Instant::now() < deadline,
                "Prometheus was not ready in 30 s"
            );
            thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = http::request(self.port, "GET", path, &[], None)?;
        let answer: Value =
            serde_json::from_str(&body).with_context(|| format!("{status}: {body}"))?;
        ensure!(
            answer["status"] == "success",
            "{}: {}",
            answer["errorType"],
            answer["error"]
        );
        Ok(answer["data"].clone())
    }

    fn query(&self, expr: &str) -> Result<Value> {
        self.api(&format!("/api/v1/query?query={}", percent_encode(expr)))
            .with_context(|| format!("query {expr}"))
    }

    /// Every alerting rule's name and query, once each has been evaluated without error.
    fn rules(&self) -> Result<Vec<(String, String)>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let data = self.api("/api/v1/rules?type=alert")?;
            let rules: Vec<&Value> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|group| group["rules"].as_array().into_iter().flatten())
                .collect();
            ensure!(!rules.is_empty(), "Prometheus loaded no alert rules");
            let broken: Vec<String> = rules
                .iter()
                .filter(|rule| rule["health"] != "ok")
                .map(|rule| {
                    format!(
                        "{} ({}: {})",
                        rule["name"], rule["health"], rule["lastError"]
                    )
                })
                .collect();
            if broken.is_empty() {
                return Ok(rules
                    .iter()
                    .map(|rule| {
                        (
                            rule["name"].as_str().unwrap_or_default().to_owned(),
                            rule["query"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect());
            }
            ensure!(
                Instant::now() < deadline,
                "alert rules not evaluated cleanly: {}",
                broken.join(", ")
            );
            thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` for a URL's query string: everything but unreserved characters escaped.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            percent_encode(r#"sum(rate(x{a="b"}[1m])) > 0"#),
            "sum%28rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%29%20%3E%200"
        );
    }

    #[test]
    fn empty_results_are_told_from_data() {
        let empty = serde_json::json!({"resultType": "vector", "result": []});
        let data = serde_json::json!({"resultType": "vector", "result": [{"value": [1, "0"]}]});
        let scalar = serde_json::json!({"resultType": "scalar", "result": [1, "0"]});
        assert!(result_is_empty(&empty));
        assert!(!result_is_empty(&data));
        assert!(!result_is_empty(&scalar));
    }
}
