//! `cargo xtask`: the one home of Concierge's automation.
//!
//! - `cargo xtask up`: build and run the four services on the embedded default.
//! - `cargo xtask test [ARGS…]`: start throwaway PostgreSQL and Redis, run the suite, tear
//!   down; then prove the deployment (images, compose, Prometheus, dashboards, Kubernetes).
//! - `cargo xtask build-images`: one container image per service.
//! - `cargo xtask bench vault`: benchmarks that print figures side by side.

mod bench;
mod containers;
mod http;
mod images;
mod install;
mod interrupt;
mod ports;
mod prove;
mod test;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  up [--data DIR]    build and run the four services locally (SQLite under ./.data, no Redis)
  test               start PostgreSQL and Redis, run the workspace tests, then the deploy checks
  test ARGS...       only the workspace tests; ARGS go to nextest (e.g. -E 'package(gateway)')
  test deploy [CHECK...]
                     only the deploy checks: lint, compose, prometheus, k8s, images, dashboards
  build-images [SERVICE...] [--engine docker|podman] [--tag T] [--push REGISTRY] [--prebuilt]
                     one image per service, tagged with the version and git revision;
                     --prebuilt builds the binaries on this host instead of in the image
  bench vault        the vault's reads beside pgbench's inserts on one PostgreSQL server
  bench registry     discovery beside nginx serving the same body; event propagation times
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => up::run(&args[1..]),
        Some("test") if args.get(1).is_some_and(|arg| arg == "deploy") => prove::run(&args[2..]),
        Some("test") => test::run(&args[1..]),
        Some("build-images") => images::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root, from this crate's own manifest directory.
fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` if set (relative to the root, where
/// xtask runs cargo), else `target/` under the root. The binaries xtask runs are looked
/// for there, so that a run with another target directory never starts stale ones.
fn cargo_target_dir() -> PathBuf {
    let root = repo_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Runs `command` to completion, its stdin closed, and returns its stdout; a failure
/// carries what it printed on both streams.
fn output(command: &mut std::process::Command) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// The `cargo` that runs us, so that a toolchain override carries over.
fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
