//! The actix-web server the vault, registry and monitor run, with what every service shares:
//! `/health`, `/ready`, `/metrics`, request ids, metrics per route template, problem+json
//! errors for bad input, a body size limit, and a graceful drain on shutdown.

use std::borrow::Cow;
use std::future::{Future, Ready, ready};
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PathError, PayloadError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{
    App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer, ResponseError, web,
};
use prometheus::Registry;
use tracing::Instrument;

use crate::metrics::{self, HttpMetrics, method_label};
use crate::problem::{self, Problem};
use crate::readiness::Readiness;
use crate::telemetry::{REQUEST_ID_HEADER, request_id};

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .content_type(problem::CONTENT_TYPE)
            .body(self.to_json())
    }
}

/// The id of the request being served, for handlers that record it (the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl FromRequest for RequestId {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let id = req.extensions().get::<RequestId>().cloned();
        ready(Ok(id.unwrap_or_else(|| RequestId(request_id(None)))))
    }
}

/// The route template a resource serves, kept in its app data so that metrics and logs
/// label a request without matching its path against every route a second time (actix
/// matches dynamic segments with a regex; on a hot path that cost shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTemplate(pub &'static str);

/// A resource labelled with its template, whose wrong methods answer a 405 problem
/// rather than actix's bare 405.
pub fn resource(path: &'static str) -> actix_web::Resource {
    web::resource(path)
        .app_data(RouteTemplate(path))
        .default_service(web::to(|| async {
            Err::<HttpResponse, _>(Problem::method_not_allowed())
        }))
}

/// The template of the route that served `req`: its label if the route has one (no
/// allocation), else actix's match (slower), else "unmatched".
fn route_of(req: &HttpRequest) -> Cow<'static, str> {
    match req.app_data::<RouteTemplate>() {
        Some(template) => Cow::Borrowed(template.0),
        None => req
            .match_pattern()
            .map_or(Cow::Borrowed("unmatched"), Cow::Owned),
    }
}

/// What a service hands to [`serve`] besides its own routes.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub registry: Registry,
    pub readiness: Readiness,
    pub max_body_bytes: usize,
    pub workers: usize,
    pub shutdown_timeout: Duration,
}

impl ServerSettings {
    pub fn new(
        common: &crate::config::CommonConfig,
        registry: Registry,
        readiness: Readiness,
    ) -> Self {
        Self {
            registry,
            readiness,
            max_body_bytes: common.max_body_bytes,
            workers: common.http_workers,
            shutdown_timeout: common.shutdown_timeout,
        }
    }
}

/// How long a client's connection may sit idle between requests (actix-web's default,
/// stated). Our own clients let theirs go sooner: see [`crate::client::POOL_IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
const _: () = assert!(
    crate::client::POOL_IDLE_TIMEOUT.as_millis() < KEEP_ALIVE.as_millis(),
    "a pooled connection must be dropped before the server closes it"
);

/// Serves `configure`'s routes plus the shared ones on `listener` until `shutdown`
/// resolves, then lets in-flight requests finish within `shutdown_timeout`.
pub async fn serve<C, S>(
    settings: ServerSettings,
    listener: std::net::TcpListener,
    configure: C,
    shutdown: S,
) -> std::io::Result<()>
where
    C: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let metrics = HttpMetrics::new(&settings.registry).map_err(std::io::Error::other)?;
    let shared = web::Data::new(Shared {
        registry: settings.registry,
        readiness: settings.readiness,
    });
    let limit = settings.max_body_bytes;
    let metrics = web::Data::new(metrics);
    let server = HttpServer::new(move || {
        let metrics = metrics.clone();
        App::new()
            .app_data(shared.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(limit)
                    .error_handler(move |e, _| json_error(e, limit).into()),
            )
            .app_data(web::PayloadConfig::new(limit))
            .app_data(web::PathConfig::default().error_handler(|e, _| path_error(e).into()))
            .app_data(web::QueryConfig::default().error_handler(|e, _| query_error(e).into()))
            .wrap(from_fn(move |req, next| {
                observe(metrics.clone(), req, next)
            }))
            .service(resource("/health").route(web::get().to(health)))
            .service(resource("/ready").route(web::get().to(readiness)))
            .service(resource("/metrics").route(web::get().to(metrics_text)))
            .configure(configure.clone())
            .default_service(web::to(not_found))
    })
    .workers(settings.workers)
    .keep_alive(KEEP_ALIVE)
    .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
    .shutdown_signal(shutdown)
    .listen(listener)?
    .run();
    server.await
}

struct Shared {
    registry: Registry,
    readiness: Readiness,
}

