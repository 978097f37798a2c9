//! Diesel embeds migrations at compile time but does not notice when they change.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations/credential-vault");
}
