//! `cargo xtask bench …`: benchmarks that print figures side by side in one run, never
//! pass/fail (these machines are shared and noisy; ratios mean more than absolutes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::PgCluster;

use crate::{cargo, http, install, repo_root};

mod gateway;
mod monitor;

const USAGE: &str = "usage: cargo xtask bench vault|registry|gateway|health-monitor [--seconds N] [--connections N]";

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("vault") => vault(&Options::parse(&args[1..])?),
        Some("registry") => registry(&Options::parse(&args[1..])?),
        Some("gateway") => gateway::run(&Options::parse(&args[1..])?),
        Some("health-monitor") => monitor::run(&Options::parse(&args[1..])?),
        _ => bail!("{USAGE}"),
    }
}

struct Options {
    seconds: u64,
    connections: u32,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut options = Self {
            seconds: 10,
            connections: 32,
        };
        let mut rest = args.iter();
        while let Some(flag) = rest.next() {
            let value = rest
                .next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            match flag.as_str() {
                "--seconds" => options.seconds = value.parse().context("--seconds")?,
                "--connections" => options.connections = value.parse().context("--connections")?,
                _ => bail!("unknown option {flag}\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

/// A child process killed when dropped, so that a failed benchmark leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn release_binary(package: &str) -> Result<PathBuf> {
    build_release(&["--package", package], package)?;
    Ok(crate::cargo_target_dir().join("release").join(package))
}

fn release_example(package: &str, example: &str) -> Result<PathBuf> {
    build_release(&["--package", package, "--example", example], example)?;
    Ok(crate::cargo_target_dir()
        .join("release/examples")
        .join(example))
}

fn build_release(args: &[&str], what: &str) -> Result<()> {
    let status = cargo()
        .args(["build", "--release"])
        .args(args)
        .current_dir(repo_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("building {what} failed");
    }
    Ok(())
}

fn run_ok(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn psql(postgres: &PgCluster, database: &str, sql: &str) -> Result<String> {
    run_ok(
        Command::new(postgres.bindir().join("psql"))
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-X", "-d"])
            .arg(postgres.url(database))
            .args(["-c", sql]),
    )
}

/// What wrk measured.
struct Load {
    /// Requests completed in the run, as wrk counted them.
    requests: u64,
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// wrk's own lines about them, when there were any.
    error_kinds: String,
}

fn wrk(url: &str, connections: u32, seconds: u64, headers: &[String]) -> Result<Load> {
    let mut command = Command::new("wrk");
    if connections > 1000 {
        command.args(["--timeout", "10s"]);
    }
    command.args([
        "-t",
        "2",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = run_ok(command.arg(url))?;
    let number = |label: &str| -> Option<f64> {
        out.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next().map(str::to_owned))
            .and_then(|value| parse_duration_ms(&value).or_else(|| value.parse().ok()))
    };
    // `Non-2xx or 3xx responses: N` and `Socket errors: connect A, read B, write C, timeout D`.
    let error_lines: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("Non-2xx") || line.starts_with("Socket errors:"))
        .collect();
    let errors = error_lines
        .iter()
        .filter_map(|line| line.split_once(':').map(|(_, rest)| rest))
        .flat_map(|rest| {
            rest.split([',', ' '])
                .filter_map(|word| word.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    // `123456 requests in 10.00s, 1.20MB read`
    let requests = out
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(count, _)| count.parse().ok())
        .context("wrk printed no request count")?;
    Ok(Load {
        requests,
        requests_per_second: number("Requests/sec:").context("wrk printed no Requests/sec")?,
        p50_ms: number("50%").context("wrk printed no p50")?,
        p99_ms: number("99%").context("wrk printed no p99")?,
        errors,
        error_kinds: error_lines.join("; "),
    })
}

/// wrk prints latencies as `812.00us`, `1.20ms` or `2.01s`.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn json_field(body: &str, field: &str) -> Result<String> {
    let value: serde_json::Value = serde_json::from_str(body).context("the answer is not JSON")?;
    value[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the answer has no {field}"))
}

/// An initialized vault (release build) on `database_url`; its guard, port and token folder.
fn start_vault(
    binary: &Path,
    database_url: &str,
    work: &Path,
    extra: &[(&str, &str)],
) -> Result<(Guard, u16, PathBuf)> {
    let master_key = work.join("master-key");
    run_ok(
        Command::new(binary)
            .arg("generate-master-key")
            .arg("--out")
            .arg(&master_key),
    )?;
    let tokens = work.join("tokens");
    run_ok(
        Command::new(binary)
            .arg("init")
            .arg("--out")
            .arg(&tokens)
            .env("DATABASE_URL", database_url)
            .env("VAULT_MASTER_KEY_FILE", &master_key),
    )?;
    let port = testkit::free_port()?;
    let vault = spawn_service(
        binary,
        port,
        &[
            ("DATABASE_URL", database_url),
            (
                "VAULT_MASTER_KEY_FILE",
                master_key.to_str().unwrap_or_default(),
            ),
        ],
        extra,
    )?;
    Ok((vault, port, tokens))
}

/// Starts a service binary on `port` and waits for `/ready`.
fn spawn_service(
    binary: &Path,
    port: u16,
    env: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Result<Guard> {
    spawn_command(Command::new(binary), binary, port, env, extra)
}

/// [`spawn_service`] for a service started by `command` (under valgrind, say).
fn spawn_command(
    mut command: Command,
    binary: &Path,
    port: u16,
    env: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Result<Guard> {
    let guard = Guard(
        command
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?,
    );
    let started = Instant::now();
    while http::status(port, "/ready") != Some(200) {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{} did not become ready", binary.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}

/// The vault's audited reads beside pgbench's single-row inserts, on one durable PostgreSQL.
fn vault(options: &Options) -> Result<()> {
    install::ensure("the vault benchmark", &[("wrk", install::on_path("wrk"))])?;
    let binary = release_binary("credential-vault")?;
    let postgres = PgCluster::start_durable().context("cannot start PostgreSQL")?;
    psql(&postgres, "postgres", "CREATE DATABASE vault")?;
    psql(&postgres, "postgres", "CREATE DATABASE inserts")?;
    let work = testkit::TempDir::new("concierge-bench")?;
    let database_url = postgres.url("vault");
    let (_vault, port, tokens) = start_vault(
        &binary,
        &database_url,
        work.path(),
        &[("DB_POOL_SIZE", "16")],
    )?;

    let admin = std::fs::read_to_string(tokens.join("admin-token"))?;
    let admin_header = format!("Bearer {admin}");
    let (status, body) = http::request(
        port,
        "POST",
        "/api/credentials",
        &[("Authorization", &admin_header)],
        Some(
            r#"{"service":"payments","name":"db-password","value":{"user":"app","password":"bench-only"}}"#,
        ),
    )?;
    if status != 201 {
        bail!("cannot create the credential: {status} {body}");
    }
    let id = json_field(&body, "id")?;
    let (status, body) = http::request(
        port,
        "POST",
        "/api/tokens",
        &[("Authorization", &admin_header)],
        Some(r#"{"service":"payments"}"#),
    )?;
    if status != 201 {
        bail!("cannot issue a token: {status} {body}");
    }
    let token = json_field(&body, "token")?;
    let url = format!("http://127.0.0.1:{port}/api/credentials/{id}");
    let auth = vec![format!("Authorization: Bearer {token}")];

    // The two sides take turns, a few seconds each, so that a noisy neighbour slows
    // both alike instead of one side's whole run (these machines are shared).
    let rounds = VAULT_ROUNDS;
    let per_round = options.seconds.div_ceil(rounds).max(2);
    println!(
        "vault bench: {} connections, {rounds} rounds of {per_round} s per side, taking turns; one PostgreSQL (fsync on, synchronous_commit on), 2 cores shared",
        options.connections
    );
    psql(
        &postgres,
        "inserts",
        "CREATE TABLE bench_insert (id BIGSERIAL PRIMARY KEY, at TIMESTAMP NOT NULL, actor TEXT NOT NULL, detail TEXT NOT NULL)",
    )?;
    // Warm-up for both sides: pools, caches, prepared statements.
    wrk(&url, options.connections, 3, &auth)?;
    pgbench_inserts(&postgres, options.connections, 3)?;
    let mut turns = Vec::new();
    for _ in 0..rounds {
        let reads = wrk(&url, options.connections, per_round, &auth)?;
        let inserts = pgbench_inserts(&postgres, options.connections, per_round)?;
        turns.push((reads, inserts));
    }

    let (_, metrics) = http::request(port, "GET", "/metrics", &[], None)?;
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let batches = metric("concierge_vault_audit_batch_size_count");
    let batch_records = metric("concierge_vault_audit_batch_size_sum");
    let batch_seconds = metric("concierge_vault_audit_append_duration_seconds_sum");
    let audit_rows = psql(&postgres, "vault", "SELECT count(*) FROM audit_log")?;

    let mut ratios = Vec::new();
    for (round, (reads, inserts)) in turns.iter().enumerate() {
        let ratio = reads.requests_per_second / inserts;
        println!(
            "round {}: {:.0} reads/s, {inserts:.0} inserts/s, ratio {ratio:.2}",
            round + 1,
            reads.requests_per_second
        );
        ratios.push(ratio);
    }
    let reads_per_second = turns
        .iter()
        .map(|(r, _)| r.requests_per_second)
        .sum::<f64>()
        / turns.len() as f64;
    let inserts_per_second = turns.iter().map(|(_, i)| i).sum::<f64>() / turns.len() as f64;
    let p50s: Vec<f64> = turns.iter().map(|(r, _)| r.p50_ms).collect();
    let p99 = turns.iter().map(|(r, _)| r.p99_ms).fold(0.0, f64::max);
    let errors: u64 = turns.iter().map(|(r, _)| r.errors).sum();
    println!(
        "vault GET /api/credentials/{{id}}: {reads_per_second:.0} reads/s, p50 {:.2} ms (median round), p99 {p99:.2} ms (worst round), {errors} errors (each read appends an audit record)",
        median(&p50s)
    );
    println!("pgbench single-row INSERT:       {inserts_per_second:.0} inserts/s");
    println!(
        "ratio reads/s ÷ inserts/s:       {:.2} over all rounds, median round {:.2}, worst {:.2} (target ≥ 1.0)",
        reads_per_second / inserts_per_second,
        median(&ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min)
    );
    println!(
        "audit group commit:              {:.1} records per transaction, {:.2} ms per transaction; {} records in all",
        batch_records / batches,
        batch_seconds / batches * 1e3,
        audit_rows.lines().nth(2).unwrap_or_default().trim()
    );
    Ok(())
}

/// The middle value of rounds (the upper one of an even count); NaN for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// How many turns each side of the vault benchmark takes.
const VAULT_ROUNDS: u64 = 5;

/// pgbench's single-row inserts into `bench_insert` for `seconds`, at `connections`.
fn pgbench_inserts(postgres: &PgCluster, connections: u32, seconds: u64) -> Result<f64> {
    let script = Path::new(&std::env::temp_dir())
        .join(format!("concierge-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "INSERT INTO bench_insert (at, actor, detail) VALUES (now(), 'payments', 'credential.read');\n",
    )?;
    let out = run_ok(
        Command::new(postgres.bindir().join("pgbench"))
            .args([
                "-n",
                "-c",
                &connections.to_string(),
                "-j",
                "2",
                "-T",
                &seconds.to_string(),
            ])
            .arg("-f")
            .arg(&script)
            .arg(postgres.url("inserts")),
    );
    let _ = std::fs::remove_file(&script);
    let out = out?;
    out.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("pgbench printed no tps:\n{out}"))
}

/// Discovery beside nginx serving the same body as a file, then how fast a registration
/// reaches an event subscriber and a second registry.
fn registry(options: &Options) -> Result<()> {
    install::ensure(
        "the registry benchmark",
        &[
            ("wrk", install::on_path("wrk")),
            ("nginx", Path::new("/usr/sbin/nginx").exists()),
        ],
    )?;
    let vault_binary = release_binary("credential-vault")?;
    let registry_binary = release_binary("service-registry")?;
    let postgres = PgCluster::start().context("cannot start PostgreSQL")?;
    psql(&postgres, "postgres", "CREATE DATABASE vault")?;
    psql(&postgres, "postgres", "CREATE DATABASE registry")?;
    let redis = testkit::RedisServer::start().context("cannot start Redis")?;
    let work = testkit::TempDir::new("concierge-bench")?;
    let (_vault, vault_port, tokens) =
        start_vault(&vault_binary, &postgres.url("vault"), work.path(), &[])?;
    let admin = std::fs::read_to_string(tokens.join("admin-token"))?;
    let admin_header = format!("Bearer {admin}");
    let vault_url = format!("http://127.0.0.1:{vault_port}");
    let registry_db = postgres.url("registry");
    let registry_env = [
        ("DATABASE_URL", registry_db.as_str()),
        ("VAULT_URL", vault_url.as_str()),
        ("HEARTBEAT_INTERVAL", "300s"),
        ("HTTP_WORKERS", "2"),
    ];
    let redis_url = redis.url();
    let with_redis = [
        ("REDIS_URL", redis_url.as_str()),
        ("RESYNC_INTERVAL", "60s"),
    ];
    let (port_a, port_b) = (testkit::free_port()?, testkit::free_port()?);
    let _a = spawn_service(&registry_binary, port_a, &registry_env, &with_redis)?;
    let _b = spawn_service(&registry_binary, port_b, &registry_env, &with_redis)?;

    println!("registry bench: registering 200 services x 5 instances");
    for service in 0..200 {
        for instance in 0..5 {
            let body = format!(
                r#"{{"name":"svc-{service:03}","address":"10.0.{service}.{instance}","port":8000,"health_endpoint":"/health","instance_id":"svc-{service:03}-{instance}","version":"1.0.0","tags":["blue"]}}"#
            );
            let (status, answer) = http::request(
                port_a,
                "POST",
                "/api/services/register",
                &[("Authorization", &admin_header)],
                Some(&body),
            )?;
            if status != 201 {
                bail!("registration failed: {status} {answer}");
            }
        }
    }

    // The same body, served by nginx from a file.
    let path = "/api/discover?service=svc-042";
    let (status, body) = http::request(
        port_a,
        "GET",
        path,
        &[("Authorization", &admin_header)],
        None,
    )?;
    if status != 200 {
        bail!("discovery failed: {status} {body}");
    }
    let root = work.path().join("www");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("discover.json"), &body)?;
    let nginx_port = testkit::free_port()?;
    let conf = work.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\nevents {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000; default_type application/json;\n\
             client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
             server {{ listen 127.0.0.1:{nginx_port}; root {root}; location / {{ try_files /discover.json =404; }} }} }}\n",
            dir = work.path().display(),
            root = root.display(),
        ),
    )?;
    let _nginx = Guard(
        Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx")?,
    );
    testkit::wait_for_port(nginx_port, Duration::from_secs(10))?;

    let auth = vec![format!("Authorization: {admin_header}")];
    let registry_url = format!("http://127.0.0.1:{port_a}{path}");
    let nginx_url = format!("http://127.0.0.1:{nginx_port}{path}");
    wrk(&registry_url, 64, 2, &auth)?;
    let discover = wrk(&registry_url, 64, options.seconds, &auth)?;
    wrk(&nginx_url, 64, 2, &[])?;
    let file = wrk(&nginx_url, 64, options.seconds, &[])?;
    println!(
        "registry bench: 64 connections, {} s each, body {} bytes, registry and nginx with 2 workers each, 2 cores shared",
        options.seconds,
        body.len()
    );
    println!(
        "registry GET /api/discover:  {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        discover.requests_per_second, discover.p50_ms, discover.p99_ms, discover.errors
    );
    println!(
        "nginx static file:           {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        file.requests_per_second, file.p50_ms, file.p99_ms, file.errors
    );
    println!(
        "ratio registry ÷ nginx:      {:.2} (target ≥ 0.8)",
        discover.requests_per_second / file.requests_per_second
    );

    propagation(port_a, port_b, &admin_header, redis.port())
}

/// Registers 100 instances one by one through registry A and times, from each 201, the
/// event at a Redis subscriber and the change showing in registry B.
fn propagation(port_a: u16, port_b: u16, admin_header: &str, redis_port: u16) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};

    let mut subscriber = std::net::TcpStream::connect(("127.0.0.1", redis_port))?;
    subscriber.write_all(b"SUBSCRIBE concierge:registry\r\n")?;
    let (arrivals_tx, arrivals) = std::sync::mpsc::channel::<(String, Instant)>();
    let reader = BufReader::new(subscriber.try_clone()?);
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            if let Some(at) = line.find("\"instance_id\":\"prop-") {
                let rest = &line[at + 15..];
                let id: String = rest.chars().take_while(|c| *c != '"').collect();
                let _ = arrivals_tx.send((id, Instant::now()));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let (mut to_event, mut to_peer, mut to_created) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..100 {
        let id = format!("prop-{i}");
        let body = format!(
            r#"{{"name":"propagation","address":"10.9.0.1","port":{},"health_endpoint":"/health","instance_id":"{id}"}}"#,
            1000 + i
        );
        let sent = Instant::now();
        let (status, answer) = http::request(
            port_a,
            "POST",
            "/api/services/register",
            &[("Authorization", admin_header)],
            Some(&body),
        )?;
        let registered = Instant::now();
        to_created.push(registered - sent);
        if status != 201 {
            bail!("registration failed: {status} {answer}");
        }
        loop {
            let (got, at) = arrivals
                .recv_timeout(Duration::from_secs(5))
                .context("no event arrived")?;
            if got == id {
                // The registry publishes before it answers: time from the request.
                to_event.push(at.saturating_duration_since(sent));
                break;
            }
        }
        loop {
            let (status, text) = http::request(
                port_b,
                "GET",
                "/api/services/propagation",
                &[("Authorization", admin_header)],
                None,
            )?;
            if status == 200 && text.contains(&format!("\"{id}\"")) {
                to_peer.push(registered.elapsed());
                break;
            }
            if registered.elapsed() > Duration::from_secs(5) {
                bail!("registry B never showed {id}");
            }
        }
    }
    let percentile = |samples: &mut Vec<Duration>, p: f64| -> f64 {
        samples.sort();
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples
            .get(index)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "registration request → its 201:               p50 {:.2} ms, p99 {:.2} ms (100 registrations)",
        percentile(&mut to_created, 0.5),
        percentile(&mut to_created, 0.99)
    );
    println!(
        "registration request → event at a subscriber: p50 {:.2} ms, p99 {:.2} ms (published before the 201)",
        percentile(&mut to_event, 0.5),
        percentile(&mut to_event, 0.99)
    );
    println!(
        "registration 201 → visible in a 2nd registry:  p50 {:.2} ms, p99 {:.2} ms (with Redis; polled)",
        percentile(&mut to_peer, 0.5),
        percentile(&mut to_peer, 0.99)
    );
    Ok(())
}
