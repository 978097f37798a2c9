//! The health-monitor binary: all of it lives in the library.

fn main() -> std::process::ExitCode {
    common::service::main::<health_monitor::HealthMonitor>()
}
