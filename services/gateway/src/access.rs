//! The access log: one structured line per request, written when the response body has
//! been sent (so that it carries the byte count), errors always, successes sampled.

use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use common::hyper_server::{Body, BoxError};
use http::Method;
use http_body::Frame;
use http_body_util::BodyExt;

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
    pub request_id: Arc<str>,
    pub started: Instant,
    /// Whether to write the line.
    pub write: bool,
}

/// Wraps a response body so that the entry is written once the body is done; a body
/// whose line is not to be written goes through untouched.
pub fn wrap(body: Body, entry: Entry) -> Body {
    if !entry.write {
        return body;
    }
    Logged {
        inner: body,
        bytes: 0,
        entry: Some(entry),
    }
    .boxed()
}

struct Logged {
    inner: Body,
    bytes: u64,
    entry: Option<Entry>,
}

impl Logged {
    fn finish(&mut self, completed: bool) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        tracing::info!(
            target: "access",
            request_id = &*entry.request_id,
            method = entry.method.as_str(),
            path = entry.path,
            route = &*entry.route,
            instance = entry.instance.as_deref().unwrap_or("-"),
            attempts = entry.attempts,
            status = entry.status,
            bytes = self.bytes,
            completed,
            duration_ms = entry.started.elapsed().as_secs_f64() * 1e3,
            "request"
        );
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended; a client that went away
        // before the end still gets its line, marked incomplete.
        let completed = http_body::Body::is_end_stream(&self.inner);
        self.finish(completed);
    }
}
