//! The credential-vault binary: all of it lives in the library.

fn main() -> std::process::ExitCode {
    common::service::main::<credential_vault::CredentialVault>()
}
