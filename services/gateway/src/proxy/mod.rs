//! The data plane: send a request to an instance of a pool and stream the answer back,
//! with circuit breaking, retries within the budget, timeouts and header hygiene.
//!
//! The only module that uses the hyper client (STYLE.md, "one door"); `connections`
//! keeps the connections it is sent over.

pub mod client_body;
mod connections;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use common::hyper_server::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;

use crate::balance::{self, Constraints};
use crate::breaker::{Admission, Outcome};
use crate::config::{RoutePolicy, UpstreamProtocol};
use crate::error::GatewayError;
use crate::metrics::{Attempt, GatewayMetrics};
use crate::table::{Endpoint, Live, Pool};
use client_body::Fate;

pub use connections::{IdleConnections, SharedConnection, Upstreams};
use connections::{Lent, Sent};

/// The header that carries the verified token subject upstream; never taken from a client.
pub const SUBJECT_HEADER: HeaderName = HeaderName::from_static("x-concierge-subject");

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Attempts per request at most (the first and two retries), budget permitting.
const MAX_ATTEMPTS: usize = 3;

/// A request body, and whether it can be sent again to another instance.
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    Bytes(Bytes),
    /// Streamed from the client: sent once, never retried.
    Stream(Body),
}

impl RequestBody {
    fn replayable(&self) -> bool {
        !matches!(self, Self::Stream(_))
    }

    fn take(&mut self) -> Body {
        match std::mem::replace(self, Self::Empty) {
            Self::Empty => empty(),
            Self::Bytes(bytes) => {
                let body = common::hyper_server::full(bytes.clone());
                *self = Self::Bytes(bytes);
                body
            }
            Self::Stream(body) => body,
        }
    }
}

/// One request on its way upstream.
#[derive(Debug)]
pub struct Outgoing {
    pub method: Method,
    /// The path and query the instance sees (checked once, cloned per attempt for free).
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
    pub body: RequestBody,
    /// What became of a body streamed from the client.
    pub body_watch: Option<Arc<client_body::Watch>>,
    pub upgrade: Option<OnUpgrade>,
    /// The client said `TE: trailers` (gRPC needs it): the gateway says it upstream too.
    pub accepts_trailers: bool,
}

/// Which instance answered.
#[derive(Debug, Clone)]
pub struct Answered {
    pub instance: Arc<str>,
    pub attempts: usize,
}

/// Counts a request in flight on an instance until the response body ends (or the
/// upgraded connection closes), for least-outstanding balancing and the status page.
/// It holds one of the instance's connection slots as long, and the HTTP/1.1 connection
/// the response comes on, which goes back to the instance's idle ones only if the body
/// is read to its end.
#[derive(Debug)]
pub struct InFlight {
    live: Arc<Live>,
    lent: Option<Lent>,
    /// Released on drop, after the count.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl InFlight {
    fn start(live: &Arc<Live>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        live.in_flight.fetch_add(1, Ordering::Relaxed);
        live.requests.fetch_add(1, Ordering::Relaxed);
        Self {
            live: live.clone(),
            lent: None,
            _slot: slot,
        }
    }

