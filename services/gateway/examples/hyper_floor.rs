//! The cheapest proxy hyper makes: no routing, no balancing, no breaker, no limits, no
//! header hygiene, no metrics. `cargo xtask bench gateway` runs it beside the gateway to
//! show what the hyper stack costs per request before any of the gateway's own work.
//!
//! Usage: `hyper_floor http1|h2c LISTEN_PORT UPSTREAM_PORT`. `http1` uses the same
//! pooled client as the gateway; `h2c` sends every request over one HTTP/2 connection.

use std::convert::Infallible;

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http2;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Upstream {
    Http1(Box<Client<HttpConnector, Incoming>>),
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
            "http1" => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                Upstream::Http1(Box::new(
                    Client::builder(TokioExecutor::new())
                        .pool_max_idle_per_host(1024)
                        .build(connector),
                ))
            }
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
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let Ok(uri) = Uri::try_from(format!("http://127.0.0.1:{port}{path}")) else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    let answer = match upstream {
        Upstream::Http1(client) => client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(BoxError::from),
        Upstream::H2c(sender) => {
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

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = code;
    response
}
