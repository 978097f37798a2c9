//! The monitor's HTTP API: the fleet, services, alerts. Callers need a token with the
//! `health:read` scope (or an admin token).

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use common::api::{HealthState, ServiceName};
use common::auth::{AuthError, Authenticator};
use common::problem::Problem;
use serde_json::{Value, json};

use crate::monitor::{Entry, Monitor};

pub const HEALTH_READ_SCOPE: &str = "health:read";

/// What the handlers share.
#[derive(Debug)]
pub struct Api {
    pub monitor: Arc<Monitor>,
    pub auth: Arc<Authenticator>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(AuthError),
    #[error("forbidden")]
    Forbidden,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid service name: {0}")]
    Invalid(String),
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::Unauthenticated(AuthError::KeysUnavailable) => Problem::unavailable(
                "the vault's signing keys cannot be fetched to check the token",
            ),
            Self::Unauthenticated(error) => {
                Problem::new("unauthenticated", 401, "Unauthorized").with_detail(error.to_string())
            }
            Self::Forbidden => Problem::new("forbidden", 403, "Forbidden")
                .with_detail(format!("needs the scope {HEALTH_READ_SCOPE}")),
            Self::NotFound(detail) => Problem::not_found(detail.clone()),
            Self::Invalid(detail) => Problem::bad_request("invalid-service-name", detail.clone()),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.problem().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.content_type(common::problem::CONTENT_TYPE);
        if matches!(self, Self::Unauthenticated(e) if *e != AuthError::KeysUnavailable) {
            response.insert_header(("WWW-Authenticate", r#"Bearer realm="concierge""#));
        }
        response.body(self.problem().to_json())
    }
}

pub fn routes(config: &mut web::ServiceConfig) {
    use common::http::resource;
    config
        .service(resource("/api/health/system").route(web::get().to(system)))
        .service(resource("/api/health/services").route(web::get().to(services)))
        .service(resource("/api/health/services/{name}").route(web::get().to(service)))
        .service(resource("/api/health/alerts").route(web::get().to(alerts)))
        .service(resource("/api/openapi.json").route(web::get().to(openapi)));
}

type Data = web::Data<Api>;

/// The OpenAPI document, kept beside the code it describes and checked by a test.
const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

async fn allowed(api: &Api, req: &HttpRequest) -> Result<(), ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let claims = api
        .auth
        .authenticate(header)
        .await
        .map_err(ApiError::Unauthenticated)?;
    if claims.has_scope("admin") || claims.has_scope(HEALTH_READ_SCOPE) {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

fn instance_view(api: &Api, entry: &Entry) -> Value {
    let tracker = &entry.tracker;
    let recoveries: Vec<Value> = api
        .monitor
        .recoveries
        .lock()
        .map(|rows| {
            rows.iter()
                .filter(|r| r.instance_id == entry.instance.instance_id)
                .map(|r| json!({"attempt": r.attempt, "action": r.action, "at": r.at.and_utc(), "outcome": r.outcome, "detail": r.detail}))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "instance_id": entry.instance.instance_id,
        "address": entry.instance.address,
        "port": entry.instance.port,
        "state": tracker.state,
        "since": tracker.since,
        "last_check_at": tracker.last_check_at,
        "latency_ms": tracker.latency_ms,
        "consecutive_failures": tracker.consecutive_failures,
        "last_error": tracker.last_error.as_ref().map(|(reason, detail)| json!({"reason": reason, "detail": detail})),
        "recovery_attempts": recoveries,
    })
}

/// A service's state: healthy if any instance is, else degraded if any is, else offline.
fn service_state(entries: &[&Entry]) -> HealthState {
    if entries
        .iter()
        .any(|e| e.tracker.state == HealthState::Healthy)
    {
        HealthState::Healthy
    } else if entries
        .iter()
        .any(|e| e.tracker.state == HealthState::Degraded)
    {
        HealthState::Degraded
    } else {
        HealthState::Offline
    }
}

fn by_service(fleet: &[Entry]) -> std::collections::BTreeMap<String, Vec<&Entry>> {
    let mut map: std::collections::BTreeMap<String, Vec<&Entry>> = Default::default();
    for entry in fleet {
        map.entry(entry.instance.service.to_string())
            .or_default()
            .push(entry);
    }
    for members in map.values_mut() {
        members.sort_by(|a, b| a.instance.instance_id.cmp(&b.instance.instance_id));
    }
    map
}

fn service_view(api: &Api, name: &str, members: &[&Entry]) -> Value {
    json!({
        "name": name,
        "state": service_state(members),
        "instances": members.iter().map(|e| instance_view(api, e)).collect::<Vec<_>>(),
    })
}

async fn system(api: Data, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    allowed(&api, &req).await?;
    let fleet = api.monitor.snapshot();
    let count = |state: HealthState| fleet.iter().filter(|e| e.tracker.state == state).count();
    let services = by_service(&fleet);
    let without_healthy: Vec<&String> = services
        .iter()
        .filter(|(_, members)| service_state(members) != HealthState::Healthy)
        .map(|(name, _)| name)
        .collect();
    let database = api.monitor.db.ping().await.map_err(|e| e.to_string());
    Ok(HttpResponse::Ok().json(json!({
        "instances": fleet.len(),
        "services": services.len(),
        "counts": {
            "healthy": count(HealthState::Healthy),
            "degraded": count(HealthState::Degraded),
            "offline": count(HealthState::Offline),
        },
        "services_without_healthy_instance": without_healthy,
        "monitor": {
            "registry_loaded": api.monitor.loaded.load(std::sync::atomic::Ordering::Relaxed),
            "database": if database.is_ok() { "ok" } else { "unavailable" },
            "check_interval_s": api.monitor.config.interval.as_secs_f64(),
            "webhooks": api.monitor.config.webhooks.len(),
        },
    })))
}

async fn services(api: Data, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    allowed(&api, &req).await?;
    let fleet = api.monitor.snapshot();
    let views: Vec<Value> = by_service(&fleet)
        .iter()
        .map(|(name, members)| service_view(&api, name, members))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "services": views })))
}

async fn service(
    api: Data,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    allowed(&api, &req).await?;
    let name = ServiceName::parse(&path).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let fleet = api.monitor.snapshot();
    let services = by_service(&fleet);
    let members = services
        .get(name.as_str())
        .ok_or_else(|| ApiError::NotFound(format!("no instance of {name} is monitored")))?;
    Ok(HttpResponse::Ok().json(service_view(&api, name.as_str(), members)))
}

async fn alerts(api: Data, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    allowed(&api, &req).await?;
    let book: Vec<crate::alerts::Alert> = api
        .monitor
        .alerts
        .lock()
        .map(|b| b.values().cloned().collect())
        .unwrap_or_default();
    let (active, resolved): (Vec<_>, Vec<_>) = book.into_iter().partition(|a| a.firing);
    Ok(HttpResponse::Ok().json(json!({ "active": active, "resolved": resolved })))
}
