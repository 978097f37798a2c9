//! The client's request body on its way upstream, watched: when sending fails, whether the
//! body was to blame (it broke, or grew past the limit) decides who failed, the client or
//! the instance. hyper reports a body's error in one way over HTTP/1.1 (the error, as a
//! cause) and in another over h2c (a stream the gateway reset), so the body itself keeps
//! the record.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::hyper_server::BoxError;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// What became of a watched body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Read without fault so far.
    Sound,
    /// It grew past the limit: 413.
    TooLarge,
    /// The client's stream broke (a bad chunk, a connection closed mid-body): 400.
    Broken,
}

/// The shared record of a body's fate.
#[derive(Debug, Default)]
pub struct Watch(AtomicU8);

impl Watch {
    pub fn fate(&self) -> Fate {
        match self.0.load(Ordering::Relaxed) {
            1 => Fate::TooLarge,
            2 => Fate::Broken,
            _ => Fate::Sound,
        }
    }

    fn set(&self, fate: Fate) {
        let code = match fate {
            Fate::Sound => 0,
            Fate::TooLarge => 1,
            Fate::Broken => 2,
        };
        self.0.store(code, Ordering::Relaxed);
    }
}

/// The body grew past the limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds the limit")]
pub struct TooLarge;

/// The client's body, at most `limit` bytes, its fate kept in `watch`.
#[derive(Debug)]
pub struct Watched {
    inner: Incoming,
    remaining: usize,
    watch: Arc<Watch>,
}

impl Watched {
    pub fn new(inner: Incoming, limit: usize) -> (Self, Arc<Watch>) {
        let watch = Arc::new(Watch::default());
        let body = Self {
            inner,
            remaining: limit,
            watch: watch.clone(),
        };
        (body, watch)
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let Some(remaining) = self.remaining.checked_sub(data.len()) else {
                        self.watch.set(Fate::TooLarge);
                        return Poll::Ready(Some(Err(TooLarge.into())));
                    };
                    self.remaining = remaining;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                self.watch.set(Fate::Broken);
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // As http-body-util's `Limited`: never more than what may still come.
        let remaining = u64::try_from(self.remaining).unwrap_or(u64::MAX);
        let mut hint = self.inner.size_hint();
        if hint.lower() >= remaining {
            hint.set_exact(remaining);
        } else {
            hint.set_upper(hint.upper().map_or(remaining, |upper| upper.min(remaining)));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fate_reads_back_as_set() {
        let watch = Watch::default();
        assert_eq!(watch.fate(), Fate::Sound);
        watch.set(Fate::TooLarge);
        assert_eq!(watch.fate(), Fate::TooLarge);
        watch.set(Fate::Broken);
        assert_eq!(watch.fate(), Fate::Broken);
    }
}
