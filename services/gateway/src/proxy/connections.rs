//! The connections to the instances. Each instance's live state keeps its own: a stack
//! of idle HTTP/1.1 keep-alive connections, and the one HTTP/2 connection its h2c routes
//! share. They follow the instance from route table to table and close with it.
//!
//! hyper's own connections (`hyper::client::conn`) without hyper-util's pool: the
//! instance is known before the request is sent, so the pool's keyed checkout, its
//! waiters and the task it spawns per request to take a connection back were work for
//! nothing (about 1.2 µs of CPU per HTTP/1.1 request, 1.7 µs per h2c one).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::hyper_server::{Body, BoxError};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::UpstreamProtocol;
use crate::table::Endpoint;

/// A connection unused this long may be one the instance is closing (its keep-alive
/// timeout is up) just as a request goes out on it.
const MAY_BE_STALE: Duration = Duration::from_secs(1);

/// TCP keep-alive probes find an instance that vanished while a connection sat idle.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How requests reach the instances: the settings of the connections to them.
#[derive(Debug)]
pub struct Upstreams {
    http2: http2::Builder<TokioExecutor>,
    /// A connection unused this long is closed.
    idle_timeout: Duration,
}

impl Upstreams {
    pub fn new(idle_timeout: Duration) -> Self {
        // Pings find a dead connection, also while no request is waiting on it. Data a
        // client has not read yet holds window: a small one per stream and a large one
        // for the connection, so that it takes 64 stalled downloads, not three, to stall
        // an instance's connection (hyper's defaults are 2 MiB and 5 MiB).
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024);
        Self {
            http2,
            idle_timeout,
        }
    }

    /// Closes the connections to `endpoints` that have sat unused too long, or that lead
    /// to an address the instance has left, or that the instance has closed.
    pub fn close_idle<'a>(&self, endpoints: impl Iterator<Item = &'a Endpoint>) {
        for endpoint in endpoints {
            let live = &endpoint.live;
            live.http1.close_idle(self.idle_timeout);
            live.h2c.close_idle(&endpoint.authority, self.idle_timeout);
        }
    }

    /// Sends `request` to `endpoint` and waits for the response's head.
    pub(super) async fn send(
        &self,
        endpoint: &Endpoint,
        protocol: UpstreamProtocol,
        connect_timeout: Duration,
        request: Request<Body>,
    ) -> Result<Sent, SendError> {
        match protocol {
            UpstreamProtocol::Http1 => self.send_http1(endpoint, connect_timeout, request).await,
            UpstreamProtocol::H2c => {
                let response = self.send_h2c(endpoint, connect_timeout, request).await?;
                Ok(Sent {
                    response,
                    lent: None,
                })
            }
        }
    }

    async fn send_http1(
        &self,
        endpoint: &Endpoint,
        connect_timeout: Duration,
        request: Request<Body>,
    ) -> Result<Sent, SendError> {
        let authority = &endpoint.authority;
        let taken = endpoint.live.http1.take(authority, self.idle_timeout);
        // A request may meet a connection the instance is closing as it goes out: one
        // that can be sent twice is kept to go again, when its connection sat unused
        // long enough for that (connections in steady use pay nothing for it).
        let again = match &taken {
            Some((_, idle_for)) if *idle_for >= MAY_BE_STALE => replayable(&request),
            _ => None,
        };
        let mut sender = match taken {
            Some((sender, _)) => sender,
            None => match handshake_http1(authority, connect_timeout).await {
                Ok(sender) => sender,
                Err(error) => return Err(SendError::connect(error, request)),
            },
        };
        let resend = match sender.try_send_request(request).await {
            Ok(response) => return Ok(Sent::lent(response, authority, sender)),
            Err(mut error) => match (error.take_message(), again) {
                // The connection closed before the request left: a new one takes it.
                (Some(request), _) => request,
                (None, Some(copy)) if closed_under_it(error.error()) => {
                    tracing::debug!(
                        instance = &*endpoint.instance_id,
                        "a kept connection closed as a request went out; sending it again"
                    );
                    copy
                }
                (None, _) => return Err(SendError::Failed(error.into_error().into())),
            },
        };
        let mut sender = match handshake_http1(authority, connect_timeout).await {
            Ok(sender) => sender,
            Err(error) => return Err(SendError::connect(error, resend)),
        };
        let response = sender
            .send_request(resend)
            .await
            .map_err(|error| SendError::Failed(error.into()))?;
        Ok(Sent::lent(response, authority, sender))
    }

    async fn send_h2c(
        &self,
        endpoint: &Endpoint,
        connect_timeout: Duration,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let shared = &endpoint.live.h2c;
        let connect = || shared.sender(&endpoint.authority, connect_timeout, &self.http2);
        let mut sender = match connect().await {
            Ok(sender) => sender,
            Err(error) => return Err(SendError::connect(error, request)),
        };
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                // The connection closed before the request left: a new one takes it.
                Some(request) => match connect().await {
                    Ok(mut sender) => sender
                        .send_request(request)
                        .await
                        .map_err(|error| SendError::Failed(error.into())),
                    Err(error) => Err(SendError::connect(error, request)),
                },
                None => Err(SendError::Failed(error.into_error().into())),
            },
        }
    }
}

