//! `cargo xtask bench health-monitor`: 10,000 registered instances answered by nginx on a
//! few loopback ports, checked every 30 s. Prints the monitor's CPU-seconds per 1,000
//! checks and its share of one core, its peak RSS, how evenly checks spread over the
//! interval, and, for instances killed on purpose, the time to their `offline` state and
//! to the gateway no longer routing to them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::gateway::{cpu_seconds, nginx, raise_file_limit};
use super::{Options, release_binary, spawn_service, start_vault};
use crate::{http, install};

const INSTANCES: usize = 10_000;
const PORTS: usize = 4;
const VICTIMS: usize = 20;

pub fn run(options: &Options) -> Result<()> {
    install::ensure(
        "the health-monitor benchmark",
        &[("nginx", Path::new("/usr/sbin/nginx").exists())],
    )?;
    raise_file_limit()?;
    let vault_binary = release_binary("credential-vault")?;
    let registry_binary = release_binary("service-registry")?;
    let monitor_binary = release_binary("health-monitor")?;
    let gateway_binary = release_binary("gateway")?;
    let work = testkit::TempDir::new("concierge-bench")?;
    let dir = work.path();

    let ports: Vec<u16> = (0..PORTS)
        .map(|_| testkit::free_port())
        .collect::<Result<_, _>>()?;
    let listen: String = ports
        .iter()
        .map(|p| format!("listen 127.0.0.1:{p} backlog=4096; "))
        .collect();
    let _responder = nginx(
        dir,
        "responder",
        &format!(
            "server {{ {listen} location / {{ default_type application/json; return 200 '{{\"status\":\"ok\"}}'; }} }}"
        ),
    )?;
    let victim_port = testkit::free_port()?;
    let victims = nginx(
        dir,
        "victims",
        &format!(
            "server {{ listen 127.0.0.1:{victim_port}; location / {{ default_type application/json; return 200 '{{\"status\":\"ok\"}}'; }} }}"
        ),
    )?;

    let (_vault, vault_port, tokens) = start_vault(
        &vault_binary,
        &format!("sqlite://{}/vault.db", dir.display()),
        dir,
        &[],
    )?;
    let vault_url = format!("http://127.0.0.1:{vault_port}");
    let registry_port = testkit::free_port()?;
    let registry_db = format!("sqlite://{}/registry.db", dir.display());
    let token = |name: &str| tokens.join(format!("{name}-token")).display().to_string();
    let _registry = spawn_service(
        &registry_binary,
        registry_port,
        &[
            ("DATABASE_URL", registry_db.as_str()),
            ("VAULT_URL", vault_url.as_str()),
            ("TOKEN_FILE", token("service-registry").as_str()),
            ("HEARTBEAT_INTERVAL", "1h"),
        ],
        &[],
    )?;
    let admin = format!(
        "Bearer {}",
        std::fs::read_to_string(tokens.join("admin-token"))?.trim()
    );
    println!(
        "health-monitor bench: registering {INSTANCES} instances on {PORTS} nginx ports, and {VICTIMS} on one more"
    );
    let register = |service: &str, id: &str, port: u16| -> Result<()> {
        let body = format!(
            r#"{{"name":"{service}","instance_id":"{id}","address":"127.0.0.1","port":{port},"health_endpoint":"/health"}}"#
        );
        let (status, answer) = http::request(
            registry_port,
            "POST",
            "/api/services/register",
            &[("Authorization", &admin)],
            Some(&body),
        )?;
        if status != 201 {
            bail!("registration failed: {status} {answer}");
        }
        Ok(())
    };
    for i in 0..INSTANCES {
        register(
            &format!("svc-{:03}", i % 500),
            &format!("i-{i:05}"),
            ports[i % PORTS],
        )?;
    }
    for i in 0..VICTIMS {
        register("victim", &format!("v-{i:02}"), victim_port)?;
    }

    let registry_url = format!("http://127.0.0.1:{registry_port}");
    let monitor_port = testkit::free_port()?;
    let monitor_db = format!("sqlite://{}/monitor.db", dir.display());
    let monitor = spawn_service(
        &monitor_binary,
        monitor_port,
        &[
            ("DATABASE_URL", monitor_db.as_str()),
            ("VAULT_URL", vault_url.as_str()),
            ("REGISTRY_URL", registry_url.as_str()),
            ("TOKEN_FILE", token("health-monitor").as_str()),
            ("CHECK_INTERVAL", "30s"),
            ("RESYNC_INTERVAL", "30s"),
            // One thread: checks are I/O-bound, and thread switches cost more than they save.
            ("HTTP_WORKERS", "1"),
        ],
        &[],
    )?;
    let gateway_port = testkit::free_port()?;
    let _gateway = spawn_service(
        &gateway_binary,
        gateway_port,
        &[
            ("REGISTRY_URL", registry_url.as_str()),
            ("VAULT_URL", vault_url.as_str()),
            ("TOKEN_FILE", token("gateway").as_str()),
            ("RESYNC_INTERVAL", "2s"),
        ],
        &[],
    )?;
    let pid = monitor.0.id();

    // Warm-up: the first interval places every instance; measure the next ones.
    let seconds = options.seconds.max(60);
    std::thread::sleep(Duration::from_secs(35));
    let checks_before = checks(monitor_port)?;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut per_second = Vec::new();
    let mut last = checks_before;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let now = checks(monitor_port)?;
        per_second.push(now - last);
        last = now;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let done = last - checks_before;
    let mean = done / per_second.len().max(1) as f64;
    let max = per_second.iter().copied().fold(0.0, f64::max);
    let min = per_second.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "checks: {done:.0} in {elapsed:.0} s ({:.0}/s; {INSTANCES} + {VICTIMS} instances every 30 s would be {:.0}/s)",
        done / elapsed,
        (INSTANCES + VICTIMS) as f64 / 30.0
    );
    println!(
        "monitor CPU: {cpu:.2} s = {:.3} CPU-s per 1,000 checks = {:.2} % of one core (target < 2 %)",
        cpu / (done / 1000.0).max(1e-9),
        100.0 * cpu / elapsed
    );
    println!(
        "monitor peak RSS: {:.1} MiB",
        peak_rss(pid)? as f64 / 1024.0 / 1024.0
    );
    println!(
        "spread over the interval: checks per second min {min:.0}, mean {mean:.0}, max {max:.0} (max ÷ mean {:.2})",
        max / mean.max(1e-9)
    );

    // Kill the victims' server; time each to offline, and the gateway to stop routing.
    let killed = Instant::now();
    drop(victims);
    let mut offline: Vec<Option<f64>> = vec![None; VICTIMS];
    let mut unrouted = None;
    while killed.elapsed() < Duration::from_secs(90)
        && (offline.iter().any(Option::is_none) || unrouted.is_none())
    {
        let (status, body) = http::request(
            registry_port,
            "GET",
            "/api/services/victim",
            &[("Authorization", &admin)],
            None,
        )?;
        if status == 200 {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            for instance in json["instances"].as_array().into_iter().flatten() {
                let index = instance["instance_id"]
                    .as_str()
                    .and_then(|id| id.strip_prefix("v-"))
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(index) = index
                    && instance["health"] == "offline"
                    && offline[index].is_none()
                {
                    offline[index] = Some(killed.elapsed().as_secs_f64());
                }
            }
        }
        if unrouted.is_none() && http::status(gateway_port, "/victim/health") == Some(503) {
            unrouted = Some(killed.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut times: Vec<f64> = offline.iter().flatten().copied().collect();
    times.sort_by(f64::total_cmp);
    if times.len() < VICTIMS {
        bail!(
            "only {} of {VICTIMS} killed instances went offline within 90 s",
            times.len()
        );
    }
    let p50 = times[times.len() / 2];
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "killed instance → offline in the registry: p50 {p50:.1} s, p99 {p99:.1} s (30 s interval, 3 failures, fast re-checks every 3 s)"
    );
    match unrouted {
        Some(t) => {
            println!("killed service → gateway answers 503 (routes to none of them): {t:.1} s")
        }
        None => println!("killed service → the gateway still routed after 90 s"),
    }
    Ok(())
}

/// The sum of the monitor's check counters.
fn checks(port: u16) -> Result<f64> {
    let (status, page) = http::request(port, "GET", "/metrics", &[], None)?;
    if status != 200 {
        bail!("the monitor's /metrics answered {status}");
    }
    Ok(page
        .lines()
        .filter(|l| l.starts_with("concierge_monitor_checks_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub(super) fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")?;
    Ok(kib * 1024)
}
