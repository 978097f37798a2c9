//! The credential-vault as a process and over its database, on both backends.

mod basics;
mod readiness;
