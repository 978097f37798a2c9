//! `cargo xtask up`: the four services as local processes on the embedded default —
//! SQLite files and all state under `./.data/`, no Redis unless `REDIS_URL` is set.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{cargo, ports, repo_root};

/// A service of the stack: its package (and binary) name, port, and whether it keeps a database.
struct Spec {
    name: &'static str,
    port: u16,
    database: bool,
    color: &'static str,
}

const STACK: [Spec; 4] = [
    Spec {
        name: "credential-vault",
        port: 8081,
        database: true,
        color: "35",
    },
    Spec {
        name: "service-registry",
        port: 8082,
        database: true,
        color: "36",
    },
    Spec {
        name: "health-monitor",
        port: 8083,
        database: true,
        color: "33",
    },
    Spec {
        name: "gateway",
        port: 8080,
        database: false,
        color: "32",
    },
];

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub fn run(args: &[String]) -> Result<()> {
    let root = repo_root();
    let data = match args {
        [] => root.join(".data"),
        [flag, dir] if flag == "--data" => std::path::PathBuf::from(dir),
        _ => bail!("usage: cargo xtask up [--data DIR] (got {args:?})"),
    };
    check_ports()?;

    println!("xtask: building the services");
    let mut build = cargo();
    build.arg("build").current_dir(&root);
    for spec in &STACK {
        build.args(["--package", spec.name]);
    }
    if !build.status().context("cannot run cargo build")?.success() {
        bail!("the build failed");
    }

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data)
        .with_context(|| format!("cannot create {}", data.display()))?;

    bootstrap_vault(&data)?;

    let (events, exits) = mpsc::channel::<Event>();
    {
        let events = events.clone();
        ctrlc::set_handler(move || {
            let _ = events.send(Event::Interrupted);
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    let mut children = Vec::new();
    for spec in &STACK {
        match start(&data, spec, events.clone()) {
            Ok(child) => children.push((spec, child)),
            Err(error) => {
                stop_all(&mut children);
                return Err(error);
            }
        }
    }

    if let Err(error) = wait_until_ready(&exits) {
        stop_all(&mut children);
        return Err(error);
    }
    println!();
    for spec in &STACK {
        println!("  {:<17} http://127.0.0.1:{}", spec.name, spec.port);
    }
    println!(
        "\nxtask: all four services are ready; data in {}. Ctrl-C stops them.\n",
        data.display()
    );

    match exits.recv() {
        Ok(Event::Exited(name)) => println!("xtask: {name} exited; stopping the others"),
        _ => println!("\nxtask: stopping the services"),
    }
    stop_all(&mut children);
    Ok(())
}

/// A dev master key and `credential-vault init` into `data`, once: the files stay, and
/// the next `up` reuses them.
fn bootstrap_vault(data: &Path) -> Result<()> {
    let vault = crate::cargo_target_dir().join("debug/credential-vault");
    let spec = &STACK[0];
    let master_key = data.join("master-key");
    if !master_key.exists() {
        println!(
            "xtask: generating a DEV master key in {} (never use it for real secrets)",
            master_key.display()
        );
        run_vault(
            Command::new(&vault)
                .arg("generate-master-key")
                .arg("--out")
                .arg(&master_key),
        )?;
    }
    if !data.join("admin-token").exists() {
        println!(
            "xtask: initializing the vault; tokens go to {}",
            data.display()
        );
        run_vault(
            Command::new(&vault)
                .args(["init", "--out"])
                .arg(data)
                .env("DATABASE_URL", database_url(data, spec))
                .env("VAULT_MASTER_KEY_FILE", &master_key)
                .env("LOG_FORMAT", "pretty"),
        )?;
    }
    Ok(())
}

fn run_vault(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

enum Event {
    Interrupted,
    Exited(&'static str),
}

/// Every port must be free before anything starts; a taken one is named with its holder.
fn check_ports() -> Result<()> {
    for spec in &STACK {
        if let Err(error) = TcpListener::bind(("127.0.0.1", spec.port)) {
            let holder = ports::listener_of(spec.port)
                .map(|who| format!(" by {who}"))
                .unwrap_or_default();
            bail!(
                "port {} (for {}) is taken{holder}: {error}. Stop that process and run `cargo xtask up` again.",
                spec.port,
                spec.name
            );
        }
    }
    Ok(())
}

fn start(data: &Path, spec: &'static Spec, events: mpsc::Sender<Event>) -> Result<Child> {
    let binary = crate::cargo_target_dir().join("debug").join(spec.name);
    let mut command = Command::new(&binary);
    command
        .env("LISTEN_ADDR", format!("127.0.0.1:{}", spec.port))
        .env("VAULT_URL", "http://127.0.0.1:8081")
        .env("REGISTRY_URL", "http://127.0.0.1:8082")
        .env("MONITOR_URL", "http://127.0.0.1:8083")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C reaches only us, and we stop the services in order.
        .process_group(0);
    if std::env::var_os("LOG_FORMAT").is_none() {
        command.env("LOG_FORMAT", "pretty");
    }
    if spec.database {
        command.env("DATABASE_URL", database_url(data, spec));
    }
    command
        .env("TOKEN_FILE", data.join(format!("{}-token", spec.name)))
        .env("REGISTRY_URL", "http://127.0.0.1:8082");
    if spec.name == "credential-vault" {
        command
            .env("VAULT_MASTER_KEY_FILE", data.join("master-key"))
            .env("VAULT_DEV_MODE", "true")
            // The gateway reaches it over loopback: audit records name the gateway's clients.
            .env("VAULT_TRUSTED_PROXIES", "127.0.0.1");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let prefix = prefix(spec);
    if let Some(stdout) = child.stdout.take() {
        stream(stdout, prefix.clone(), None);
    }
    if let Some(stderr) = child.stderr.take() {
        // The stderr reader ends when the process does: it reports the exit.
        stream(stderr, prefix, Some((events, spec.name)));
    }
    Ok(child)
}

/// `<SERVICE>_DATABASE_URL`, else `DATABASE_URL` as given, else a SQLite file in `data`.
fn database_url(data: &Path, spec: &Spec) -> String {
    let own = format!(
        "{}_DATABASE_URL",
        spec.name.to_uppercase().replace('-', "_")
    );
    std::env::var(own)
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| {
            format!(
                "sqlite://{}",
                data.join(format!("{}.db", spec.name)).display()
            )
        })
}

fn prefix(spec: &Spec) -> String {
    let label = format!("{:>16} |", spec.name);
    if std::io::stdout().is_terminal() {
        format!("\x1b[{}m{label}\x1b[0m ", spec.color)
    } else {
        format!("{label} ")
    }
}

fn stream(
    source: impl Read + Send + 'static,
    prefix: String,
    on_end: Option<(mpsc::Sender<Event>, &'static str)>,
) {
    thread::spawn(move || {
        for line in BufReader::new(source).lines().map_while(Result::ok) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{prefix}{line}");
        }
        if let Some((events, name)) = on_end {
            let _ = events.send(Event::Exited(name));
        }
    });
}

fn wait_until_ready(events: &mpsc::Receiver<Event>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pending: Vec<&Spec> = STACK.iter().collect();
    while !pending.is_empty() {
        match events.try_recv() {
            Ok(Event::Exited(name)) => {
                bail!("{name} exited before it was ready; see its log above")
            }
            Ok(Event::Interrupted) => bail!("interrupted"),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            let names: Vec<_> = pending.iter().map(|s| s.name).collect();
            bail!("not ready after {READY_TIMEOUT:?}: {}", names.join(", "));
        }
        pending.retain(|spec| crate::http::status(spec.port, "/ready") != Some(200));
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// SIGTERM to all, then SIGKILL to whatever is left after [`STOP_TIMEOUT`].
fn stop_all(children: &mut [(&Spec, Child)]) {
    for (_, child) in children.iter() {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for (spec, child) in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    println!("xtask: {} stopped ({status})", spec.name);
                    break;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    println!(
                        "xtask: {} did not stop in {STOP_TIMEOUT:?}; killing it",
                        spec.name
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}
