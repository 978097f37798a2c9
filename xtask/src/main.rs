//! `cargo xtask`: the one home of Concierge's automation.
//!
//! - `cargo xtask up`: build and run the four services on the embedded default.
//! - `cargo xtask test [ARGS…]`: start throwaway PostgreSQL and Redis, run the suite, tear down.
//! - `cargo xtask bench vault`: benchmarks that print figures side by side.

mod bench;
mod http;
mod install;
mod ports;
mod test;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  up                 build and run the four services locally (SQLite under ./.data, no Redis)
  test [ARGS...]     start PostgreSQL and Redis, run the workspace tests (ARGS go to nextest)
  bench vault        the vault's reads beside pgbench's inserts on one PostgreSQL server
  bench registry     discovery beside nginx serving the same body; event propagation times
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => up::run(&args[1..]),
        Some("test") => test::run(&args[1..]),
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

/// The `cargo` that runs us, so that a toolchain override carries over.
fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
