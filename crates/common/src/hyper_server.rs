//! The hyper 1 server the gateway runs, with the same shared behaviour as [`crate::http`]:
//! `/health`, `/ready`, `/metrics`, request ids, metrics, problem+json, a graceful drain.
//!
//! The gateway is hyper on both sides so that bodies stream without buffering
//! (DESIGN.md, "Two HTTP stacks"); this module is its server half.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{IntGauge, Registry};
use tracing::Instrument;

use crate::metrics::{self, HttpMetrics, method_label};
use crate::problem::{self, Problem};
use crate::readiness::Readiness;
use crate::telemetry::{REQUEST_ID_HEADER, request_id_value};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of the gateway: anything that streams bytes.
pub type Body = BoxBody<Bytes, BoxError>;

/// A whole body from bytes in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn problem_response(problem: &Problem) -> Response<Body> {
    let mut response = Response::new(full(problem.to_json()));
    *response.status_mut() =
        StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(problem::CONTENT_TYPE),
    );
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A handler's response, and the route it was served under (a template, or the gateway's
/// route), which the metrics label requests by: `None` is `unmatched`. Its values must
/// come from a bounded set.
#[derive(Debug)]
pub struct Routed {
    pub response: Response<Body>,
    pub route: Option<Arc<str>>,
}

impl Routed {
    pub fn new(response: Response<Body>, route: impl Into<Arc<str>>) -> Self {
        Self {
            response,
            route: Some(route.into()),
        }
    }

    pub fn unmatched(response: Response<Body>) -> Self {
        Self {
            response,
            route: None,
        }
    }
}

/// What the server knows of a request besides the request: given to the handler beside
/// it. (In the request's extensions they cost a map and a box each, per request.)
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The client's address.
    pub peer: SocketAddr,
    /// The request's id, also in its `X-Request-Id` header.
    pub request_id: HeaderValue,
}

/// How much a server accepts before it says no: the limits that hold without tuning.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long open requests may go on after shutdown begins.
    pub drain: Duration,
    /// Connections open at once; past it, new ones are closed at accept.
    pub max_connections: usize,
    /// The time a client has to send a request head (slowloris protection).
    pub header_read_timeout: Duration,
    /// The largest request head, in bytes (431 above it).
    pub max_header_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            drain: Duration::from_secs(30),
            max_connections: 20_000,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// `/health`, `/ready` and `/metrics` for the hyper stack.
#[derive(Debug, Clone)]
pub struct Builtins {
    registry: Registry,
    readiness: Readiness,
}

impl Builtins {
    pub fn new(registry: Registry, readiness: Readiness) -> Self {
        Self {
            registry,
            readiness,
        }
    }

