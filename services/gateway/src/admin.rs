//! The gateway's own endpoints: `GET /api/gateway/status` (routes, instances, circuits,
//! requests in flight, recent error rates) and `POST /api/gateway/proxy`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use common::api::ServiceName;
use common::hyper_server::Body;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::error::GatewayError;
use crate::proxy::{Outgoing, RequestBody};
use crate::table::Table;

/// The status page as JSON.
pub fn status(shared: &Shared, table: &Table) -> Response<Body> {
    let now = Instant::now();
    let routes: Vec<Value> = table
        .routes()
        .into_iter()
        .map(|route| {
            json!({
                "prefix": &*route.prefix,
                "service": &*route.service,
                "strip_prefix": route.strip,
                "control_plane": route.control_plane,
            })
        })
        .collect();
    let services: Vec<Value> = table
        .pools()
        .map(|pool| {
            let instances: Vec<Value> = pool
                .endpoints
                .iter()
                .map(|e| {
                    let breaker = e.live.breaker();
                    let (recent, recent_failures) = breaker.recent(now);
                    json!({
                        "instance_id": &*e.instance_id,
                        "address": e.address,
                        "port": e.port,
                        "health": e.health,
                        "draining": e.draining,
                        "weight": e.weight,
                        "circuit": breaker.state(now).as_str(),
                        "in_flight": e.live.in_flight.load(Ordering::Relaxed),
                        "requests": e.live.requests.load(Ordering::Relaxed),
                        "failures": e.live.failures.load(Ordering::Relaxed),
                        "recent": {
                            "window_s": shared.config.breaker.window.as_secs_f64(),
                            "requests": recent,
                            "failures": recent_failures,
                            "error_rate": if recent == 0 { 0.0 } else { f64::from(recent_failures) / f64::from(recent) },
                        },
                    })
                })
                .collect();
            json!({
                "name": &*pool.service,
                "retry_budget": pool.budget.balance(),
                "instances": instances,
            })
        })
        .collect();
    let body = json!({
        "routes": routes,
        "services": services,
        "panic_threshold": shared.config.panic_threshold,
        "rate_limits": if shared.config.common.redis_url.is_some() { "redis" } else { "local" },
    });
    let mut response = Response::new(common::hyper_server::full(body.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `POST /api/gateway/proxy`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyRequest {
    service: ServiceName,
    method: String,
    path: String,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
    /// A string is sent as it is; any other JSON value is sent as JSON.
    #[serde(default)]
    body: Option<Value>,
}

/// Reads and checks a proxy request; returns the target service, the public path it is
/// seen under (for policies) and the request to send.
pub async fn proxy_request(
    body: Incoming,
    limit: usize,
) -> Result<(ServiceName, String, Outgoing), GatewayError> {
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge(limit)
            } else {
                GatewayError::BadRequest("the request body could not be read".into())
            }
        })?
        .to_bytes();
    let request: ProxyRequest = serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::BadRequest(format!("invalid proxy request: {e}")))?;
    let method = Method::from_bytes(request.method.as_bytes())
        .map_err(|_| GatewayError::BadRequest(format!("invalid method {:?}", request.method)))?;
    let (path, query) = match request.path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (request.path.as_str(), None),
    };
    crate::routing::check(path, query).map_err(GatewayError::BadTarget)?;
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| GatewayError::BadRequest(format!("invalid header name {name:?}")))?;
        let value = value
            .as_str()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .ok_or_else(|| {
                GatewayError::BadRequest(format!("header {name} needs a string value"))
            })?;
        headers.append(name, value);
    }
    // The gateway frames the body it sends: a length the caller states could disagree
    // with it, and fail every attempt against the instances' circuits.
    headers.remove(http::header::CONTENT_LENGTH);
    headers.remove(http::header::TRANSFER_ENCODING);
    let body = match request.body {
        None | Some(Value::Null) => RequestBody::Empty,
        Some(Value::String(text)) => RequestBody::Bytes(Bytes::from(text)),
        Some(json) => {
            headers
                .entry(CONTENT_TYPE)
                .or_insert(HeaderValue::from_static("application/json"));
            RequestBody::Bytes(Bytes::from(json.to_string()))
        }
    };
    let public_path = format!("/{}{}", request.service, path);
    let path_and_query = crate::proxy::path_and_query(request.path.clone())?;
    Ok((
        request.service,
        public_path,
        Outgoing {
            method,
            path_and_query,
            headers,
            body,
            body_watch: None,
            upgrade: None,
            accepts_trailers: false,
        },
    ))
}

/// The OpenAPI document of the gateway's own endpoints, kept beside the code and checked
/// by a test.
pub fn openapi() -> Response<Body> {
    let mut response = Response::new(common::hyper_server::full(include_str!("../openapi.json")));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub fn method_not_allowed() -> Response<Body> {
    common::problem::Problem::method_not_allowed().to_hyper()
}
