//! The service-registry binary: all of it lives in the library.

fn main() -> std::process::ExitCode {
    common::service::main::<service_registry::ServiceRegistry>()
}
