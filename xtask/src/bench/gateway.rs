//! `cargo xtask bench gateway`: one upstream (nginx answering a small body), loaded
//! directly and through nginx as a reverse proxy (1 worker), HAProxy (1 thread) and the
//! gateway (1 worker thread), each with wrk and 64 keep-alive connections, taking turns in
//! three rounds so that a noisy neighbour weighs on all of them alike; then the
//! gateway and nginx at 10,000 concurrent connections, with each one's peak memory.
//!
//! The gateway runs twice: to the upstream's HTTP/1.1 port, as nginx and HAProxy do, and
//! to its h2c port (a route with `upstream_protocol` h2c). Beside it runs hyper's floor
//! (`examples/hyper_floor.rs`), a proxy with none of the gateway's features, to show
//! what the hyper stack costs before any of the gateway's own work.
//!
//! Besides requests per second and latency it prints requests per CPU-second of each
//! proxy's own process (from /proc before and after), which is what "faster per CPU"
//! means on a machine that wrk, the upstream and the proxy share. CPU time moves with the
//! neighbours on a shared machine; so each proxy also runs once under callgrind, whose
//! count of the instructions it executes per request does not (user space only: the
//! kernel's TCP work, much the same for all, is not in it).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    Guard, Load, Options, median, release_binary, release_example, spawn_service, start_vault, wrk,
};
use crate::{http, install};

const BODY: &str = "hello from the upstream\\n";

