//! The gateway: the one door through which traffic enters the fleet.
//!
//! It runs on hyper 1 on both sides (DESIGN.md, "Two HTTP stacks"). A request passes the
//! target checks ([`routing`]), finds its route in the current [`table::Table`], is
//! authenticated and rate-limited as its policy says, and is forwarded to an instance by
//! [`proxy::forward`]; [`sync`] keeps the table in step with the registry.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod access;
pub mod admin;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod config;
pub mod ending;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod routing;
pub mod sync;
pub mod table;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::api::services;
use common::auth::{Authenticator, Claims};
use common::config::{CommonConfig, ConfigError, Env};
use common::hyper_server::{self, Arrival, Body, Builtins, Routed};
use common::readiness::Readiness;
use events::{EventMetrics, Publisher};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub use config::Config;

use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;
use crate::proxy::{Outgoing, RequestBody, Upstreams};
use crate::ratelimit::{Decision, Limiter};
use crate::table::{StaticUpstream, Table};

pub const NAME: &str = services::GATEWAY;
pub const DEFAULT_PORT: u16 = 8080;

/// The scopes that may read the status page (besides an admin).
const STATUS_SCOPES: &[&str] = &["admin", "services:discover"];

/// What every request handler shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub table: ArcSwap<Table>,
    pub statics: Vec<StaticUpstream>,
    pub upstreams: Upstreams,
    pub limiter: Limiter,
    pub auth: Option<Authenticator>,
    pub metrics: GatewayMetrics,
    pub builtins: Builtins,
    /// Whether the instances have been loaded from the registry at least once.
    pub loaded: AtomicBool,
}

/// Serves on `listener` until `shutdown` resolves, then drains open requests.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = common::metrics::new_registry();
    let event_metrics = EventMetrics::new(&registry)?;
    let publisher = Publisher::new(
        config.common.redis_url.as_ref(),
        NAME,
        event_metrics.clone(),
    )?;
    let shared_limits = config
        .common
        .redis_url
        .as_ref()
        .map(events::SharedLimiter::new)
        .transpose()?;
    let statics = static_upstreams(&config);
    let source = match (&config.common.registry_url, &config.common.token) {
        (Some(url), Some(token)) => Some(sync::Source {
            registry_url: url.trim_end_matches('/').to_owned(),
            token: token.clone(),
            client: common::client::HttpClient::new(Duration::from_secs(10)),
        }),
        (Some(_), None) => {
            tracing::warn!("REGISTRY_URL without TOKEN_FILE: the gateway cannot read the registry");
            None
        }
        _ => None,
    };

    let shared_for_ready: Arc<std::sync::OnceLock<Arc<Shared>>> = Arc::default();
    let mut readiness = publisher.add_readiness_check(Readiness::new());
    if source.is_some() {
        let cell = shared_for_ready.clone();
        readiness = readiness.with_check("route_table", move || {
            let loaded = cell.get().is_some_and(|s| s.loaded.load(Ordering::Relaxed));
            async move {
                if loaded {
                    Ok(())
                } else {
                    Err("the instances have not been loaded from the registry yet".to_owned())
                }
            }
        });
    }
    let auth = config
        .vault_url
        .as_deref()
        .map(|url| Authenticator::new(url, config.common.token.clone()));
    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(Table::default()),
        statics,
        upstreams: Upstreams::new(config.upstream_idle_timeout),
        limiter: Limiter::new(shared_limits),
        auth,
        metrics: GatewayMetrics::new(&registry)?,
        builtins: Builtins::new(registry.clone(), readiness),
        loaded: AtomicBool::new(false),
        config,
    });
    let _ = shared_for_ready.set(shared.clone());
    sync::rebuild(&shared, &BTreeMap::new(), "start");
    let subscription = sync::subscribe(&shared, event_metrics)?;
    let follower = tokio::spawn(sync::follow(shared.clone(), source, subscription));

    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let options = shared.config.server.clone();
    let handler = {
        let shared = shared.clone();
        // Boxed once here, hyper and the server's wrapper move a pointer rather than the
        // request's whole future (kilobytes) as they take it in.
        move |req: Request<Incoming>, arrival: Arrival| {
            let shared = shared.clone();
            Box::pin(async move { handle(&shared, req, arrival).await })
        }
    };
    let served = hyper_server::serve(listener, &registry, handler, shutdown, &options).await;
    follower.abort();
    served?;
    Ok(())
}