/// A new HTTP/1.1 connection to `authority`. Its future is boxed: the connect and
/// handshake states are large and seldom needed, and unboxed they would be part of every
/// request's future, held while it is open and copied whole each time it moves.
fn handshake_http1(
    authority: &Authority,
    timeout: Duration,
) -> Pin<Box<impl Future<Output = Result<http1::SendRequest<Body>, BoxError>> + Send + '_>> {
    Box::pin(handshake_http1_unboxed(authority, timeout))
}

async fn handshake_http1_unboxed(
    authority: &Authority,
    timeout: Duration,
) -> Result<http1::SendRequest<Body>, BoxError> {
    let handshake = async {
        let stream = connect(authority, timeout).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "a connection to an instance ended");
            }
        });
        Ok(sender)
    };
    within(timeout, handshake).await
}

/// A copy of `request` to send again, if it may be sent twice: idempotent, without a body.
fn replayable(request: &Request<Body>) -> Option<Request<Body>> {
    if !super::is_idempotent(request.method()) || !http_body::Body::is_end_stream(request.body()) {
        return None;
    }
    let mut copy = Request::new(super::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Whether a connection failed under a request before any answer came: closed or reset by
/// the instance, which then has not answered it.
fn closed_under_it(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    error.is_incomplete_message()
        || super::cause::<std::io::Error>(error).is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            )
        })
}

/// A response's head, and the HTTP/1.1 connection it came on, to be given back once the
/// body has been read to its end.
#[derive(Debug)]
pub(super) struct Sent {
    pub response: Response<Incoming>,
    pub lent: Option<Lent>,
}

impl Sent {
    fn lent(
        response: Response<Incoming>,
        authority: &Authority,
        sender: http1::SendRequest<Body>,
    ) -> Self {
        Self {
            response,
            lent: Some(Lent {
                authority: authority.clone(),
                sender,
            }),
        }
    }
}

/// An HTTP/1.1 connection lent to one request.
#[derive(Debug)]
pub(super) struct Lent {
    authority: Authority,
    sender: http1::SendRequest<Body>,
}

/// Why an instance gave no response.
#[derive(Debug)]
pub(super) enum SendError {
    /// No connection could be made: the request never left, and comes back untouched,
    /// body and all, for another instance to take.
    Connect(BoxError, Box<Request<Body>>),
    Failed(BoxError),
}

impl SendError {
    fn connect(error: BoxError, request: Request<Body>) -> Self {
        Self::Connect(error, Box::new(request))
    }

    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(..))
    }

    pub fn error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Connect(error, _) | Self::Failed(error) => &**error,
        }
    }

    /// The request that never left, after a connect error.
    pub fn into_unsent(self) -> Option<Request<Body>> {
        match self {
            Self::Connect(_, request) => Some(*request),
            Self::Failed(_) => None,
        }
    }
}

/// An instance's idle HTTP/1.1 connections, the most recently used on top: those used
/// often stay warm, and the others age out.
#[derive(Debug, Default)]
pub struct IdleConnections {
    stack: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    lent: Lent,
    since: Instant,
}

impl IdleConnections {
    /// An idle connection to `authority` that takes a request now, and how long it sat
    /// unused, if there is one.
    fn take(
        &self,
        authority: &Authority,
        idle_timeout: Duration,
    ) -> Option<(http1::SendRequest<Body>, Duration)> {
        let mut stack = lock(&self.stack);
        let now = Instant::now();
        if stack
            .first()
            .is_some_and(|oldest| now.duration_since(oldest.since) >= idle_timeout)
        {
            stack.retain(|idle| now.duration_since(idle.since) < idle_timeout);
        }
        // From the top: one the instance closed, or to an address it has left, goes;
        // one still finishing its last exchange (an upload the instance answered early,
        // say) stays for later.
        let mut index = stack.len();
        while index > 0 {
            index -= 1;
            let sender = &stack[index].lent.sender;
            if sender.is_closed() || stack[index].lent.authority != *authority {
                stack.remove(index);
            } else if sender.is_ready() {
                let idle = stack.remove(index);
                return Some((idle.lent.sender, now.duration_since(idle.since)));
            }
        }
        None
    }