/// Request id, span, access log line and metrics around every request.
async fn observe(
    metrics: web::Data<HttpMetrics>,
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let id = request_id(
        req.headers()
            .get(REQUEST_ID_HEADER)
            .map(HeaderValue::as_bytes),
    );
    let method = method_label(req.method().as_str());
    // The route is known once the router has run; it joins the span then.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method,
        route = tracing::field::Empty
    );
    req.extensions_mut().insert(RequestId(id.clone()));
    let started = Instant::now();
    metrics.started();
    let result = next.call(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let (status, route) = match &result {
        Ok(res) => (res.status(), route_of(res.request())),
        // Only a middleware fails this way, and none runs inside this one.
        Err(error) => (
            error.as_response_error().status_code(),
            Cow::Borrowed("unmatched"),
        ),
    };
    span.record("route", route.as_ref());
    metrics.finished(&route, method, status.as_u16(), elapsed);
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "request served"
        );
    });
    let mut res = as_problem(result?);
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
    }
    Ok(res)
}

/// Errors that actix renders itself (a body over the limit read as bytes, a payload
/// error) come as plain text; every error a client sees is problem+json instead.
fn as_problem(res: ServiceResponse<impl MessageBody + 'static>) -> ServiceResponse<BoxBody> {
    let status = res.status();
    let is_json = res
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/problem+json") || v.starts_with("application/json")
        });
    if status.as_u16() < 400 || is_json {
        return res.map_into_boxed_body();
    }
    let problem = match status.as_u16() {
        413 => Problem::new("payload-too-large", 413, "Payload Too Large")
            .with_detail("the request body is larger than this service accepts"),
        404 => Problem::not_found("no such resource"),
        405 => Problem::method_not_allowed(),
        code => Problem::new(
            &format!("http-{code}"),
            code,
            status.canonical_reason().unwrap_or("Error").to_owned(),
        ),
    };
    let (req, _) = res.into_parts();
    ServiceResponse::new(req, problem.error_response()).map_into_boxed_body()
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn readiness(shared: web::Data<Shared>) -> Result<HttpResponse, Problem> {
    let body = shared.readiness.evaluate().await?;
    Ok(HttpResponse::Ok().json(body))
}

async fn metrics_text(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(metrics::render(&shared.registry))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, Problem> {
    Err(Problem::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Serde's messages are helpful ("missing field `name`") but some quote the offending
/// value ("invalid type: string \"…\""), and that value may be a secret: those are
/// replaced by their position alone.
fn describe_json_error(error: &serde_json::Error) -> String {
    let message = error.to_string();
    if message.contains('"') {
        format!(
            "the body does not match the expected shape (line {}, column {})",
            error.line(),
            error.column()
        )
    } else {
        message
    }
}

fn json_error(error: JsonPayloadError, limit: usize) -> Problem {
    match error {
        JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
            Problem::payload_too_large(limit)
        }
        JsonPayloadError::Payload(PayloadError::Overflow) => Problem::payload_too_large(limit),
        JsonPayloadError::ContentType => {
            Problem::new("unsupported-media-type", 415, "Unsupported Media Type")
                .with_detail("send the body as application/json")
        }
        JsonPayloadError::Deserialize(e) => deserialize_problem(&e),
        other => Problem::bad_request("bad-body", other.to_string()),
    }
}

fn deserialize_problem(error: &serde_json::Error) -> Problem {
    if error.is_data() {
        Problem::new("invalid-body", 422, "Unprocessable Content")
            .with_detail(describe_json_error(error))
    } else {
        Problem::bad_request("malformed-json", describe_json_error(error))
    }
}

/// Parses a JSON body the way the `Json` extractor would, for handlers that must know
/// (and record) who is calling before they look at what was sent.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| deserialize_problem(&e))
}

fn path_error(error: PathError) -> Problem {
    let PathError::Deserialize(e) = error else {
        return Problem::bad_request("invalid-path", "the path is malformed");
    };
    Problem::bad_request("invalid-path", format!("invalid path parameter: {e}"))
}

fn query_error(error: QueryPayloadError) -> Problem {
    let QueryPayloadError::Deserialize(e) = error else {
        return Problem::bad_request("invalid-query", "the query string is malformed");
    };
    Problem::bad_request("invalid-query", format!("invalid query parameter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_never_echo_quoted_values() {
        let error = serde_json::from_str::<u64>(r#""sup3r-secret""#).unwrap_err();
        let problem = json_error(JsonPayloadError::Deserialize(error), 10);
        assert_eq!(problem.status, 422);
        assert!(!problem.to_string().contains("sup3r-secret"), "{problem}");

        #[derive(Debug, serde::Deserialize)]
        #[expect(dead_code, reason = "only deserialized")]
        struct Named {
            name: String,
        }
        let error = serde_json::from_str::<Named>("{}").unwrap_err();
        let problem = json_error(JsonPayloadError::Deserialize(error), 10);
        assert!(
            problem.to_string().contains("missing field `name`"),
            "{problem}"
        );

        let error = serde_json::from_str::<Named>("{").unwrap_err();
        assert_eq!(
            json_error(JsonPayloadError::Deserialize(error), 10).code(),
            "malformed-json"
        );
    }
}