    /// The response has been read whole: its connection can take another request.
    fn done(mut self) {
        if let Some(lent) = self.lent.take() {
            self.live.http1.put(lent);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.live.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What `forward` needs from the gateway.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub upstreams: &'a Upstreams,
    pub metrics: &'a GatewayMetrics,
    pub panic_threshold: u8,
    /// The request body limit, for the 413 when a streamed body goes over it.
    pub body_limit: usize,
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Sends `outgoing` to an instance of `pool`, trying others after a connect error, a
/// reset or a 503 when the request can be sent again and the retry budget allows.
pub async fn forward(
    cx: Context<'_>,
    pool: &Pool,
    policy: &RoutePolicy,
    mut outgoing: Outgoing,
) -> Result<(Response<Body>, Answered), GatewayError> {
    let service = &*pool.service;
    // An upgrade is an HTTP/1.1 mechanism (RFC 9110 §7.8), whatever the route speaks; the
    // control plane's services speak nothing else.
    let protocol = if outgoing.upgrade.is_some() || crate::table::is_control_plane(service) {
        UpstreamProtocol::Http1
    } else {
        policy.protocol
    };
    let replayable = outgoing.body.replayable() && outgoing.upgrade.is_none();
    let streamed = !outgoing.body.replayable();
    let idempotent = is_idempotent(&outgoing.method);
    pool.budget.deposit();
    // Inline: most requests make one attempt, and a heap list would cost an allocation.
    let mut tried: SmallVec<[usize; MAX_ATTEMPTS]> = SmallVec::new();
    let mut last_error = None;
    // A 503 an instance answered before the request went on to another: the client's
    // answer if no other instance answers, rather than a failure the gateway makes up.
    let mut held = None;
    // Why the last attempt is to be tried again, once another instance is found for it:
    // only then does the retry take from the budget and count.
    let mut retrying: Option<&'static str> = None;
    loop {
        let now = Instant::now();
        let constraints = Constraints {
            balance: policy.balance,
            panic_threshold: cx.panic_threshold,
            allow_probe: replayable,
            exclude: &tried,
        };
        let Some(index) = balance::pick(pool, constraints, now) else {
            return answer_held(held, &tried).ok_or_else(|| {
                last_error.unwrap_or_else(|| GatewayError::NoInstance(service.to_owned()))
            });
        };
        if let Some(reason) = retrying.take() {
            if !pool.budget.withdraw() {
                cx.metrics.budget_exhausted(service);
                return answer_held(held, &tried).ok_or_else(|| {
                    last_error.unwrap_or_else(|| GatewayError::NoInstance(service.to_owned()))
                });
            }
            cx.metrics.retried(service, reason);
        }
        tried.push(index);
        let endpoint = &pool.endpoints[index];
        let admission = {
            let (admission, transition) = endpoint.live.breaker().admit(now);
            if let Some(state) = transition {
                cx.metrics.circuit(service, &endpoint.instance_id, state);
            }
            admission
        };
        let Some(admission) = admission else {
            continue; // its last probe slot went to another request meanwhile
        };
        let admission = Admitted {
            live: &endpoint.live,
            admission,
            judged: false,
        };
        let body = outgoing.body.take();
        // The headers are needed again only if another instance may be tried (also for a
        // request that goes once: a connect error hands it back unsent).
        let last_chance = tried.len() >= MAX_ATTEMPTS.min(pool.endpoints.len());
        let headers = if last_chance {
            std::mem::take(&mut outgoing.headers)
        } else {
            outgoing.headers.clone()
        };
        let request = upstream_request(&outgoing, endpoint, protocol, headers, body)?;
        // The clock read for the pick serves: building the request took well under a µs.
        let started = now;
        // The wait for a free connection slot counts against the request's timeout.
        let answer = tokio::time::timeout(policy.timeout, async {
            let slot = endpoint.live.slots.clone().acquire_owned().await.ok()?;
            let mut guard = InFlight::start(&endpoint.live, slot);
            // Boxed: this future holds the request and hyper's states (over a kilobyte);
            // unboxed, every future around it would hold it too, and each is copied
            // whole as it moves.
            let sent =
                Box::pin(
                    cx.upstreams
                        .send(endpoint, protocol, policy.connect_timeout, request),
                )
                .await
                .map(|Sent { response, lent }| {
                    guard.lent = lent;
                    response
                });
            Some((sent, guard))
        })
        .await;
        let elapsed = started.elapsed();
        let answer = match answer {
            Ok(Some((answer, guard))) => Ok((answer, guard)),
            Ok(None) => return Err(GatewayError::Internal("an instance's slots closed".into())),
            Err(elapsed) => Err(elapsed),
        };
        let attempt_error = match answer {
            Ok((Ok(mut response), guard)) => {
                let status = response.status();
                let outcome = if status.is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                record(cx, pool, endpoint, admission, outcome, started + elapsed);
                pool.metrics.upstream(
                    if status.is_server_error() {
                        Attempt::Status5xx
                    } else {
                        Attempt::Ok
                    },
                    elapsed,
                );
                let may_retry =
                    status == StatusCode::SERVICE_UNAVAILABLE && replayable && idempotent;
                let answered = Answered {
                    instance: endpoint.instance_id.clone(),
                    attempts: tried.len(),
                };
                if !(may_retry && may_try_again(pool, &tried)) {
                    if status == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client_side) = outgoing.upgrade.take()
                    {
                        let upstream_side = hyper::upgrade::on(&mut response);
                        tokio::spawn(tunnel(client_side, upstream_side, guard));
                        return Ok((downstream(response, true).map(|_| empty()), answered));
                    }
                    return Ok((
                        downstream(response, false).map(|body| track(body, guard)),
                        answered,
                    ));
                }
                held = Some((
                    downstream(response, false).map(|body| track(body, guard)),
                    answered,
                ));
                retrying = Some("status_503");
                GatewayError::Upstream {
                    service: service.to_owned(),
                    instance: endpoint.instance_id.to_string(),
                    cause: "answered 503".into(),
                }
            }
            Ok((Err(failed), _guard)) => {
                let connect = failed.is_connect();
                let error = failed.error();
                // The client's body failed, not the instance: nothing to judge it by.
                match outgoing
                    .body_watch
                    .as_ref()
                    .map_or(Fate::Sound, |w| w.fate())
                {
                    Fate::Sound => {}
                    Fate::TooLarge => return Err(GatewayError::BodyTooLarge(cx.body_limit)),
                    Fate::Broken => {
                        return Err(GatewayError::BadRequest(
                            "the request body could not be read".into(),
                        ));
                    }
                }
                // An upgrade goes over HTTP/1.1 even on an h2c route, whose instances may
                // not speak it: their refusal must not open their circuits.
                if outgoing.upgrade.is_some() && policy.protocol == UpstreamProtocol::H2c {
                    return Err(GatewayError::Upstream {
                        service: service.to_owned(),
                        instance: endpoint.instance_id.to_string(),
                        cause: format!("the upgrade over HTTP/1.1 failed: {}", chain(error)),
                    });
                }
                let outcome = if connect {
                    Outcome::ConnectFailure
                } else {
                    Outcome::Failure
                };
                record(cx, pool, endpoint, admission, outcome, started + elapsed);
                pool.metrics.upstream(
                    if connect {
                        Attempt::Connect
                    } else {
                        Attempt::Reset
                    },
                    elapsed,
                );
                let cause = chain(error);
                let failure = if connect {
                    GatewayError::Connect {
                        service: service.to_owned(),
                        instance: endpoint.instance_id.to_string(),
                        cause,
                    }
                } else {
                    GatewayError::Upstream {
                        service: service.to_owned(),
                        instance: endpoint.instance_id.to_string(),
                        cause,
                    }
                };
                // A connect error or a refused stream never reached the instance's
                // application; a reset may have, so only an idempotent request goes again.
                let refused = !connect && never_processed(error);
                // A connect error hands the request back unsent, a streamed body untouched:
                // it may go to another instance, which a body sent once never may.
                let unsent = failed.into_unsent();
                let resendable = replayable || unsent.is_some();
                if let Some(request) = unsent
                    && streamed
                {
                    outgoing.body = RequestBody::Stream(request.into_body());
                }
                let may_retry = resendable && (failure.retryable() || refused || idempotent);
                let reason = if connect {
                    "connect"
                } else if refused {
                    "refused"
                } else {
                    "reset"
                };
                if !(may_retry && may_try_again(pool, &tried)) {
                    return answer_held(held, &tried).ok_or(failure);
                }
                retrying = Some(reason);
                failure
            }
            Err(_) => {
                record(
                    cx,
                    pool,
                    endpoint,
                    admission,
                    Outcome::Failure,
                    started + elapsed,
                );
                pool.metrics.upstream(Attempt::Timeout, elapsed);
                let failure = GatewayError::Timeout {
                    service: service.to_owned(),
                    instance: endpoint.instance_id.to_string(),
                    timeout: policy.timeout,
                };
                return answer_held(held, &tried).ok_or(failure);
            }
        };
        tracing::debug!(error = %attempt_error, "retrying on another instance");
        last_error = Some(attempt_error);
    }
}

/// The 503 held for the client, with the attempts made in all.
fn answer_held(
    held: Option<(Response<Body>, Answered)>,
    tried: &[usize],
) -> Option<(Response<Body>, Answered)> {
    held.map(|(response, answered)| {
        (
            response,
            Answered {
                attempts: tried.len(),
                ..answered
            },
        )
    })
}

/// Whether another attempt may follow: fewer than `MAX_ATTEMPTS`, and an instance not tried.
fn may_try_again(pool: &Pool, tried: &[usize]) -> bool {
    tried.len() < MAX_ATTEMPTS && tried.len() < pool.endpoints.len()
}

/// A breaker's admission until the instance is judged by how the request went. Dropped
/// unjudged (the client went away, or its own body failed), it gives a half-open circuit's
/// probe slot back.
struct Admitted<'a> {
    live: &'a Live,
    admission: Admission,
    judged: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.judged {
            self.live.breaker().release(self.admission);
        }
    }
}

