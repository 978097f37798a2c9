//! The common crate's behaviour over real HTTP on loopback, and the migration folders.

mod actix_stack;
mod hyper_stack;
mod migrations;

use std::time::Duration;

use common::client::HttpClient;

pub fn client() -> HttpClient {
    HttpClient::new(Duration::from_secs(10))
}

/// A real SIGTERM to this test process; nextest runs each test in its own process, and
/// the server's handler (installed before this is called) keeps the process alive.
pub fn sigterm_self() {
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM).unwrap();
}

pub async fn wait_until_up(url: &str) {
    for _ in 0..200 {
        if client().get_json::<serde_json::Value>(url).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} never answered");
}
