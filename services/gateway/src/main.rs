//! The gateway binary: all of it lives in the library.

/// mimalloc rather than glibc's malloc, as in the vault: the request path allocates per
/// request, and on glibc's malloc it executed 4.9 % more instructions per request
/// (callgrind). Without transparent huge pages (the workspace's `no_thp`), its peak
/// memory under a crowd is within 3 % of glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    common::service::main::<gateway::Gateway>()
}