fn record(
    cx: Context<'_>,
    pool: &Pool,
    endpoint: &Endpoint,
    mut admission: Admitted<'_>,
    outcome: Outcome,
    now: Instant,
) {
    if outcome != Outcome::Success {
        endpoint.live.failures.fetch_add(1, Ordering::Relaxed);
    }
    admission.judged = true;
    let transition = endpoint
        .live
        .breaker()
        .record(admission.admission, outcome, now);
    if let Some(state) = transition {
        tracing::info!(
            service = &*pool.service,
            instance = &*endpoint.instance_id,
            state = state.as_str(),
            "circuit changed"
        );
        cx.metrics
            .circuit(&pool.service, &endpoint.instance_id, state);
    }
}

fn upstream_request(
    outgoing: &Outgoing,
    endpoint: &Endpoint,
    protocol: UpstreamProtocol,
    headers: HeaderMap,
    body: Body,
) -> Result<Request<Body>, GatewayError> {
    let path_and_query = outgoing.path_and_query.clone();
    let mut request = Request::new(body);
    *request.method_mut() = outgoing.method.clone();
    *request.headers_mut() = headers;
    match protocol {
        UpstreamProtocol::Http1 => {
            // The origin form (`GET /path`), and the client's `Host`, or else the
            // instance's address (without port 80, as URIs leave it out), as HTTP/1.1
            // requires one.
            *request.uri_mut() = Uri::from(path_and_query);
            join_cookies(request.headers_mut());
            // The gateway passes trailers on to a client that takes them, so it may say it
            // takes them on this hop too (TE is hop-by-hop: RFC 9110 §10.1.4).
            if outgoing.accepts_trailers && outgoing.upgrade.is_none() {
                let headers = request.headers_mut();
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
                headers.append(header::CONNECTION, HeaderValue::from_static("te"));
            }
            if !request.headers().contains_key(header::HOST) {
                let authority = &endpoint.authority;
                let host = match authority.port_u16() {
                    Some(80) => authority.host(),
                    _ => authority.as_str(),
                };
                if let Ok(host) = HeaderValue::from_str(host) {
                    request.headers_mut().insert(header::HOST, host);
                }
            }
        }
        UpstreamProtocol::H2c => {
            *request.uri_mut() = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(endpoint.authority.clone())
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| GatewayError::Internal(e.to_string()))?;
            *request.version_mut() = Version::HTTP_2;
            // HTTP/2 names the authority in `:authority`, which is the instance's address
            // here; a `Host` that differs is malformed (RFC 9113 §8.3.1), and nginx
            // answers it with a 400. The client's host travels in X-Forwarded-Host.
            request.headers_mut().remove(header::HOST);
            // The one TE value HTTP/2 allows (RFC 9113 §8.2.2); stripped above as
            // hop-by-hop.
            if outgoing.accepts_trailers {
                request
                    .headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            never_indexed(request.headers_mut(), &UNIQUE_PER_REQUEST);
        }
    }
    Ok(request)
}

