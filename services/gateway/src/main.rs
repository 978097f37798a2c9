//! The gateway binary: all of it lives in the library.

/// mimalloc rather than glibc's malloc, as in the vault: the request path allocates per
/// request. Its effect here was not measured apart; the gateway benchmark's spread hides
/// it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    common::service::main::<gateway::Gateway>()
}
