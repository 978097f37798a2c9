//! The shutdown signal: SIGTERM (orchestrators) or SIGINT (a terminal), whichever comes first.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves when the process is asked to stop. If the handlers cannot be installed the
/// process would be unstoppable by signal, so that is logged and the future never resolves.
pub async fn signal_received() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop this process with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down: draining in-flight requests");
}
