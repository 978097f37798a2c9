//! Ctrl-C and SIGTERM (a CI timeout) for `cargo xtask test`.
//!
//! While the test runner runs, the signal is passed on to it and we tear down after it
//! exits. During the deploy checks, what they started (a stack, Prometheus, containers)
//! has registered how to stop it: that runs, and we exit with 130.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use anyhow::{Context, Result};

/// The test runner's pid while it runs, else 0.
static RUNNER: AtomicI32 = AtomicI32::new(0);
type Cleanup = Box<dyn Fn() + Send>;
static CLEANUPS: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);
/// Whether a signal now stops us (the deploy checks), rather than being left to the
/// test runner and the teardown after it.
static STOPS: AtomicBool = AtomicBool::new(false);
static INSTALLED: std::sync::Once = std::sync::Once::new();

/// Installs the handler (once per process; later calls do nothing).
pub fn install() -> Result<()> {
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = ctrlc::set_handler(on_signal).context("cannot install the signal handler");
    });
    result
}

/// From now on a signal runs the registered cleanups and exits.
pub fn stop_on_signal() {
    STOPS.store(true, Ordering::SeqCst);
}

fn on_signal() {
    let pid = RUNNER.load(Ordering::SeqCst);
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        return;
    }
    if !STOPS.load(Ordering::SeqCst) {
        return;
    }
    eprintln!("\nxtask: interrupted; stopping what the checks started");
    let cleanups = match CLEANUPS.lock() {
        Ok(mut all) => std::mem::take(&mut *all),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    for (_, cleanup) in cleanups.iter().rev() {
        cleanup();
    }
    std::process::exit(130);
}

/// The test runner's pid (0 when it has exited).
pub fn set_runner(pid: u32) {
    RUNNER.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
}

/// Runs `cleanup` if we are interrupted before the returned guard is dropped.
pub fn on_interrupt(cleanup: impl Fn() + Send + 'static) -> Registered {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut all) = CLEANUPS.lock() {
        all.push((id, Box::new(cleanup)));
    }
    Registered(id)
}

/// Unregisters its cleanup when dropped (the owner cleans up itself then).
#[derive(Debug)]
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut all) = CLEANUPS.lock() {
            all.retain(|(id, _)| *id != self.0);
        }
    }
}
