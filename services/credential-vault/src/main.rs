//! The credential-vault binary: all of it lives in the library.

/// mimalloc rather than glibc's malloc, which took about an eighth of the vault's CPU
/// under `cargo xtask bench vault` (see the workspace manifest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    common::service::main::<credential_vault::CredentialVault>()
}
