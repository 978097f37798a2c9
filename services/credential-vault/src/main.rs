//! The credential-vault binary: all of it lives in the library.

/// mimalloc rather than glibc's malloc: per-request allocations are the hot path's
/// largest cost after the kernel's (see the workspace manifest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    common::service::main::<credential_vault::CredentialVault>()
}
