//! The access log: one structured line per request, written when the response body has
//! been sent (so that it carries the byte count), errors always, successes sampled.

use std::sync::Arc;
use std::time::Instant;

use common::hyper_server::Body;
use http::{HeaderValue, Method};

use crate::ending::{self, Ended};

/// What the line says, gathered while the request was served.
#[derive(Debug)]
pub struct Entry {
    pub method: Method,
    /// The path only: queries may carry secrets.
    pub path: String,
    pub route: Arc<str>,
    pub instance: Option<Arc<str>>,
    pub attempts: usize,
    pub status: u16,
    /// Well-formed: visible ASCII (`common::telemetry::request_id_value`).
    pub request_id: HeaderValue,
    pub started: Instant,
    /// Whether to write the line.
    pub write: bool,
}

/// Wraps a response body so that the entry is written once the body is done; a body
/// whose line is not to be written goes through untouched. A client that went away
/// before the end still gets its line, marked incomplete.
pub fn wrap(body: Body, entry: Entry) -> Body {
    if !entry.write {
        return body;
    }
    ending::on_end(body, move |ended| write(&entry, ended))
}

fn write(entry: &Entry, ended: Ended) {
    tracing::info!(
        target: "access",
        request_id = entry.request_id.to_str().unwrap_or("-"),
        method = entry.method.as_str(),
        path = entry.path,
        route = &*entry.route,
        instance = entry.instance.as_deref().unwrap_or("-"),
        attempts = entry.attempts,
        status = entry.status,
        bytes = ended.bytes,
        completed = ended.completed,
        duration_ms = entry.started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
}
