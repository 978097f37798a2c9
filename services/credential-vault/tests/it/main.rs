//! The credential-vault as a process and over its database, on both backends.

mod access;
mod basics;
mod credentials;
mod events;
mod openapi;
mod readiness;
mod signing_keys;
mod support;
mod tamper;
