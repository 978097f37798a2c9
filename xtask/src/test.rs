//! `cargo xtask test`: provision PostgreSQL and Redis, run the whole suite, tear down;
//! then the deploy checks ([`crate::prove`]) when no selection was given.
//!
//! The servers are started from the system's binaries in a temp dir on free loopback
//! ports (installed from Debian's packages first when missing and we are root). Tests
//! that touch storage run on both backends within the one run (`both_backends!`).

use std::process::Command;

use anyhow::{Context, Result, bail};
use testkit::{PgCluster, RedisServer};

use crate::{cargo, repo_root};

pub fn run(args: &[String]) -> Result<()> {
    ensure_installed()?;
    // Survive Ctrl-C and SIGTERM long enough to stop the servers: the runner, in our
    // process group, gets Ctrl-C from the terminal too; SIGTERM we pass on to it.
    crate::interrupt::install()?;

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
    crate::interrupt::set_runner(child.id());
    let status = child.wait().context("lost the test runner")?;
    crate::interrupt::set_runner(0);

    drop(redis);
    drop(postgres);
    println!("xtask: stopped PostgreSQL and Redis");
    if !status.success() {
        bail!("tests failed ({status})");
    }
    // The whole suite, not a selection: the deployment is part of it.
    if args.is_empty() {
        crate::prove::run(&[])?;
    }
    Ok(())
}

/// PostgreSQL and Redis, and Podman with Buildah and runc (the monitor restarts a real
/// container through Podman's Docker-compatible API), from Debian's packages when missing.
fn ensure_installed() -> Result<()> {
    use crate::install::on_path;
    crate::install::ensure(
        "the tests",
        &[
            ("postgresql", testkit::find_pg_bindir().is_some()),
            ("redis-server", testkit::find_redis_server().is_some()),
            ("podman", on_path("podman")),
            ("buildah", on_path("buildah")),
            (
                "runc",
                on_path("runc") || std::path::Path::new("/usr/sbin/runc").exists(),
            ),
        ],
    )?;
    if testkit::find_pg_bindir().is_none() || testkit::find_redis_server().is_none() {
        bail!("installed PostgreSQL and Redis but still cannot find their server binaries");
    }
    Ok(())
}
