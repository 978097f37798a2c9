//! The health-monitor as a process and over its database, on both backends.

mod alerting;
mod basics;
mod checks;
mod scale;
mod support;