/// HTTP/2 clients may send each cookie pair in a field of its own; HTTP/1.1 allows one
/// `Cookie` line, so they are joined with "; " (RFC 9113 §8.2.3). Many servers read only
/// one of several lines.
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let header::Entry::Occupied(mut cookies) = headers.entry(header::COOKIE) else {
        return;
    };
    let Some(first) = cookies.iter().next() else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in cookies.iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        cookies.insert(joined);
    }
}

/// Headers whose values differ on every request. In HPACK's dynamic table they would
/// never be matched, and each would push out entries that are (the `X-Forwarded-*`
/// values, a client's user agent), so that those had to be sent in full again.
const UNIQUE_PER_REQUEST: [HeaderName; 2] = [
    HeaderName::from_static(common::telemetry::REQUEST_ID_HEADER),
    HeaderName::from_static("traceparent"),
];

/// Marks the values of `names` sensitive, which HTTP/2 sends as never-indexed literals
/// (RFC 7541 §6.2.3): they take no place in the connection's compression table.
fn never_indexed(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        if let header::Entry::Occupied(mut entry) = headers.entry(name) {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), which describe one connection, not the message.
/// `Trailer` is not one (RFC 2616 listed it; RFC 9110 §6.6.2 does not): over HTTP/1.1
/// hyper sends only the trailer fields it names.
/// `Connection` first: [`strip_hop_by_hop`] reads its mark there.
/// At most 16: [`strip_hop_by_hop`] marks them in a `u16`.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Whether the client accepts trailers (`TE: trailers`, perhaps among other codings).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let name = coding.split(';').next().unwrap_or_default();
            name.trim().eq_ignore_ascii_case("trailers")
        })
}