    fn close_idle(&self, idle_timeout: Duration) {
        let now = Instant::now();
        lock(&self.stack).retain(|idle| {
            now.duration_since(idle.since) < idle_timeout && !idle.lent.sender.is_closed()
        });
    }

    /// Takes back a connection whose response was read to its end.
    pub(super) fn put(&self, lent: Lent) {
        if lent.sender.is_closed() {
            return;
        }
        lock(&self.stack).push(Idle {
            lent,
            since: Instant::now(),
        });
    }
}

/// The one HTTP/2 connection an h2c instance's requests share, made when first needed
/// and again once it has closed or the instance has moved to another address.
#[derive(Debug, Default)]
pub struct SharedConnection {
    current: Mutex<Option<Current>>,
    /// Held while connecting, so that the requests that find no connection wait for the
    /// one under way rather than each opening its own.
    connecting: tokio::sync::Mutex<()>,
    /// The last attempt that failed: the requests that waited for it to the same address
    /// fail too, rather than each trying again in turn.
    failed: Mutex<Option<Failed>>,
}

/// The connection in use, where it leads and when a request last took it.
#[derive(Debug)]
struct Current {
    authority: Authority,
    sender: http2::SendRequest<Body>,
    last_used: Instant,
}

#[derive(Debug)]
struct Failed {
    authority: Authority,
    at: Instant,
    why: String,
}

impl SharedConnection {
    async fn sender(
        &self,
        authority: &Authority,
        connect_timeout: Duration,
        builder: &http2::Builder<TokioExecutor>,
    ) -> Result<http2::SendRequest<Body>, BoxError> {
        if let Some(sender) = self.ready(authority) {
            return Ok(sender);
        }
        // Boxed, for the reason `handshake_http1` is: connecting is seldom needed.
        Box::pin(self.connect_anew(authority, connect_timeout, builder)).await
    }

    /// A new connection to `authority`, or the one another request made meanwhile.
    async fn connect_anew(
        &self,
        authority: &Authority,
        connect_timeout: Duration,
        builder: &http2::Builder<TokioExecutor>,
    ) -> Result<http2::SendRequest<Body>, BoxError> {
        let waited_from = Instant::now();
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.ready(authority) {
            return Ok(sender);
        }
        if let Some(failed) = &*lock(&self.failed)
            && failed.at >= waited_from
            && failed.authority == *authority
        {
            return Err(failed.why.clone().into());
        }
        let handshake = async {
            let stream = connect(authority, connect_timeout).await?;
            let (sender, connection) = builder.handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "an h2c connection to an instance ended");
                }
            });
            Ok(sender)
        };
        match within(connect_timeout, handshake).await {
            Ok(sender) => {
                *lock(&self.current) = Some(Current {
                    authority: authority.clone(),
                    sender: sender.clone(),
                    last_used: Instant::now(),
                });
                Ok(sender)
            }
            Err(error) => {
                *lock(&self.failed) = Some(Failed {
                    authority: authority.clone(),
                    at: Instant::now(),
                    why: super::chain(&*error),
                });
                Err(error)
            }
        }
    }

    /// The connection to `authority`, if there is one that takes requests.
    fn ready(&self, authority: &Authority) -> Option<http2::SendRequest<Body>> {
        let mut current = lock(&self.current);
        let current = current
            .as_mut()
            .filter(|current| current.authority == *authority && current.sender.is_ready())?;
        current.last_used = Instant::now();
        Some(current.sender.clone())
    }

    /// Lets the connection go (it closes once the requests on it are done) if it was
    /// unused for `idle_timeout`, or leads to an address other than `authority`.
    fn close_idle(&self, authority: &Authority, idle_timeout: Duration) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|current| {
            current.authority != *authority || current.last_used.elapsed() >= idle_timeout
        }) {
            *current = None;
        }
    }
}