/// The control-plane services the configuration names, for when the registry lists none.
fn static_upstreams(config: &Config) -> Vec<StaticUpstream> {
    [
        (services::CREDENTIAL_VAULT, config.vault_url.as_deref()),
        (
            services::SERVICE_REGISTRY,
            config.common.registry_url.as_deref(),
        ),
        (services::HEALTH_MONITOR, config.monitor_url.as_deref()),
    ]
    .into_iter()
    .filter_map(|(service, url)| {
        let uri: http::Uri = url?.parse().ok()?;
        Some(StaticUpstream {
            service,
            authority: uri.authority()?.clone(),
        })
    })
    .collect()
}

/// A served request, for the access log.
struct Served {
    response: Response<Body>,
    route: Arc<str>,
    instance: Option<Arc<str>>,
    attempts: usize,
}

async fn handle(shared: &Shared, req: Request<Incoming>, arrival: Arrival) -> Routed {
    let started = Instant::now();
    if let Some(routed) = shared
        .builtins
        .respond(req.method(), req.uri().path())
        .await
    {
        return routed;
    }
    let method = req.method().clone();
    let grpc = is_grpc(req.headers());
    // One copy of the path serves the routing and, cut short, the access log.
    let mut path = req.uri().path().to_owned();
    let peer = arrival.peer.ip();
    let served = match dispatch(shared, req, peer, &path).await {
        Ok(served) => served,
        Err((error, route)) => {
            match error.source() {
                error::Source::Client => tracing::debug!(%error, "refused"),
                error::Source::Upstream => tracing::warn!(%error, "upstream failure"),
                error::Source::Gateway => tracing::error!(%error, "gateway failure"),
            }
            Served {
                response: if grpc {
                    error.to_grpc_response()
                } else {
                    error.to_response()
                },
                route,
                instance: None,
                attempts: 0,
            }
        }
    };
    let Served {
        response,
        route,
        instance,
        attempts,
    } = served;
    let status = response.status().as_u16();
    let sample = shared.config.access_log_sample;
    // A body whose line the log's filter would drop is not wrapped to write it.
    let write = tracing::enabled!(target: "access", tracing::Level::INFO)
        && (status >= 400 || sample >= 1.0 || (sample > 0.0 && fastrand::f64() < sample));
    truncate(&mut path, 256);
    let entry = access::Entry {
        method,
        path,
        route: route.clone(),
        instance,
        attempts,
        status,
        request_id: arrival.request_id,
        started,
        write,
    };
    Routed::new(response.map(|body| access::wrap(body, entry)), route)
}

/// Whether the client speaks gRPC (or gRPC-Web), which reads failures from `grpc-status`.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

fn truncate(text: &mut String, max: usize) {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

type Failure = (GatewayError, Arc<str>);

fn unmatched(error: GatewayError) -> Failure {
    (error, Arc::from("unmatched"))
}

async fn dispatch(
    shared: &Shared,
    req: Request<Incoming>,
    peer: IpAddr,
    path: &str,
) -> Result<Served, Failure> {
    routing::check(path, req.uri().query()).map_err(|e| unmatched(GatewayError::BadTarget(e)))?;
    let normal = routing::normalize(path);
    let path = normal.as_ref();

    // The cold paths' futures are boxed, here and below: unboxed, their states (kilobytes:
    // a JWKS fetch, a Redis script, a second `forward`) would be part of every request's
    // future and copied whole each time it moves.
    if routing::is_under(path, "/api/gateway") {
        return Box::pin(gateway_endpoint(shared, req, peer, path)).await;
    }

    let table = shared.table.load_full();
    let route = table
        .resolve(path)
        .cloned()
        .ok_or_else(|| unmatched(GatewayError::NoRoute))?;
    let label = route.prefix.clone();
    let fail = |error: GatewayError| (error, label.clone());
    let (policy_prefix, policy) = shared.config.policy_for(&routing::without_parameters(path));
    let needs_token =
        (route.control_plane && !table::PUBLIC_PATHS.contains(&path)) || policy.require_token;
    let claims = if needs_token {
        Some(
            Box::pin(authenticate(shared, req.headers()))
                .await
                .map_err(fail)?,
        )
    } else {
        None
    };
    let limit = if policy.per_client.is_some() || policy.per_service.is_some() {
        Box::pin(rate_limit(
            shared,
            peer,
            claims.as_ref(),
            policy_prefix,
            policy,
            &route.service,
            &label,
        ))
        .await
        .map_err(fail)?
    } else {
        None
    };

    let upstream_path = if route.strip {
        routing::strip(path, &route.prefix)
    } else {
        path
    };
    let target = match req.uri().query() {
        Some(query) => format!("{upstream_path}?{query}"),
        None => upstream_path.to_owned(),
    };
    let path_and_query = proxy::path_and_query(target).map_err(fail)?;
    let outgoing = outgoing(shared, req, peer, path_and_query, claims.as_ref()).map_err(fail)?;
    let pool = table
        .pool(&route.service)
        .ok_or_else(|| fail(GatewayError::NoInstance(route.service.to_string())))?;
    let (mut response, answered) = proxy::forward(context(shared), pool, policy, outgoing)
        .await
        .map_err(fail)?;
    if let Some(decision) = limit {
        error::insert_rate_headers(response.headers_mut(), &decision);
    }
    Ok(Served {
        response,
        route: label,
        instance: Some(answered.instance),
        attempts: answered.attempts,
    })
}

fn context(shared: &Shared) -> proxy::Context<'_> {
    proxy::Context {
        upstreams: &shared.upstreams,
        metrics: &shared.metrics,
        panic_threshold: shared.config.panic_threshold,
        body_limit: shared.config.common.max_body_bytes,
    }
}