/// Whether the request asks to switch protocols (a WebSocket, say).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, and those the `Connection` header names. With `upgrade`,
/// `Connection: upgrade` and `Upgrade` stay: they are the point of the request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the few names present marks the hop-by-hop ones (a bit each, in
    // HOP_BY_HOP's order, `Connection`'s the lowest), so that only those are looked up
    // again to go. Most requests carry none; most responses only `Connection: keep-alive`.
    let mut present: u16 = 0;
    let mut upgrade_present = false;
    for name in headers.keys() {
        if let Some(index) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << index;
        } else if *name == header::UPGRADE {
            upgrade_present = true;
        }
    }
    // What `Connection` names is mostly hop-by-hop itself (`keep-alive`, `upgrade`) or no
    // header at all (`close`): those need no list, and so no allocation. Nearly every
    // response says just `keep-alive`, which is not even split.
    let named: Vec<HeaderName> = if present & 1 != 0 && !names_no_header(headers) {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| {
                *name != header::UPGRADE && !HOP_BY_HOP.contains(name) && headers.contains_key(name)
            })
            .collect()
    } else {
        Vec::new()
    };
    for name in &named {
        headers.remove(name);
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
    let upgrade_value = if upgrade_present {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    if upgrade && let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

/// `target` as it goes upstream: its bytes are kept, not copied, and cloned for free.
pub fn path_and_query(target: String) -> Result<PathAndQuery, GatewayError> {
    PathAndQuery::from_maybe_shared(Bytes::from(target))
        .map_err(|e| GatewayError::BadRequest(format!("the path cannot be sent on: {e}")))
}

/// Whether each `Connection` value is just `keep-alive`, which names a header removed
/// anyway. (`close` is not taken so: a `Close` header it names must go too.)
fn names_no_header(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .all(|value| value.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
}

/// Prepares a client's headers for the instance: hop-by-hop headers out, forged identity
/// out, `X-Forwarded-*` in, and the verified subject when there is one.
pub fn upstream_headers(
    headers: &mut HeaderMap,
    peer: Option<IpAddr>,
    host: Option<HeaderValue>,
    subject: Option<&str>,
    upgrade: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(SUBJECT_HEADER);
    drop_underscore_spellings(headers);
    if let Some(peer) = peer {
        let earlier = headers
            .get(&X_FORWARDED_FOR)
            .filter(|v| v.to_str().is_ok())
            .map(HeaderValue::as_bytes);
        // Never the client's header alone: without the peer appended, its last entry
        // would be one the client chose.
        match forwarded_for(earlier, peer) {
            Some(value) => headers.insert(X_FORWARDED_FOR, value),
            None => headers.remove(X_FORWARDED_FOR),
        };
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    if let Some(subject) = subject.and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.insert(SUBJECT_HEADER, subject);
    }
}

/// `X-Forwarded-For`: the `earlier` list with `peer` appended. An IPv4 address is written
/// by hand: through `Display` it cost about 1,300 instructions, 3 % of a proxied request's
/// (callgrind).
fn forwarded_for(earlier: Option<&[u8]>, peer: IpAddr) -> Option<HeaderValue> {
    let mut address = [0u8; 15];
    let mut written = 0;
    let v6;
    let address: &[u8] = match peer {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    address[written] = b'.';
                    written += 1;
                }
                for (digit, at_least) in
                    [(octet / 100, 100), (octet / 10 % 10, 10), (octet % 10, 1)]
                {
                    if octet >= at_least || at_least == 1 {
                        address[written] = b'0' + digit;
                        written += 1;
                    }
                }
            }
            &address[..written]
        }
        IpAddr::V6(_) => {
            v6 = peer.to_string();
            v6.as_bytes()
        }
    };
    let mut value = Vec::with_capacity(earlier.map_or(0, |e| e.len() + 2) + address.len());
    if let Some(earlier) = earlier {
        value.extend_from_slice(earlier);
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(address);
    // Exactly as long as it holds: `Bytes` takes it whole, without a copy or a second
    // allocation.
    HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
}

/// Drops a header that spells, with underscores, one the gateway vouches for: CGI-style
/// servers (WSGI, PHP, Rack) read `X_Concierge_Subject` as `X-Concierge-Subject`. nginx
/// drops every name with an underscore (`underscores_in_headers off`); the others can mean
/// something to an application, and go on.
fn drop_underscore_spellings(headers: &mut HeaderMap) {
    const VOUCHED: [HeaderName; 4] = [
        SUBJECT_HEADER,
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
    ];
    if !headers.keys().any(|name| name.as_str().contains('_')) {
        return;
    }
    let spoofs: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.contains('_')
                && VOUCHED.iter().map(HeaderName::as_str).any(|vouched| {
                    vouched.len() == name.len()
                        && vouched
                            .bytes()
                            .zip(name.bytes())
                            .all(|(v, n)| v == n || (v == b'-' && n == b'_'))
                })
        })
        .cloned()
        .collect();
    for name in spoofs {
        headers.remove(name);
    }
}