/// A TCP connection to `authority` (port 80 if it names none), with Nagle's delay off and
/// keep-alive probes on. A name may resolve to several addresses: each is tried in turn
/// with an equal share of the time left, so that one that drops packets (a stale record,
/// a deleted pod) cannot take the whole `timeout`.
async fn connect(authority: &Authority, timeout: Duration) -> Result<TcpStream, BoxError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (host, port) = host_and_port(authority);
    let addresses: Vec<SocketAddr> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("{host} did not resolve within {timeout:?}"))??
            .collect();
    if addresses.is_empty() {
        return Err(format!("{host} resolves to no address").into());
    }
    // Never to a cloud's metadata service, whatever name leads there (`common::address`).
    let mut refusal = None;
    let addresses: Vec<SocketAddr> = addresses
        .into_iter()
        .filter(|address| match common::address::refused(address.ip()) {
            Some(why) => {
                refusal = Some(format!("{host} resolves to {}, {why}", address.ip()));
                false
            }
            None => true,
        })
        .collect();
    if let Some(refusal) = refusal.filter(|_| addresses.is_empty()) {
        return Err(refusal.into());
    }
    connect_to(&addresses, deadline).await
}

/// A connection to the first of `addresses` that answers, each given an equal share of
/// the time left until `deadline`.
async fn connect_to(
    addresses: &[SocketAddr],
    deadline: tokio::time::Instant,
) -> Result<TcpStream, BoxError> {
    let mut last_error: BoxError = "no address to connect to".into();
    for (tried, address) in addresses.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addresses.len() - tried).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                stream.set_nodelay(true)?;
                let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                return Ok(stream);
            }
            Ok(Err(error)) => last_error = format!("{address}: {error}").into(),
            Err(_) => last_error = format!("no connection to {address} within {share:?}").into(),
        }
    }
    Err(last_error)
}

/// The host to resolve (an IPv6 literal without the brackets URIs put around it) and the
/// port, 80 when the authority names none.
fn host_and_port(authority: &Authority) -> (&str, u16) {
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (host, authority.port_u16().unwrap_or(80))
}

/// `connecting`, unless `timeout` passes first.
async fn within<T>(
    timeout: Duration,
    connecting: impl Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    tokio::time::timeout(timeout, connecting)
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {timeout:?}").into()))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authority_without_a_port_means_port_80() {
        let parse = |text: &'static str| Authority::from_static(text);
        assert_eq!(host_and_port(&parse("vault")), ("vault", 80));
        assert_eq!(host_and_port(&parse("vault:8200")), ("vault", 8200));
        assert_eq!(host_and_port(&parse("[::1]:8080")), ("::1", 8080));
        assert_eq!(host_and_port(&parse("[::1]")), ("::1", 80));
    }

    #[tokio::test]
    async fn a_metadata_address_is_never_connected_to() {
        for authority in [
            "169.254.169.254",
            "[fd00:ec2::254]:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            let error = connect(&Authority::from_static(authority), Duration::from_secs(5))
                .await
                .expect_err(authority)
                .to_string();
            assert!(
                error.contains("link-local") || error.contains("metadata"),
                "{authority}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_port_less_authority_connects_to_port_80() {
        // Whether or not something listens on port 80 of 127.0.0.2, the attempt goes there
        // (an invalid socket address would fail before any attempt).
        match connect(&Authority::from_static("127.0.0.2"), Duration::from_secs(2)).await {
            Ok(stream) => assert_eq!(stream.peer_addr().unwrap().port(), 80),
            Err(error) => {
                let text = error.to_string();
                assert!(text.starts_with("127.0.0.2:80: "), "{text}");
            }
        }
    }

    #[tokio::test]
    async fn an_address_gone_dark_leaves_time_for_the_next() {
        let (_listener, _queued, dark) = common::testing::dark_port().await;
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Bound but not listening: connections to it are refused, and no other test can
        // take its port meanwhile.
        let refused = tokio::net::TcpSocket::new_v4().unwrap();
        refused.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let refused_address = refused.local_addr().unwrap();
        let addresses = [
            SocketAddr::from(([127, 0, 0, 1], dark)),
            refused_address,
            live.local_addr().unwrap(),
        ];
        let started = tokio::time::Instant::now();
        let stream = connect_to(&addresses, started + Duration::from_secs(3))
            .await
            .expect("the last address accepts");
        assert_eq!(stream.peer_addr().unwrap(), addresses[2]);
        // The dark address had its third of the time, not all of it (a loopback connect
        // may succeed even with no time left, so the time taken is what tells).
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");

        // None answers: the error names the last one tried.
        let error = connect_to(
            &addresses[..2],
            tokio::time::Instant::now() + Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("{refused_address}: ")),
            "{error}"
        );
    }
}
