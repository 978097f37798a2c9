//! The shutdown signal: SIGTERM (orchestrators) or SIGINT (a terminal), whichever comes first.

use tokio::signal::unix::{SignalKind, signal};

use std::future::Future;

/// Resolves when the process is asked to stop. The handlers are installed by this call,
/// not at the first poll, so a signal that comes early is not fatal. Must be called
/// within a Tokio runtime. If the handlers cannot be installed the process would be
/// unstoppable by signal, so that is logged and the future never resolves.
pub fn signal_received() -> impl Future<Output = ()> + Send + 'static {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop this process with SIGKILL");
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down: draining in-flight requests");
    }
}
