//! What every service's `main` does: read the config (exit 2 on a bad one), answer the
//! `healthcheck` subcommand, start telemetry, bind, serve until SIGTERM/SIGINT.
//!
//! A service's `main.rs` is one call to [`main`]; everything it runs lives in its library
//! so that the tests drive the same code.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;

use crate::config::{self, CommonConfig, ConfigError, Env};
use crate::{healthcheck, shutdown, telemetry};

/// The exit code when the service could not start (port taken, database unreachable).
const EXIT_START: u8 = 1;

/// A service as `main` sees it.
pub trait Service {
    type Config;
    const NAME: &'static str;
    const DEFAULT_PORT: u16;

    fn load(env: &Env) -> Result<Self::Config, ConfigError>;
    fn common(config: &Self::Config) -> &CommonConfig;
    /// Serves on `listener` until `shutdown` resolves.
    fn run(
        config: Self::Config,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = anyhow::Result<()>>;

    /// The service's own subcommands (e.g. the vault's `init`); `None` if `name` is not one.
    fn subcommand(name: &str, args: &[String], env: &Env) -> Option<ExitCode> {
        let _ = (name, args, env);
        None
    }

    /// One line per subcommand of [`Service::subcommand`], for the usage message.
    const SUBCOMMANDS: &'static str = "";
}

pub fn main<S: Service>() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = Env::from_process();
    match args.first().map(String::as_str) {
        None => serve::<S>(&env),
        Some("healthcheck") => {
            let common = config::or_exit(S::NAME, CommonConfig::from_env(&env, S::DEFAULT_PORT));
            healthcheck::run(common.listen_addr)
        }
        Some("--version" | "version") => {
            println!("{} {}", S::NAME, env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(name) => S::subcommand(name, &args[1..], &env).unwrap_or_else(|| {
            eprintln!(
                "{}: unknown argument {name:?}\nusage: {} [healthcheck | --version]\n{}",
                S::NAME,
                S::NAME,
                S::SUBCOMMANDS
            );
            ExitCode::from(config::EXIT_CONFIG as u8)
        }),
    }
}

/// A multi-threaded runtime for a subcommand.
pub fn runtime(name: &str) -> Option<tokio::runtime::Runtime> {
    runtime_with(name, 2)
}

/// A multi-threaded runtime with `threads` workers (`HTTP_WORKERS` for the server: the
/// hyper stack serves on the runtime's own threads).
fn runtime_with(name: &str, threads: usize) -> Option<tokio::runtime::Runtime> {
    // One thread: the current-thread scheduler, which skips work stealing altogether.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            None
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit, as nginx's
/// `worker_rlimit_nofile` does: a gateway holds two sockets per request, a monitor one
/// per instance, and the soft limit is often 1,024. Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    open_files_limit()
}

/// The soft limit of open files in force (1,024 if it cannot be read).
pub fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// How many connections may wait to be accepted. std's `TcpListener::bind` asks for 128,
/// which a burst of new clients overflows: the kernel then drops their SYNs, and each
/// tries again a second or more later. 4096 is Linux's default `somaxconn`, which caps
/// it anyway (nginx asks for 511).
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `addr`, with room for [`LISTEN_BACKLOG`] connections not yet
/// accepted.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // As std does on Unix: a restarted service binds again while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn serve<S: Service>(env: &Env) -> ExitCode {
    let config = config::or_exit(S::NAME, S::load(env));
    let common = S::common(&config);
    telemetry::init(common.log_format);
    let open_files = raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");
    let listen_addr = common.listen_addr;
    let listener = match bind(listen_addr) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%listen_addr, %error, "cannot listen");
            eprintln!("{}: cannot listen on {listen_addr}: {error}", S::NAME);
            return ExitCode::from(EXIT_START);
        }
    };
    let Some(runtime) = runtime_with(S::NAME, common.http_workers) else {
        return ExitCode::from(EXIT_START);
    };
    tracing::info!(service = S::NAME, version = env!("CARGO_PKG_VERSION"), %listen_addr, "starting");
    let registration = crate::registration::for_service(S::NAME, common);
    let served = runtime.block_on(async {
        let heartbeats = registration.as_ref().map(|client| client.start());
        let served = S::run(config, listener, shutdown::signal_received()).await;
        if let (Some(client), Some(heartbeats)) = (&registration, heartbeats) {
            heartbeats.abort();
            let gone =
                tokio::time::timeout(std::time::Duration::from_secs(3), client.deregister()).await;
            if !matches!(gone, Ok(Ok(()))) {
                tracing::warn!("could not deregister; the registry will expire this instance");
            }
        }
        served
    });
    match served {
        Ok(()) => {
            tracing::info!(service = S::NAME, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(service = S::NAME, error = format!("{error:#}"), "failed");
            eprintln!("{}: {error:#}", S::NAME);
            ExitCode::from(EXIT_START)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        // None is accepted: with std's backlog of 128 the connections past it would
        // time out, their SYNs dropped. The kernel caps the backlog at `somaxconn`.
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        let burst = somaxconn.min(400);
        let connected: Vec<_> = (0..burst)
            .map(|i| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .unwrap_or_else(|error| panic!("connection {i}: {error}"))
            })
            .collect();
        assert_eq!(connected.len(), burst);
    }
}
