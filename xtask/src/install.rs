//! Installing what a command needs from Debian's packages, when it is missing and we may.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Installs the Debian `packages` whose `present` check fails; needs root on Debian,
/// otherwise says what to install.
pub fn ensure(what: &str, needed: &[(&str, bool)]) -> Result<()> {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, present)| !present)
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = nix::unistd::geteuid().is_root();
    let is_debian = std::path::Path::new("/etc/debian_version").exists();
    if !(is_root && is_debian) {
        bail!(
            "{what} needs {}; install them (Debian: apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!(
        "xtask: installing {} from Debian's packages",
        missing.join(", ")
    );
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Whether `program` is on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