/// The instance's response for the client: hop-by-hop headers out, body streamed (and
/// boxed once, by [`track`]).
fn downstream(mut response: Response<Incoming>, upgrade: bool) -> Response<Incoming> {
    strip_hop_by_hop(response.headers_mut(), upgrade);
    if response.version() == Version::HTTP_2 {
        // From an h2c instance; the client's connection decides what goes on the wire.
        *response.version_mut() = Version::HTTP_11;
    }
    response
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Copies bytes both ways between an upgraded client connection and the instance's.
async fn tunnel(client_side: OnUpgrade, upstream_side: OnUpgrade, guard: InFlight) {
    let (client_side, upstream_side) = tokio::join!(client_side, upstream_side);
    match (client_side, upstream_side) {
        (Ok(client_side), Ok(upstream_side)) => {
            let mut client_side = TokioIo::new(client_side);
            let mut upstream_side = TokioIo::new(upstream_side);
            if let Err(error) =
                tokio::io::copy_bidirectional(&mut client_side, &mut upstream_side).await
            {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
        }
        (client_side, upstream_side) => {
            tracing::debug!(
                client = client_side.is_ok(),
                upstream = upstream_side.is_ok(),
                "an upgrade did not complete"
            );
        }
    }
    drop(guard);
}

/// The response body, keeping its request counted in flight until the body ends; read
/// to its end, it gives its connection back for another request.
fn track(body: Incoming, guard: InFlight) -> Body {
    crate::ending::on_end(body, move |ended| {
        if ended.completed {
            guard.done();
        }
    })
}

/// Whether an h2c instance said it did not process the request (RFC 9113 §8.7): it
/// refused the stream, or shut down gracefully before reaching it. A GOAWAY with an error
/// code is left out: the h2 crate may report it on streams the instance had processed.
fn never_processed(error: &(dyn std::error::Error + 'static)) -> bool {
    cause::<h2::Error>(error).is_some_and(|h2| match h2.reason() {
        Some(h2::Reason::REFUSED_STREAM) => true,
        Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
        _ => false,
    })
}

/// The first error of type `T` in `error`'s chain of causes, `error` included.
fn cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// An error and its causes on one line, for the log.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(cause) = current {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        current = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2c_sends_the_values_unique_to_a_request_never_indexed() {
        let table = crate::table::Table::build(
            &std::collections::BTreeMap::new(),
            &[crate::table::StaticUpstream {
                service: "shop",
                authority: http::uri::Authority::from_static("127.0.0.1:9000"),
            }],
            &crate::table::Table::default(),
            &crate::table::PoolSettings::default(),
            &GatewayMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let endpoint = &table.pool("shop").unwrap().endpoints[0];
        let outgoing = Outgoing {
            method: Method::GET,
            path_and_query: PathAndQuery::from_static("/items?page=2"),
            headers: HeaderMap::new(),
            body: RequestBody::Empty,
            body_watch: None,
            upgrade: None,
            accepts_trailers: false,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("r-1"));
        headers.append("traceparent", HeaderValue::from_static("00-a-b-01"));
        headers.append("traceparent", HeaderValue::from_static("00-c-d-01"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        let sensitive = |protocol| {
            let request =
                upstream_request(&outgoing, endpoint, protocol, headers.clone(), empty()).unwrap();
            let mut marked: Vec<(String, bool)> = request
                .headers()
                .iter()
                .map(|(name, value)| (name.to_string(), value.is_sensitive()))
                .collect();
            marked.sort();
            marked
        };
        let expected = |unique: bool| {
            vec![
                ("traceparent".to_owned(), unique),
                ("traceparent".to_owned(), unique),
                ("x-forwarded-proto".to_owned(), false),
                ("x-request-id".to_owned(), unique),
            ]
        };
        assert_eq!(sensitive(UpstreamProtocol::H2c), expected(true));
        // HTTP/1.1 has no compression table; the values go as they came (with a Host).
        let mut http1 = expected(false);
        http1.insert(0, ("host".to_owned(), false));
        assert_eq!(sensitive(UpstreamProtocol::Http1), http1);
    }

    #[test]
    fn te_trailers_is_found_among_other_codings() {
        let with = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::TE, HeaderValue::from_static(value));
            }
            accepts_trailers(&headers)
        };
        assert!(with(&["trailers"]));
        assert!(with(&["gzip;q=0.5, Trailers"]));
        assert!(with(&["gzip", "trailers;q=1"]));
        assert!(!with(&["gzip, deflate"]));
        assert!(!with(&["trailersx"]));
        assert!(!with(&[]));
    }

    #[test]
    fn hop_by_hop_and_forged_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        // A second Connection line names another.
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Other-Hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("x-other-hop", HeaderValue::from_static("2"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(SUBJECT_HEADER, HeaderValue::from_static("admin"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        headers.insert("traceparent", HeaderValue::from_static("00-1-2-01"));
        upstream_headers(
            &mut headers,
            Some("127.0.0.9".parse().unwrap()),
            Some(HeaderValue::from_static("shop.example")),
            None,
            false,
        );
        for gone in [
            "connection",
            "x-secret-hop",
            "x-other-hop",
            "keep-alive",
            "te",
            "upgrade",
            "x-concierge-subject",
        ] {
            assert!(!headers.contains_key(gone), "{gone} survived");
        }
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "shop.example");
        assert_eq!(headers["x-request-id"], "abc");
        assert_eq!(headers["traceparent"], "00-1-2-01");
    }

    #[test]
    fn the_peer_is_appended_to_x_forwarded_for() {
        let earlier = Some(&b"203.0.113.7"[..]);
        for (earlier, peer, expected) in [
            (None, "0.0.0.0", "0.0.0.0"),
            (None, "255.255.255.255", "255.255.255.255"),
            (None, "10.200.3.40", "10.200.3.40"),
            (None, "100.9.90.1", "100.9.90.1"),
            (earlier, "127.0.0.1", "203.0.113.7, 127.0.0.1"),
            (None, "::1", "::1"),
            (earlier, "2001:db8::5", "203.0.113.7, 2001:db8::5"),
        ] {
            let value = forwarded_for(earlier, peer.parse().unwrap()).unwrap();
            assert_eq!(value, expected);
        }
    }

    #[test]
    fn a_connection_header_of_one_word_goes_and_takes_nothing_with_it() {
        for word in ["keep-alive", "Keep-Alive", "close", "CLOSE"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONNECTION, HeaderValue::from_static(word));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
            headers.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut headers, false);
            assert!(!headers.contains_key(header::CONNECTION), "{word}");
            assert_eq!(headers.len(), 2, "{word}: {headers:?}");
        }
        // Another word is a header's name, which goes too; `close` also names one.
        for (word, named) in [("x-hop", "x-hop"), ("close", "close"), ("Close", "close")] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONNECTION, HeaderValue::from_static(word));
            headers.insert(named, HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut headers, false);
            assert!(headers.is_empty(), "{word}: {headers:?}");
        }
    }

    #[test]
    fn an_upgrade_keeps_its_headers_and_the_verified_subject_is_set() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&headers));
        upstream_headers(&mut headers, None, None, Some("payments"), true);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[SUBJECT_HEADER], "payments");
    }
}
