//! The images, proven: each Dockerfile's runtime stage is built (from this host's release
//! binaries standing in for the builder stage) with a private Podman, then run.
//!
//! For every image: its config names a numeric non-root user, a `HEALTHCHECK` running
//! the binary's own `healthcheck`, `SIGTERM`, the port and the OCI labels; its files
//! hold exactly one Concierge binary and no shell or package manager; it is under
//! [`MAX_IMAGE_BYTES`]. Run with a read-only root filesystem, the service's process runs
//! as that user, the container's health check passes, `/health` on a published loopback
//! port answers 200, and `SIGTERM` stops it with status 0.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::containers::{Engine, megabytes};
use crate::images::{IMAGES, Image, build_all};

/// The ceiling the issue sets; ours are far under it.
const MAX_IMAGE_BYTES: u64 = 40_000_000;
const NONROOT: u32 = 65532;
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// Programs no runtime image of ours may hold: shells and package managers.
const FORBIDDEN: &[&str] = &[
    "sh", "bash", "dash", "ash", "zsh", "busybox", "apt", "apt-get", "dpkg", "apk", "yum", "dnf",
    "microdnf", "rpm", "pip", "pip3", "cargo", "rustc",
];

pub fn prove(root: &Path) -> Result<Vec<String>> {
    let dir = testkit::TempDir::new("concierge-images").context("no temp dir")?;
    let engine = Engine::private_podman(dir.path())?;
    let _interrupt = {
        let engine = engine.clone();
        crate::interrupt::on_interrupt(move || {
            let _ = engine.output(["rm", "--all", "--force", "--time", "1"]);
        })
    };
    let result = prove_with(&engine, root, dir.path());
    // Whatever happened, leave no container behind (the storage goes with the temp dir).
    let _ = engine.output(["rm", "--all", "--force", "--time", "1"]);
    result
}

fn prove_with(engine: &Engine, root: &Path, dir: &Path) -> Result<Vec<String>> {
    let built = build_all(engine, root, &IMAGES, &[], true)?;
    let mut report = Vec::new();
    for (image, tags) in &built {
        let tag = &tags[0];
        let size = check_image(engine, image, tag).with_context(|| format!("the image {tag}"))?;
        check_running(engine, image, tag, dir).with_context(|| format!("a container of {tag}"))?;
        report.push(format!(
            "{:<28} {:>8}  non-root {NONROOT}, healthy, /health 200, one binary, no shell",
            image.repository(),
            megabytes(size)
        ));
    }
    Ok(report)
}

fn inspect(engine: &Engine, kind: &str, name: &str) -> Result<Value> {
    let json = engine.output([kind, "inspect", "--format", "json", name])?;
    let mut all: Value = serde_json::from_str(&json).context("inspect is not JSON")?;
    all.get_mut(0)
        .map(Value::take)
        .context("inspect printed nothing")
}

/// The image's configuration and files; returns its size.
fn check_image(engine: &Engine, image: &Image, tag: &str) -> Result<u64> {
    let info = inspect(engine, "image", tag)?;
    let config = &info["Config"];
    let binary = format!("/usr/local/bin/{}", image.service);
    ensure!(
        config["User"] == format!("{NONROOT}:{NONROOT}"),
        "USER is {}, not the numeric non-root {NONROOT}:{NONROOT}",
        config["User"]
    );
    ensure!(
        info["Healthcheck"]["Test"] == serde_json::json!(["CMD", binary, "healthcheck"]),
        "HEALTHCHECK is {}",
        info["Healthcheck"]
    );
    ensure!(
        config["StopSignal"] == "SIGTERM",
        "STOPSIGNAL is {}",
        config["StopSignal"]
    );
    ensure!(
        config["Entrypoint"] == serde_json::json!([binary]),
        "ENTRYPOINT is {}",
        config["Entrypoint"]
    );
    let port = format!("{}/tcp", image.port);
    ensure!(
        config["ExposedPorts"].get(&port).is_some(),
        "EXPOSE lacks {port}"
    );
    for label in ["title", "version", "revision", "source", "created"] {
        let key = format!("org.opencontainers.image.{label}");
        let value = config["Labels"][&key].as_str().unwrap_or_default();
        ensure!(!value.is_empty(), "the label {key} is missing");
    }

    let mounted = engine.output(["image", "mount", tag])?;
    let files = check_files(Path::new(mounted.trim()), image);
    engine.output(["image", "unmount", tag])?;
    files?;

    let size = info["Size"].as_u64().context("no Size")?;
    ensure!(
        size < MAX_IMAGE_BYTES,
        "{} is over the {} target",
        megabytes(size),
        megabytes(MAX_IMAGE_BYTES)
    );
    Ok(size)
}