pub fn run(options: &Options) -> Result<()> {
    install::ensure(
        "the gateway benchmark",
        &[
            ("wrk", install::on_path("wrk")),
            ("nginx", Path::new("/usr/sbin/nginx").exists()),
            ("haproxy", Path::new("/usr/sbin/haproxy").exists()),
            ("valgrind", install::on_path("callgrind_control")),
        ],
    )?;
    raise_file_limit()?;
    let vault_binary = release_binary("credential-vault")?;
    let registry_binary = release_binary("service-registry")?;
    let gateway_binary = release_binary("gateway")?;
    let floor_binary = release_example("gateway", "hyper_floor")?;
    let work = testkit::TempDir::new("concierge-bench")?;
    let dir = work.path();

    // One upstream server on two ports, HTTP/1.1 and h2c: nginx 1.22 cannot serve both on
    // one plain-text port.
    let upstream_port = testkit::free_port()?;
    let upstream_h2c_port = testkit::free_port()?;
    let upstream = nginx(
        dir,
        "upstream",
        &format!(
            "server {{ listen 127.0.0.1:{upstream_port} backlog=65535; listen 127.0.0.1:{upstream_h2c_port} http2 backlog=65535;\n\
             keepalive_requests 10000000; keepalive_timeout 1h;\n\
             location / {{ default_type text/plain; return 200 \"{BODY}\"; }} }}"
        ),
    )?;
    let nginx_proxy_server = |port: u16| {
        format!(
            "upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 256; keepalive_requests 10000000; }}\n\
             server {{ listen 127.0.0.1:{port} backlog=65535; keepalive_requests 10000000;\n\
             location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        )
    };
    let nginx_port = testkit::free_port()?;
    let nginx_proxy = nginx(dir, "proxy", &nginx_proxy_server(nginx_port))?;
    let haproxy_port = testkit::free_port()?;
    let haproxy = start_haproxy(dir, haproxy_port, upstream_port, None)?;

    // The gateway routes from a real registry, which learns the upstream from a registration.
    let (_vault, vault_port, tokens) = start_vault(
        &vault_binary,
        &format!("sqlite://{}/vault.db", dir.display()),
        dir,
        &[],
    )?;
    let vault_url = format!("http://127.0.0.1:{vault_port}");
    let registry_port = testkit::free_port()?;
    let registry_db = format!("sqlite://{}/registry.db", dir.display());
    let registry_token = tokens.join("service-registry-token");
    let _registry = spawn_service(
        &registry_binary,
        registry_port,
        &[
            ("DATABASE_URL", registry_db.as_str()),
            ("VAULT_URL", vault_url.as_str()),
            ("TOKEN_FILE", registry_token.to_str().unwrap_or_default()),
            ("HEARTBEAT_INTERVAL", "1h"),
        ],
        &[],
    )?;
    let admin = std::fs::read_to_string(tokens.join("admin-token"))?;
    let admin_header = format!("Bearer {}", admin.trim());
    for (name, port) in [("bench", upstream_port), ("bench-h2c", upstream_h2c_port)] {
        let registration = format!(
            r#"{{"name":"{name}","instance_id":"{name}-1","address":"127.0.0.1","port":{port},"health_endpoint":"/"}}"#
        );
        let (status, answer) = http::request(
            registry_port,
            "POST",
            "/api/services/register",
            &[("Authorization", &admin_header)],
            Some(&registration),
        )?;
        if status != 201 {
            bail!("registering the upstream as {name} failed: {status} {answer}");
        }
    }
    let routes_file = dir.join("routes.json");
    std::fs::write(
        &routes_file,
        r#"{"routes": [{"prefix": "/bench-h2c", "upstream_protocol": "h2c"}]}"#,
    )?;
    let registry_url = format!("http://127.0.0.1:{registry_port}");
    let gateway_token = tokens.join("gateway-token");
    let start_gateway = |counted: Option<&Path>| -> Result<(Guard, u16)> {
        let port = testkit::free_port()?;
        let guard = super::spawn_command(
            program(&gateway_binary, counted),
            &gateway_binary,
            port,
            &[
                ("REGISTRY_URL", registry_url.as_str()),
                ("VAULT_URL", vault_url.as_str()),
                ("TOKEN_FILE", gateway_token.to_str().unwrap_or_default()),
                ("HTTP_WORKERS", "1"),
                ("ROUTES_FILE", routes_file.to_str().unwrap_or_default()),
            ],
            &[],
        )?;
        let started = Instant::now();
        for path in ["/bench/", "/bench-h2c/"] {
            while http::status(port, path) != Some(200) {
                if started.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "the gateway never routed {path}: {:?}",
                        http::status(port, path)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok((guard, port))
    };
    let (gateway, gateway_port) = start_gateway(None)?;
    let floor = |mode: &str, upstream: u16, counted: Option<&Path>| -> Result<(Guard, u16)> {
        let port = testkit::free_port()?;
        let guard = Guard(
            program(&floor_binary, counted)
                .args([mode, &port.to_string(), &upstream.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start the hyper floor")?,
        );
        testkit::wait_for_port(port, Duration::from_secs(30))?;
        Ok((guard, port))
    };
    let (floor_http1, floor_http1_port) = floor("http1", upstream_port, None)?;
    let (floor_h2c, floor_h2c_port) = floor("h2c", upstream_h2c_port, None)?;

    let targets = [
        (
            "upstream direct",
            format!("http://127.0.0.1:{upstream_port}/"),
            None,
        ),
        (
            "nginx proxy (1 worker)",
            format!("http://127.0.0.1:{nginx_port}/"),
            Some(nginx_proxy.0.id()),
        ),
        (
            "HAProxy (1 thread)",
            format!("http://127.0.0.1:{haproxy_port}/"),
            Some(haproxy.0.id()),
        ),
        (
            "gateway (1 thread)",
            format!("http://127.0.0.1:{gateway_port}/bench/"),
            Some(gateway.0.id()),
        ),
        (
            "gateway, h2c upstream",
            format!("http://127.0.0.1:{gateway_port}/bench-h2c/"),
            Some(gateway.0.id()),
        ),
        (
            "hyper floor, HTTP/1.1",
            format!("http://127.0.0.1:{floor_http1_port}/"),
            Some(floor_http1.0.id()),
        ),
        (
            "hyper floor, h2c",
            format!("http://127.0.0.1:{floor_h2c_port}/"),
            Some(floor_h2c.0.id()),
        ),
    ];
    // The targets take turns, a few seconds each per round, so that a noisy neighbour
    // weighs on all of them alike (these machines are shared).
    let per_round = options.seconds.div_ceil(GATEWAY_ROUNDS).max(2);
    println!(
        "gateway bench: wrk 2 threads, 64 keep-alive connections, {GATEWAY_ROUNDS} rounds of {per_round} s per target taking turns, after a 2 s warm-up each; 2 cores shared by all"
    );
    for (_, url, _) in &targets {
        wrk(url, 64, 2, &[])?;
    }
    let mut totals: Vec<Total> = targets.iter().map(|_| Total::default()).collect();
    for _ in 0..GATEWAY_ROUNDS {
        for ((_, url, pid), total) in targets.iter().zip(&mut totals) {
            let cpu_before = pid.map(cpu_times).transpose()?;
            let upstream_before = cpu_seconds(upstream.0.id())?;
            let load = wrk(url, 64, per_round, &[])?;
            total.upstream_cpu += cpu_seconds(upstream.0.id())? - upstream_before;
            if let (Some(pid), Some(before)) = (pid, cpu_before) {
                total.add_cpu(cpu_times(*pid)? - before);
            }
            total.add(&load, per_round);
        }
    }
    for ((name, _, _), total) in targets.iter().zip(&totals) {
        print_line(name, total);
    }
    let per_cpu = |i: usize| totals[i].per_cpu_second();
    if let (Some(nginx), Some(haproxy)) = (per_cpu(1), per_cpu(2)) {
        println!("requests per CPU-second ÷ nginx's (target ≥ 1.1 for the gateway), ÷ HAProxy's:");
        for (i, (name, _, _)) in targets.iter().enumerate().skip(3) {
            if let Some(own) = per_cpu(i) {
                println!("  {name:<24} {:.2}   {:.2}", own / nginx, own / haproxy);
            }
        }
    }
    // The kernel's TCP work is much the same for every proxy: the user-space CPU per
    // request tells how lean each one's own code is, and the hyper floor of the same
    // upstream protocol what the gateway's features cost over hyper alone.
    let own = |i: usize| totals[i].own_per_request();
    if let Some(nginx) = own(1) {
        println!(
            "own code per request ÷ nginx's, requests per CPU-second ÷ the hyper floor's (same upstream protocol):"
        );
        for (i, floor) in [(3, 5), (4, 6)] {
            if let (Some(gateway), Some(ratio)) = (own(i), per_cpu(i).zip(per_cpu(floor))) {
                println!(
                    "  {:<24} {:.2}   {:.2}",
                    targets[i].0,
                    gateway / nginx,
                    ratio.0 / ratio.1
                );
            }
        }
    }
    println!(
        "p99 gateway {:.2} ms vs nginx {:.2} ms, median round (target: at most nginx's); rounds: gateway {}, nginx {}",
        totals[3].median_p99(),
        totals[1].median_p99(),
        totals[3].p99s(),
        totals[1].p99s()
    );

    // Instructions per request, counted by callgrind in a copy of each proxy: a count that a
    // noisy neighbour does not move, where CPU time does. The kernel's share is not in it.
    println!(
        "instructions per request in the proxy's own process (callgrind, {COUNTED_CONNECTIONS} connections, {per_round} s each; noise does not move them), ÷ nginx's:"
    );
    let mut counts: Vec<(&str, f64)> = Vec::new();
    for (index, (name, _, _)) in targets.iter().enumerate().skip(1) {
        let out = dir.join(format!("callgrind-{index}.out"));
        let counted = Some(out.as_path());
        let (guard, url) = match index {
            1 => {
                let port = testkit::free_port()?;
                let guard = nginx_counted(dir, "counted", &nginx_proxy_server(port), counted)?;
                (guard, format!("http://127.0.0.1:{port}/"))
            }
            2 => {
                let port = testkit::free_port()?;
                let guard = start_haproxy(dir, port, upstream_port, counted)?;
                (guard, format!("http://127.0.0.1:{port}/"))
            }
            3 | 4 => {
                let (guard, port) = start_gateway(counted)?;
                let path = if index == 3 { "/bench/" } else { "/bench-h2c/" };
                (guard, format!("http://127.0.0.1:{port}{path}"))
            }
            _ => {
                let (mode, upstream) = if index == 5 {
                    ("http1", upstream_port)
                } else {
                    ("h2c", upstream_h2c_port)
                };
                let (guard, port) = floor(mode, upstream, counted)?;
                (guard, format!("http://127.0.0.1:{port}/"))
            }
        };
        let per_request = instructions_per_request(&guard, &out, &url, per_round)?;
        counts.push((name, per_request));
    }
    let nginx_count = counts.first().map_or(1.0, |(_, count)| *count);
    for (name, count) in &counts {
        println!("  {name:<24} {count:>8.0}   {:.2}", count / nginx_count);
    }

    // The crowd: the gateway, then nginx, each at 10,000 connections, with the peak
    // memory each process reached (all of it in this phase: the rounds above need far
    // less).
    let connections = 10_000;
    let mut peaks = Vec::new();
    for index in [3, 1] {
        let (name, url, pid) = &targets[index];
        let crowd = wrk(url, connections, options.seconds, &[])?;
        let kinds = if crowd.error_kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", crowd.error_kinds)
        };
        let peak = pid
            .map(super::monitor::peak_rss)
            .transpose()?
            .map_or(0.0, |bytes| bytes as f64 / 1024.0 / 1024.0);
        peaks.push(peak);
        let target = if index == 3 { " (target 0)" } else { "" };
        println!(
            "{name} at {connections} concurrent connections: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors{kinds}{target}; peak RSS {peak:.0} MiB",
            crowd.requests_per_second, crowd.p50_ms, crowd.p99_ms, crowd.errors
        );
    }
    if let [gateway, nginx] = peaks[..]
        && nginx > 0.0
    {
        println!(
            "peak RSS at {connections} connections, gateway ÷ nginx: {:.2}",
            gateway / nginx
        );
    }
    Ok(())
}

/// The connections wrk holds to a proxy whose instructions are counted: enough for several
/// requests to be in flight at once, as under load, in a process valgrind slows down.
const COUNTED_CONNECTIONS: u32 = 16;

/// `program`, or valgrind's callgrind running it when `counted` names an output file.
fn program(program: &Path, counted: Option<&Path>) -> Command {
    match counted {
        None => Command::new(program),
        Some(out) => {
            let mut command = Command::new("valgrind");
            command
                .args(["--tool=callgrind", "--quiet"])
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(program);
            command
        }
    }
}

/// Loads `url` with wrk for `seconds` and returns the instructions the process under
/// callgrind (`guard`, writing to `out`) executed per request meanwhile.
fn instructions_per_request(guard: &Guard, out: &Path, url: &str, seconds: u64) -> Result<f64> {
    let pid = guard.0.id().to_string();
    // callgrind_control exits 0 also when it reached no process: its "OK." says it did.
    let control = |action: &str| -> Result<()> {
        let said = super::run_ok(Command::new("callgrind_control").args([action, &pid]))?;
        if !said.contains("OK.") {
            bail!("callgrind_control {action} {pid}: {}", said.trim());
        }
        Ok(())
    };
    // Warmed up first, as the rounds above were: connections made, buffers grown.
    wrk(url, COUNTED_CONNECTIONS, 1, &[])?;
    control("--zero")?;
    let load = wrk(url, COUNTED_CONNECTIONS, seconds, &[])?;
    control("--dump")?;
    if load.errors > 0 {
        bail!("{url} answered {} errors under callgrind", load.errors);
    }
    // The dump since the counters were zeroed: `summary: N` among its first lines.
    let dump = out.with_extension("out.1");
    let started = Instant::now();
    let instructions = loop {
        let text = std::fs::read_to_string(&dump).unwrap_or_default();
        if let Some(total) = text
            .lines()
            .find_map(|line| line.strip_prefix("summary: "))
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            break total;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("callgrind wrote no dump to {}", dump.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(instructions as f64 / load.requests.max(1) as f64)
}

/// How many turns each target of the gateway benchmark takes.
const GATEWAY_ROUNDS: u64 = 3;

/// One target's rounds added up.
#[derive(Debug, Default)]
struct Total {
    requests: f64,
    seconds: f64,
    errors: u64,
    p50s_ms: Vec<f64>,
    p99s_ms: Vec<f64>,
    cpu: Option<CpuTime>,
    /// The upstream's CPU seconds meanwhile: what a proxy's way of talking to it costs it.
    upstream_cpu: f64,
}

impl Total {
    fn add(&mut self, load: &Load, seconds: u64) {
        self.requests += load.requests_per_second * seconds as f64;
        self.seconds += seconds as f64;
        self.errors += load.errors;
        self.p50s_ms.push(load.p50_ms);
        self.p99s_ms.push(load.p99_ms);
    }

    fn add_cpu(&mut self, cpu: CpuTime) {
        let sum = self.cpu.map_or(cpu, |so_far| CpuTime {
            user: so_far.user + cpu.user,
            kernel: so_far.kernel + cpu.kernel,
        });
        self.cpu = Some(sum);
    }

    fn per_cpu_second(&self) -> Option<f64> {
        self.cpu
            .map(|cpu| self.requests / (cpu.user + cpu.kernel).max(1e-3))
    }

    /// User-space CPU seconds per request: the proxy's own code, without the kernel's.
    fn own_per_request(&self) -> Option<f64> {
        self.cpu.map(|cpu| cpu.user / self.requests.max(1.0))
    }

    fn median_p50(&self) -> f64 {
        median(&self.p50s_ms)
    }

    fn median_p99(&self) -> f64 {
        median(&self.p99s_ms)
    }

    fn p99s(&self) -> String {
        let rounds: Vec<String> = self.p99s_ms.iter().map(|p| format!("{p:.2}")).collect();
        rounds.join("/")
    }
}

fn print_line(name: &str, total: &Total) {
    let efficiency = total.cpu.map_or_else(
        || "-".to_owned(),
        |cpu| {
            let requests = total.requests.max(1.0);
            // Where a request's CPU goes: the proxy's own code, and the kernel's TCP work
            // (four socket operations a request, unless requests share an h2c connection).
            format!(
                "{:.0} req per CPU-s ({:.2} CPU-s; per request {:.1} µs own code + {:.1} µs kernel)",
                total.per_cpu_second().unwrap_or_default(),
                cpu.user + cpu.kernel,
                total.own_per_request().unwrap_or_default() * 1e6,
                cpu.kernel / requests * 1e6
            )
        },
    );
    println!(
        "{name:<24} {:>8.0} req/s, p50 {:.2} ms, p99 {:.2} ms (median round), {} errors, {efficiency}; upstream {:.1} µs per request",
        total.requests / total.seconds.max(1.0),
        total.median_p50(),
        total.median_p99(),
        total.errors,
        total.upstream_cpu / total.requests.max(1.0) * 1e6
    );
}

/// User plus system CPU time of a process so far, in seconds (from /proc/PID/stat).
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    cpu_times(pid).map(|time| time.user + time.kernel)
}

/// CPU time of a process so far, in seconds, spent in its own code and in the kernel.
#[derive(Debug, Clone, Copy)]
struct CpuTime {
    user: f64,
    kernel: f64,
}

impl std::ops::Sub for CpuTime {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            kernel: self.kernel - earlier.kernel,
        }
    }
}

fn cpu_times(pid: u32) -> Result<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index)
            .context("short /proc stat line")?
            .parse::<f64>()
            .unwrap_or(0.0))
    };
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(CpuTime {
        user: ticks(11)? / per_second,
        kernel: ticks(12)? / per_second,
    })
}

