//! Throwaway PostgreSQL and Redis servers started from the system's binaries.
//!
//! `cargo xtask test` starts one of each for the whole suite; a test that must stop
//! and start its server (reconnects, `/ready` going red and green) starts its own.
//! Std only, so that the xtask stays quick to build.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Variables through which `cargo xtask test` hands its servers to the tests.
pub mod env {
    /// A superuser URL of the suite's PostgreSQL server; tests create their own databases in it.
    pub const POSTGRES_URL: &str = "CONCIERGE_TEST_POSTGRES_URL";
    /// The URL of the suite's Redis server.
    pub const REDIS_URL: &str = "CONCIERGE_TEST_REDIS_URL";
    /// The folder that holds `initdb` and `pg_ctl`.
    pub const PG_BINDIR: &str = "CONCIERGE_PG_BINDIR";
    /// The `redis-server` binary.
    pub const REDIS_SERVER: &str = "CONCIERGE_REDIS_SERVER";
}

/// Why a server could not be provided.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn error(message: impl Into<String>) -> Error {
    Error(message.into())
}

pub type Result<T> = std::result::Result<T, Error>;

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| error(format!("cannot bind a loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| error(format!("cannot read the bound port: {e}")))
}

/// Whether something accepts TCP connections on a loopback port.
pub fn port_is_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits until `port` accepts connections, or fails after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if port_is_open(port) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(error(format!(
        "nothing listens on 127.0.0.1:{port} after {timeout:?}"
    )))
}

/// Where the PostgreSQL server binaries live: `$CONCIERGE_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else a folder on `PATH` holding `initdb`.
pub fn find_pg_bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(env::PG_BINDIR) {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The `redis-server` binary: `$CONCIERGE_REDIS_SERVER`, else the one on `PATH`.
pub fn find_redis_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env::REDIS_SERVER) {
        return Some(PathBuf::from(path));
    }
    find_on_path("redis-server")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A private folder under the system's temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .map_err(|e| error(format!("cannot create {}: {e}", path.display())))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn is_root() -> bool {
    // `id -u` keeps this crate free of libc; it runs once per server start.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| out.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// A PostgreSQL cluster in a temp dir, listening on one loopback port, stopped on drop.
#[derive(Debug)]
pub struct PgCluster {
    bindir: PathBuf,
    dir: TempDir,
    port: u16,
    as_postgres_user: bool,
    durable: bool,
}

impl PgCluster {
    /// `initdb` and start a cluster with trust auth for `postgres` on 127.0.0.1, tuned
    /// for tests: no fsync, no synchronous commit.
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// A cluster that flushes every commit to disk, as production does: for benchmarks.
    pub fn start_durable() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self> {
        let bindir = find_pg_bindir().ok_or_else(|| {
            error("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` package")
        })?;
        let dir = TempDir::new("concierge-pg")?;
        let as_postgres_user = is_root();
        if as_postgres_user {
            // initdb refuses to run as root; the cluster belongs to the `postgres` user.
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path()))?;
        }
        let cluster = Self {
            bindir,
            dir,
            port: free_port()?,
            as_postgres_user,
            durable,
        };
        let data = cluster.data_dir();
        cluster.pg(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg(&self, tool: &str, args: &[&str]) -> Result<()> {
        let program = self.bindir.join(tool);
        let mut command = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args);
        run(&mut command)
    }

    /// Starts the server (again, after [`PgCluster::stop`]) and waits until it accepts connections.
    pub fn start_server(&self) -> Result<()> {
        let durability = if self.durable {
            "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
        } else {
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {durability} -c max_connections=400 \
             -c shared_buffers=128MB",
            self.port,
            path_str(self.dir.path())?,
        );
        let data = self.data_dir();
        let log = self.dir.path().join("postgres.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-o",
                &options,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server as an operator would (`-m fast`: clients disconnected, a
    /// checkpoint written); the cluster stays, with everything committed, for a later
    /// start. (`-m immediate` would lose the last commits here: the test clusters run
    /// with `synchronous_commit=off`.)
    pub fn stop(&self) -> Result<()> {
        self.stop_mode("fast")
    }

    fn stop_mode(&self, mode: &str) -> Result<()> {
        let data = self.data_dir();
        self.pg(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", mode, "-w", "stop"],
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Its data goes with it: no need to keep anything.
        let _ = self.stop_mode("immediate");
    }
}

/// A Redis server without persistence on one loopback port, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Result<Self> {
        let binary = find_redis_server().ok_or_else(|| {
            error("redis-server not found: install Debian's `redis-server` package")
        })?;
        let mut server = Self {
            binary,
            port: free_port()?,
            child: None,
        };
        server.start_server()?;
        Ok(server)
    }

    /// Starts the server (again, after [`RedisServer::stop`]) on the same port.
    pub fn start_server(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| error(format!("cannot start {}: {e}", self.binary.display())))?;
        self.child = Some(child);
        wait_for_redis(self.port, Duration::from_secs(20))
    }

    /// Kills the server; its port stays reserved for a later start.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for Redis to answer PING: a bound port is not yet a loaded server.
fn wait_for_redis(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if redis_ping(port).unwrap_or(false) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(25));
    }
    Err(error(format!(
        "redis on port {port} did not answer PING within {timeout:?}"
    )))
}

fn redis_ping(port: u16) -> io::Result<bool> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf)?;
    Ok(&buf == b"+PONG\r\n")
}

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| error(format!("cannot run {command:?}: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(error(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| error(format!("path is not UTF-8: {}", path.display())))
}