/// Exactly one Concierge binary (this image's), no shell, no package manager.
fn check_files(rootfs: &Path, image: &Image) -> Result<()> {
    let mut binaries = Vec::new();
    let mut forbidden = Vec::new();
    let mut pending = vec![rootfs.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                pending.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let inside = Path::new("/").join(path.strip_prefix(rootfs)?);
            if IMAGES.iter().any(|i| i.service == name) {
                binaries.push(inside.clone());
            }
            if FORBIDDEN.contains(&name.as_str()) {
                forbidden.push(inside);
            }
        }
    }
    let expected = Path::new("/usr/local/bin").join(image.service);
    ensure!(
        binaries == [expected.clone()],
        "Concierge binaries {binaries:?}, not just {}",
        expected.display()
    );
    let meta = std::fs::metadata(rootfs.join(expected.strip_prefix("/")?))?;
    ensure!(
        meta.permissions().mode() & 0o111 != 0 && meta.uid() == 0,
        "the binary should be root-owned and executable (mode {:o}, uid {})",
        meta.permissions().mode(),
        meta.uid()
    );
    ensure!(forbidden.is_empty(), "the image holds {forbidden:?}");
    Ok(())
}

/// What a service needs to start on its own in a container: its data under `/data`.
fn service_env(image: &Image) -> Vec<(String, String)> {
    let database = || {
        (
            "DATABASE_URL".to_owned(),
            format!("sqlite:///data/{}.db", image.service),
        )
    };
    match image.service {
        "credential-vault" => vec![
            database(),
            ("VAULT_MASTER_KEY_FILE".into(), "/data/master-key".into()),
        ],
        "gateway" => Vec::new(),
        _ => vec![database()],
    }
}

fn check_running(engine: &Engine, image: &Image, tag: &str, dir: &Path) -> Result<()> {
    // A data folder owned by the image's user, as a volume would be.
    let data = dir.join(format!("data-{}", image.service));
    std::fs::create_dir_all(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
    nix::unistd::chown(
        &data,
        Some(nix::unistd::Uid::from_raw(NONROOT)),
        Some(nix::unistd::Gid::from_raw(NONROOT)),
    )
    .context("cannot chown the data folder (the proof runs as root)")?;
    let volume = format!("{}:/data", data.display());

    if image.service == "credential-vault" {
        // The image's own subcommands make the key and initialize, as an operator would.
        let env: Vec<String> = service_env(image)
            .into_iter()
            .map(|(key, value)| format!("--env={key}={value}"))
            .collect();
        for subcommand in [
            &["generate-master-key", "--out", "/data/master-key"][..],
            &["init", "--out", "/data/tokens"],
        ] {
            let mut run = vec!["run", "--rm", "--read-only", "--volume", &volume];
            run.extend(env.iter().map(String::as_str));
            run.push(tag);
            run.extend(subcommand);
            engine.output(&run)?;
        }
    }

    let port = testkit::free_port().context("no free port")?;
    let name = format!("proof-{}", image.service);
    let mut run: Vec<String> = [
        "run",
        "--detach",
        "--name",
        &name,
        "--read-only",
        "--volume",
        &volume,
    ]
    .map(String::from)
    .to_vec();
    run.push("--publish".into());
    run.push(format!("127.0.0.1:{port}:{}", image.port));
    for (key, value) in service_env(image) {
        run.push("--env".into());
        run.push(format!("{key}={value}"));
    }
    run.push(tag.into());
    engine.output(&run)?;

    let result = check_container(engine, &name, port);
    if result.is_err()
        && let Ok(logs) = engine.output(["logs", &name])
    {
        eprintln!("xtask: {name}'s log:\n{logs}");
    }
    result?;

    engine.output(["stop", "--time", "10", &name])?;
    let stopped = inspect(engine, "container", &name)?;
    ensure!(
        stopped["State"]["ExitCode"] == 0,
        "SIGTERM should stop it with status 0, not {}",
        stopped["State"]["ExitCode"]
    );
    engine.output(["rm", &name])?;
    Ok(())
}

fn check_container(engine: &Engine, name: &str, port: u16) -> Result<()> {
    let info = inspect(engine, "container", name)?;
    let pid = info["State"]["Pid"]
        .as_u64()
        .context("no pid: not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .context("no ids in /proc status")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(
            ids.iter().all(|&id| id == NONROOT),
            "the process's {field} {ids:?}, not {NONROOT}"
        );
    }

    // Podman schedules health checks with systemd timers; without systemd we run the
    // image's HEALTHCHECK ourselves, as the timer would, until the state is healthy.
    let deadline = Instant::now() + HEALTHY_TIMEOUT;
    loop {
        let checked = engine.output(["healthcheck", "run", name]);
        let health = inspect(engine, "container", name)?["State"]["Health"]["Status"].clone();
        if checked.is_ok() && health == "healthy" {
            break;
        }
        if Instant::now() > deadline {
            bail!("not healthy after {HEALTHY_TIMEOUT:?}: {health} ({checked:?})");
        }
        thread::sleep(Duration::from_millis(500));
    }
    match crate::http::status(port, "/health") {
        Some(200) => Ok(()),
        other => bail!("GET /health on 127.0.0.1:{port} answered {other:?}"),
    }
}
