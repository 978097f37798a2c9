//! The gateway as a process, in front of a real registry and vault.

mod edge;
mod limits;
mod resilience;
mod routing;
mod streaming;
mod support;

use common::testing::check_binary_basics;

const BINARY: &str = env!("CARGO_BIN_EXE_gateway");

#[tokio::test]
async fn the_binary_validates_config_answers_healthcheck_and_stops_on_sigterm() {
    check_binary_basics(BINARY, &[], &[]).await;
}
