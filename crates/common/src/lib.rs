//! Concierge's shared kernel: what every service needs and nothing any one service owns.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod address;
pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod db;
pub mod forwarded;
pub mod healthcheck;
pub mod http;
pub mod hyper_server;
pub mod metrics;
pub mod path;
pub mod problem;
pub mod readiness;
pub mod registration;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
