//! A response body that reports how it ended, once: read to its end, or cut short by an
//! error or by being dropped before its end. The access log and the in-flight count of
//! an instance (with the connection it lends) both wait for that.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use common::hyper_server::{Body, BoxError};
use http_body::Frame;
use http_body_util::BodyExt;

/// How a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Read to its end.
    pub completed: bool,
    /// The bytes of data that went through.
    pub bytes: u64,
}

/// `body`, calling `report` once when it ends. Any body: an instance's comes unboxed, so
/// that it is wrapped once, not twice, on its way to the client.
pub fn on_end<B, F>(body: B, report: F) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
    F: FnOnce(Ended) + Send + Sync + Unpin + 'static,
{
    Ending {
        inner: body,
        bytes: 0,
        report: Some(report),
    }
    .boxed()
}

struct Ending<B: http_body::Body, F: FnOnce(Ended)> {
    inner: B,
    bytes: u64,
    report: Option<F>,
}

impl<B: http_body::Body, F: FnOnce(Ended)> Ending<B, F> {
    fn end(&mut self, completed: bool) {
        if let Some(report) = self.report.take() {
            report(Ended {
                completed,
                bytes: self.bytes,
            });
        }
    }
}

impl<B, F> http_body::Body for Ending<B, F>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnOnce(Ended) + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|frame| frame.map(|result| result.map_err(Into::into)));
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.end(true),
            Poll::Ready(Some(Err(_))) => self.end(false),
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

impl<B: http_body::Body, F: FnOnce(Ended)> Drop for Ending<B, F> {
    /// A server stops polling a body that says it has ended, and never polls an empty
    /// one: such a body was read whole all the same. Any other is cut short.
    fn drop(&mut self) {
        let completed = http_body::Body::is_end_stream(&self.inner);
        self.end(completed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::{Empty, Full, StreamBody};

    use super::*;

    fn watched(body: Body) -> (Body, Arc<Mutex<Vec<Ended>>>) {
        let seen: Arc<Mutex<Vec<Ended>>> = Arc::default();
        let sink = seen.clone();
        let body = on_end(body, move |ended| sink.lock().unwrap().push(ended));
        (body, seen)
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_reports_once_with_its_bytes() {
        let (body, seen) = watched(
            Full::new(Bytes::from_static(b"hello"))
                .map_err(|n| match n {})
                .boxed(),
        );
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(
            *seen.lock().unwrap(),
            [Ended {
                completed: true,
                bytes: 5
            }]
        );
    }

    #[tokio::test]
    async fn an_empty_body_dropped_unpolled_was_complete() {
        let (body, seen) = watched(Empty::new().map_err(|n| match n {}).boxed());
        drop(body);
        assert_eq!(
            *seen.lock().unwrap(),
            [Ended {
                completed: true,
                bytes: 0
            }]
        );
    }

    /// What hyper's server does with a body that knows its length: it stops after the
    /// last data frame, never asking for the end.
    #[tokio::test]
    async fn a_sized_body_dropped_after_its_last_frame_was_complete_a_chunked_one_not() {
        let sized = Full::new(Bytes::from_static(b"abc")).map_err(|n| match n {});
        let (mut body, seen) = watched(sized.boxed());
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(
            *seen.lock().unwrap(),
            [Ended {
                completed: true,
                bytes: 3
            }]
        );
        let one_chunk = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(
            Bytes::from_static(b"abc"),
        ))]);
        let (mut body, seen) = watched(StreamBody::new(one_chunk).boxed());
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(
            *seen.lock().unwrap(),
            [Ended {
                completed: false,
                bytes: 3
            }]
        );
    }

    #[tokio::test]
    async fn a_body_dropped_early_or_failing_was_cut_short() {
        let chunks = || {
            futures_util::stream::iter([
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"abc"))),
                Err("reset".into()),
            ])
        };
        let (mut body, seen) = watched(StreamBody::new(chunks()).boxed());
        body.frame().await.unwrap().unwrap();
        drop(body);
        let (body, failed) = watched(StreamBody::new(chunks()).boxed());
        assert!(body.collect().await.is_err());
        let cut = Ended {
            completed: false,
            bytes: 3,
        };
        assert_eq!(*seen.lock().unwrap(), [cut]);
        assert_eq!(*failed.lock().unwrap(), [cut]);
    }
}
