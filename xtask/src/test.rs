//! `cargo xtask test`: provision PostgreSQL and Redis, run the whole suite, tear down.
//!
//! The servers are started from the system's binaries in a temp dir on free loopback
//! ports (installed from Debian's packages first when missing and we are root). Tests
//! that touch storage run on both backends within the one run (`both_backends!`).

use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};
use testkit::{PgCluster, RedisServer};

use crate::{cargo, repo_root};

/// The test runner's pid, so that a SIGTERM to us can be passed on before we tear down.
static RUNNER: AtomicI32 = AtomicI32::new(0);

pub fn run(args: &[String]) -> Result<()> {
    ensure_installed()?;
    // Survive Ctrl-C and SIGTERM long enough to stop the servers: the runner, in our
    // process group, gets Ctrl-C from the terminal too; SIGTERM we pass on to it.
    ctrlc::set_handler(|| {
        let pid = RUNNER.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    })
    .context("cannot install the signal handler")?;

    let postgres = PgCluster::start().context("cannot start PostgreSQL")?;
    let redis = RedisServer::start().context("cannot start Redis")?;
    let postgres_url = postgres.url("postgres");
    println!(
        "xtask: PostgreSQL on 127.0.0.1:{}, Redis on 127.0.0.1:{}",
        postgres.port(),
        redis.port()
    );

    let nextest = Command::new("cargo-nextest")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    let mut command = cargo();
    if nextest {
        command.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        println!("xtask: cargo-nextest not found; using cargo test");
        command.args(["test", "--workspace", "--no-fail-fast"]);
    }
    command
        .args(args)
        .current_dir(repo_root())
        .env(testkit::env::POSTGRES_URL, &postgres_url)
        .env(testkit::env::REDIS_URL, redis.url())
        .env(testkit::env::PG_BINDIR, postgres.bindir())
        .env(testkit::env::REDIS_SERVER, redis.binary())
        .env("DATABASE_URL", &postgres_url)
        .env("REDIS_URL", redis.url());
    let mut child = command.spawn().context("cannot start the test runner")?;
    RUNNER.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    let status = child.wait().context("lost the test runner")?;
    RUNNER.store(0, Ordering::SeqCst);

    drop(redis);
    drop(postgres);
    println!("xtask: stopped PostgreSQL and Redis");
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// Installs Debian's `postgresql` and `redis-server` when their binaries are missing,
/// if we may (root on Debian); otherwise says what to install.
fn ensure_installed() -> Result<()> {
    let mut missing = Vec::new();
    if testkit::find_pg_bindir().is_none() {
        missing.push("postgresql");
    }
    if testkit::find_redis_server().is_none() {
        missing.push("redis-server");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = nix::unistd::geteuid().is_root();
    let is_debian = std::path::Path::new("/etc/debian_version").exists();
    if !(is_root && is_debian) {
        bail!(
            "the tests need PostgreSQL and Redis servers; install {} (Debian: apt-get install {})",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    println!(
        "xtask: installing {} from Debian's packages",
        missing.join(", ")
    );
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    if testkit::find_pg_bindir().is_none() || testkit::find_redis_server().is_none() {
        bail!(
            "installed {} but still cannot find the server binaries",
            missing.join(", ")
        );
    }
    Ok(())
}