/// Lets this process and its children (wrk, the proxies) hold 10,000 connections and more.
pub(super) fn raise_file_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 200_000;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // Root may raise the hard limit too; anyone may raise the soft one up to it.
    if setrlimit(Resource::RLIMIT_NOFILE, WANTED, WANTED.max(hard)).is_ok() {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    // wrk's 10,000 connections in one process; the gateway's 10,000 clients and at most
    // UPSTREAM_MAX_CONNECTIONS (1024) to the upstream in another.
    if hard < 12_000 {
        bail!("the open-file limit is {hard}; the benchmark needs 12,000 (raise ulimit -Hn)");
    }
    Ok(())
}

/// An nginx in the foreground as one process (master_process off): its pid is the worker.
pub(super) fn nginx(dir: &Path, name: &str, server: &str) -> Result<Guard> {
    nginx_counted(dir, name, server, None)
}

/// [`nginx`], under callgrind when `counted` names its output file.
fn nginx_counted(dir: &Path, name: &str, server: &str, counted: Option<&Path>) -> Result<Guard> {
    let conf = dir.join(format!("nginx-{name}.conf"));
    let tmp = dir.join(format!("nginx-{name}"));
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log crit;\n\
             events {{ worker_connections 19000; }}\n\
             http {{ access_log off;\n\
             client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
             {server} }}\n",
            tmp = tmp.display(),
        ),
    )?;
    let guard = Guard(
        program(Path::new("/usr/sbin/nginx"), counted)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx")?,
    );
    let port = server
        .split("listen 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split([' ', ';']).next())
        .and_then(|port| port.parse().ok())
        .context("no port in the nginx server block")?;
    testkit::wait_for_port(port, Duration::from_secs(10))?;
    Ok(guard)
}

/// HAProxy with one thread, keep-alive both ways, no logging (as nginx has none).
fn start_haproxy(
    dir: &Path,
    port: u16,
    upstream_port: u16,
    counted: Option<&Path>,
) -> Result<Guard> {
    let conf = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(
        &conf,
        format!(
            "global\n  nbthread 1\n  maxconn 9000\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
             frontend in\n  bind 127.0.0.1:{port}\n  default_backend up\n\
             backend up\n  server one 127.0.0.1:{upstream_port} maxconn 9000\n"
        ),
    )?;
    let guard = Guard(
        program(Path::new("/usr/sbin/haproxy"), counted)
            .arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start HAProxy")?,
    );
    testkit::wait_for_port(port, Duration::from_secs(10))?;
    Ok(guard)
}