/// The request as it goes upstream: headers cleaned, body streamed within the limit.
fn outgoing(
    shared: &Shared,
    mut req: Request<Incoming>,
    peer: IpAddr,
    path_and_query: http::uri::PathAndQuery,
    claims: Option<&Claims>,
) -> Result<Outgoing, GatewayError> {
    let limit = shared.config.common.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(GatewayError::BodyTooLarge(limit));
    }
    let upgrade = proxy::wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let accepts_trailers = proxy::accepts_trailers(req.headers());
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if hosts.nth(1).is_some() {
        // RFC 9112 §3.2: a 400. Two hosts could route one way here and another upstream.
        return Err(GatewayError::BadRequest("more than one Host header".into()));
    }
    // The target's authority (HTTP/2's `:authority`, an absolute-form target) wins over
    // `Host` (RFC 9112 §3.2.2), and goes upstream as the `Host` whatever the client spoke.
    let host = match req.uri().authority() {
        Some(authority) => {
            // Host and port only: userinfo (`user:pass@`) never goes on (RFC 9112 §3.2.2).
            let host = match authority.port() {
                Some(port) => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
                None => HeaderValue::from_str(authority.host()),
            }
            .ok();
            if let Some(host) = &host {
                req.headers_mut().insert(header::HOST, host.clone());
            }
            host
        }
        None => req.headers().get(header::HOST).cloned(),
    };
    let (mut parts, body) = req.into_parts();
    proxy::upstream_headers(
        &mut parts.headers,
        Some(peer),
        host,
        claims.map(|c| c.sub.as_str()),
        upgrade.is_some(),
    );
    let (body, body_watch) = if http_body::Body::is_end_stream(&body) {
        (RequestBody::Empty, None)
    } else {
        let (body, watch) = proxy::client_body::Watched::new(body, limit);
        (RequestBody::Stream(body.boxed()), Some(watch))
    };
    Ok(Outgoing {
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        body,
        body_watch,
        upgrade,
        accepts_trailers,
    })
}

async fn authenticate(shared: &Shared, headers: &http::HeaderMap) -> Result<Claims, GatewayError> {
    let Some(auth) = &shared.auth else {
        return Err(GatewayError::AuthUnavailable);
    };
    auth.authenticate(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )
    .await
    .map_err(|error| match error {
        common::auth::AuthError::KeysUnavailable => GatewayError::AuthUnavailable,
        other => GatewayError::Unauthenticated(other),
    })
}

