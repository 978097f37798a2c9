//! The service-registry as a process, with a real vault, on both backends.

mod basics;
mod client;
mod extras;
mod flow;
mod openapi;
mod support;
mod tokens;
