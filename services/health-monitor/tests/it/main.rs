//! The health-monitor as a process and over its database, on both backends.

mod alerting;
mod basics;
mod checks;
mod containers;
mod scale;
mod support;
mod tls;
mod tokens;