/// Applies the policy's limits; returns the tighter decision for the response headers.
async fn rate_limit(
    shared: &Shared,
    peer: IpAddr,
    claims: Option<&Claims>,
    policy_prefix: &str,
    policy: &config::RoutePolicy,
    service: &str,
    label: &str,
) -> Result<Option<Decision>, GatewayError> {
    // Keys are built only for the limits the route has: most routes have none.
    let mut scopes = Vec::with_capacity(2);
    let mut limits = Vec::with_capacity(2);
    for (scope, rate) in [
        ("client", policy.per_client),
        ("service", policy.per_service),
    ] {
        let Some(rate) = rate else { continue };
        let key = match (scope, claims) {
            ("client", Some(claims)) => {
                format!("concierge:rl:{policy_prefix}:client:sub:{}", claims.sub)
            }
            ("client", None) => format!("concierge:rl:{policy_prefix}:client:ip:{peer}"),
            _ => format!("concierge:rl:{policy_prefix}:service:{service}"),
        };
        scopes.push(scope);
        limits.push((key, rate));
    }
    if limits.is_empty() {
        return Ok(None);
    }
    // One decision for all of them: a request one refuses spends nothing of the others.
    let (decisions, backend) = shared.limiter.check(&limits).await;
    shared.metrics.rate_decision(backend.as_str());
    // Refused: the limit that allows the next request last says when to come back.
    if let Some((scope, decision)) = scopes
        .iter()
        .zip(&decisions)
        .filter(|(_, decision)| !decision.allowed)
        .max_by_key(|(_, decision)| decision.retry_after)
    {
        shared.metrics.rate_limited(label, scope);
        return Err(GatewayError::RateLimited {
            scope,
            decision: *decision,
        });
    }
    Ok(decisions.into_iter().reduce(|tightest, decision| {
        if decision.remaining < tightest.remaining {
            decision
        } else {
            tightest
        }
    }))
}

/// `/api/gateway/status` and `/api/gateway/proxy`.
async fn gateway_endpoint(
    shared: &Shared,
    req: Request<Incoming>,
    peer: IpAddr,
    path: &str,
) -> Result<Served, Failure> {
    let label: Arc<str> = Arc::from(path_label(path));
    let fail = |error: GatewayError| (error, label.clone());
    let response = match (req.method(), path) {
        (&Method::GET, "/api/gateway/status") => {
            let claims = authenticate(shared, req.headers()).await.map_err(fail)?;
            if !STATUS_SCOPES.iter().any(|s| claims.has_scope(s)) {
                return Err(fail(GatewayError::Forbidden(
                    "the status page needs the admin or services:discover scope",
                )));
            }
            admin::status(shared, &shared.table.load())
        }
        (&Method::POST, "/api/gateway/proxy") => {
            let claims = authenticate(shared, req.headers()).await.map_err(fail)?;
            let (service, public_path, mut outgoing) =
                admin::proxy_request(req.into_body(), shared.config.common.max_body_bytes)
                    .await
                    .map_err(fail)?;
            let table = shared.table.load_full();
            let pool = table
                .pool(service.as_str())
                .ok_or_else(|| fail(GatewayError::NoInstance(service.to_string())))?;
            let (policy_prefix, policy) = shared.config.policy_for(&public_path);
            let limit = rate_limit(
                shared,
                peer,
                Some(&claims),
                policy_prefix,
                policy,
                service.as_str(),
                &label,
            )
            .await
            .map_err(fail)?;
            proxy::upstream_headers(
                &mut outgoing.headers,
                Some(peer),
                None,
                Some(&claims.sub),
                false,
            );
            let (mut response, answered) = proxy::forward(context(shared), pool, policy, outgoing)
                .await
                .map_err(fail)?;
            if let Some(decision) = limit {
                error::insert_rate_headers(response.headers_mut(), &decision);
            }
            return Ok(Served {
                response,
                route: label,
                instance: Some(answered.instance),
                attempts: answered.attempts,
            });
        }
        (&Method::GET, "/api/gateway/openapi.json") => admin::openapi(),
        (_, "/api/gateway/status" | "/api/gateway/proxy" | "/api/gateway/openapi.json") => {
            admin::method_not_allowed()
        }
        _ => return Err(fail(GatewayError::NoRoute)),
    };
    Ok(Served {
        response,
        route: label,
        instance: None,
        attempts: 0,
    })
}

fn path_label(path: &str) -> &'static str {
    match path {
        "/api/gateway/status" => "/api/gateway/status",
        "/api/gateway/proxy" => "/api/gateway/proxy",
        "/api/gateway/openapi.json" => "/api/gateway/openapi.json",
        _ => "unmatched",
    }
}

/// The gateway as `main` runs it.
#[derive(Debug)]
pub struct Gateway;

impl common::service::Service for Gateway {
    type Config = Config;
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = DEFAULT_PORT;

    fn load(env: &Env) -> Result<Config, ConfigError> {
        Config::from_env(env)
    }

    fn common(config: &Config) -> &CommonConfig {
        &config.common
    }

    fn run(
        config: Config,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = anyhow::Result<()>> {
        run(config, listener, shutdown)
    }
}