    /// The response for a built-in path, or `None` when `path` is not one of them.
    pub async fn respond(&self, method: &http::Method, path: &str) -> Option<Routed> {
        let (label, response) = match path {
            "/health" => (
                "/health",
                json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            ),
            "/ready" => (
                "/ready",
                // Boxed: the checks' state would otherwise be part of the future of
                // every request a service's handler sends here first.
                match Box::pin(self.readiness.evaluate()).await {
                    Ok(body) => json_response(StatusCode::OK, &body),
                    Err(problem) => problem_response(&problem),
                },
            ),
            "/metrics" => {
                let mut response = Response::new(full(metrics::render(&self.registry)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                ("/metrics", response)
            }
            _ => return None,
        };
        let response = if method == http::Method::GET || method == http::Method::HEAD {
            response
        } else {
            problem_response(&Problem::method_not_allowed())
        };
        Some(Routed::new(response, label))
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then lets open requests
/// finish for up to `options.drain`. Every request gets an id (in its header, and told to
/// the handler with the client's address), a span and its metrics; the handler writes the
/// access log.
pub async fn serve<H, F>(
    listener: tokio::net::TcpListener,
    registry: &Registry,
    handler: H,
    shutdown: impl Future<Output = ()>,
    options: &ServerOptions,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Arrival) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Routed> + Send + 'static,
{
    let metrics = HttpMetrics::new(registry).map_err(std::io::Error::other)?;
    let open = IntGauge::new(
        "concierge_http_connections_open",
        "Client connections open right now.",
    )
    .and_then(|gauge| metrics::register(registry, gauge))
    .map_err(std::io::Error::other)?;
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // The head's own limit: the buffer's alone is checked only between reads, and a
        // read may bring the whole of a larger head in at once.
        .max_header_size(options.max_header_bytes)
        .max_buf_size(options.max_header_bytes.max(8192));
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
    let builders = Arc::new(Builders { http1, http2 });
    let header_read_timeout = options.header_read_timeout;
    // Told to every connection when the drain begins; each holds a clone of `open_tasks`,
    // so that its receiver ends once the last one is done.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (open_tasks, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if usize::try_from(open.get()).unwrap_or(usize::MAX) >= options.max_connections {
            tracing::warn!(
                %peer,
                limit = options.max_connections,
                "connection limit reached; closing a new connection"
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let metrics = metrics.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            let metrics = metrics.clone();
            async move { Ok::<_, Infallible>(observe(req, peer, handler, &metrics).await) }
        });
        let builders = builders.clone();
        let mut stopping = stopping.clone();
        let open = open.clone();
        let held = open_tasks.clone();
        open.inc();
        tokio::spawn(async move {
            let said = tokio::select! {
                biased;
                said = tokio::time::timeout(header_read_timeout, speaks_h2(&stream)) => said,
                // Draining: a request already sent is served; a client that has sent
                // nothing yet is closed rather than waited for.
                () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                    tokio::time::timeout(Duration::from_millis(10), speaks_h2(&stream)).await
                }
            };
            let served = match said {
                Ok(Ok(true)) => {
                    let connection = builders
                        .http2
                        .serve_connection(TokioIo::new(stream), service);
                    until_drained(connection, stopping, |c| c.graceful_shutdown()).await
                }
                Ok(Ok(false)) => {
                    let connection = builders
                        .http1
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    until_drained(connection, stopping, |c| c.graceful_shutdown()).await
                }
                // Closed, or silent past the time allowed for a request head (or the
                // drain's start).
                Ok(Err(_)) | Err(_) => Ok(()),
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            open.dec();
            drop(held);
        });
    }
    drop(listener);
    drop(open_tasks);
    let _ = stop.send(true);
    if tokio::time::timeout(options.drain, all_done.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            drain = ?options.drain,
            "requests still open after the drain timeout; closing them"
        );
    }
    Ok(())
}

/// The two servers a connection may get, once its first bytes say which.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// HTTP/2's connection preface, which a client speaking it by prior knowledge (h2c)
/// sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client opens with HTTP/2's preface, seen without reading it: the first
/// byte that differs says HTTP/1.1 (nearly always the first or second: `GET`, `POST`).
/// hyper-util's version sniffing reads the bytes and wraps the connection to give them
/// back, which cost a measured 8 KB of memory per connection.
///
/// A preface split across segments is rare: a peek would find the same bytes at once, so
/// the next one waits, twice as long each time up to 100 ms (the caller's timeout bounds
/// the whole). A client that closes part-way is an error.
async fn speaks_h2(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    use std::io::ErrorKind;
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let ready = stream.ready(tokio::io::Interest::READABLE).await?;
        let read = stream.peek(&mut seen).await?;
        if read == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if seen[..read] != H2_PREFACE[..read] {
            return Ok(false);
        }
        if read == H2_PREFACE.len() {
            return Ok(true);
        }
        if ready.is_read_closed() {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed within HTTP/2's preface",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Drives `connection` to its end; once `stopping` says so, asks it to finish its open
/// requests and take no more (`shutdown`), and drives it on until they are done.
async fn until_drained<C, E>(
    connection: C,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(connection);
    tokio::select! {
        // The connection first: a request already in its socket is read before the
        // drain asks it to take no more.
        biased;
        served = connection.as_mut() => return served,
        // The sender gone counts as stopping too.
        _ = stopping.wait_for(|stop| *stop) => {}
    }
    shutdown(connection.as_mut());
    connection.await
}

async fn observe<H, F>(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    handler: H,
    metrics: &HttpMetrics,
) -> Response<Body>
where
    H: Fn(Request<Incoming>, Arrival) -> F,
    F: Future<Output = Routed>,
{
    let id = request_id_value(req.headers().get(REQUEST_ID_HEADER));
    // One id upstream, also when the client sent several.
    req.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    let method = method_label(req.method().as_str());
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or_default(),
        method,
        path = req.uri().path()
    );
    let started = Instant::now();
    metrics.started();
    let arrival = Arrival {
        peer,
        request_id: id.clone(),
    };
    let Routed {
        mut response,
        route,
    } = handler(req, arrival).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let route = route.as_deref().unwrap_or("unmatched");
    let status = response.status().as_u16();
    metrics.finished(route, method, status, elapsed);
    span.in_scope(|| {
        tracing::debug!(
            route,
            status,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "response head sent"
        );
    });
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair: the client's end and the server's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn the_preface_says_http2_and_anything_else_http1_without_reading_it() {
        for (first, then, h2) in [
            (&H2_PREFACE[..], &b""[..], true),
            // The preface split across segments: the rest is waited for.
            (&H2_PREFACE[..16], &H2_PREFACE[16..], true),
            (b"GET / HTTP/1.1\r\n", b"", false),
            (b"P", b"OST / HTTP/1.1\r\n", false),
            (b"PRI * HTTP/1.1\r\n", b"", false),
        ] {
            let (mut client, server) = pair().await;
            client.write_all(first).await.unwrap();
            let rest = then.to_vec();
            let writer = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                client.write_all(&rest).await.unwrap();
                client
            });
            let said = speaks_h2(&server).await.unwrap();
            assert_eq!(said, h2, "{:?}", String::from_utf8_lossy(first));
            let _client = writer.await.unwrap();
            // Nothing was read: hyper gets every byte.
            let mut seen = vec![0u8; first.len()];
            assert_eq!(server.peek(&mut seen).await.unwrap(), first.len());
            assert_eq!(seen, first);
        }
    }

    #[tokio::test]
    async fn a_client_that_closes_within_the_preface_is_neither_and_is_not_waited_for() {
        let (mut client, server) = pair().await;
        client.write_all(&H2_PREFACE[..3]).await.unwrap();
        client.shutdown().await.unwrap();
        let said = tokio::time::timeout(Duration::from_secs(2), speaks_h2(&server)).await;
        assert!(matches!(said, Ok(Err(_))), "{said:?}");
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_is_neither() {
        let (client, server) = pair().await;
        drop(client);
        assert!(speaks_h2(&server).await.is_err());
    }
}
