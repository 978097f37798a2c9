//! The cheapest proxy hyper makes: no routing, no balancing, no breaker, no limits, no
//! header hygiene, no metrics. `cargo xtask bench gateway` runs it beside the gateway to
//! show what the hyper stack costs per request before any of the gateway's own work.
//!
//! Usage: `hyper_floor http1|h2c LISTEN_PORT UPSTREAM_PORT`. `http1` keeps a stack of
//! keep-alive connections, as the gateway does per instance (less carefully: one goes
//! back as soon as its response head is in, and waits there until it is ready again);
//! `h2c` sends every request over one HTTP/2 connection.

use std::convert::Infallible;
use std::sync::{Mutex, PoisonError};

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Upstream {
    Http1(Mutex<Vec<http1::SendRequest<Incoming>>>),
    H2c(http2::SendRequest<Incoming>),
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, upstream] = args.as_slice() else {
        return Err("usage: hyper_floor http1|h2c LISTEN_PORT UPSTREAM_PORT".into());
    };
    let listen: u16 = listen.parse()?;
    let upstream_port: u16 = upstream.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await?;
        let upstream = match mode.as_str() {
            "http1" => Upstream::Http1(Mutex::default()),
            "h2c" => {
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(stream))
                    .await?;
                tokio::spawn(connection);
                Upstream::H2c(sender)
            }
            other => return Err(format!("unknown mode {other}").into()),
        };
        let upstream = std::sync::Arc::new(upstream);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let upstream = upstream.clone();
                    async move { Ok::<_, Infallible>(forward(&upstream, upstream_port, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn forward(upstream: &Upstream, port: u16, request: Request<Incoming>) -> Response<Body> {
    let answer = match upstream {
        Upstream::Http1(idle) => send_http1(idle, port, request).await,
        Upstream::H2c(sender) => {
            let (mut parts, body) = request.into_parts();
            let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let Ok(uri) = Uri::try_from(format!("http://127.0.0.1:{port}{path}")) else {
                return status(StatusCode::BAD_REQUEST);
            };
            parts.uri = uri;
            parts.version = Version::HTTP_2;
            parts.headers.remove(hyper::header::HOST);
            sender
                .clone()
                .send_request(Request::from_parts(parts, body))
                .await
                .map_err(BoxError::from)
        }
    };
    match answer {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

/// Sends `request` (in origin form, as it came) over a ready idle connection, or a new one.
async fn send_http1(
    idle: &Mutex<Vec<http1::SendRequest<Incoming>>>,
    port: u16,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, BoxError> {
    let ready = {
        let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|sender| !sender.is_closed());
        let found = idle.iter().rposition(http1::SendRequest::is_ready);
        found.map(|index| idle.swap_remove(index))
    };
    let mut sender = match ready {
        Some(sender) => sender,
        None => connect_http1(port).await?,
    };
    let sent = sender.send_request(request).await;
    idle.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(sender);
    Ok(sent?)
}

async fn connect_http1(port: u16) -> Result<http1::SendRequest<Incoming>, BoxError> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = code;
    response
}
