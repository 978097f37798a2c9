//! The registry's HTTP API (DESIGN.md, "Service registry"): registration with
//! credentials, heartbeats, health, reading, discovery, with Consul-style blocking reads.

use std::net::IpAddr;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::Utc;
use common::api::{Event, HealthState, Instance, ServiceName};
use common::auth::Claims;
use common::config::HumanDuration;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::state::State;
use crate::store;

type StateData = web::Data<State>;

/// The header every read carries; a client passes it back as `?index=` to block.
pub const INDEX_HEADER: &str = "X-Concierge-Index";
/// The longest a blocking read waits.
const MAX_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_WAIT: Duration = Duration::from_secs(60);

pub const REGISTER_SCOPE: &str = "services:register";
pub const DISCOVER_SCOPE: &str = "services:discover";
pub const HEALTH_WRITE_SCOPE: &str = "services:health:write";
pub const HEALTH_READ_SCOPE: &str = "health:read";
const ADMIN_SCOPE: &str = "admin";

pub fn routes(config: &mut web::ServiceConfig) {
    use common::http::resource;
    config
        .service(resource("/api/services/register").route(web::post().to(register)))
        .service(resource("/api/services").route(web::get().to(list_services)))
        .service(resource("/api/services/graph").route(web::get().to(graph)))
        .service(
            resource("/api/services/{name}")
                .route(web::get().to(service_instances))
                .route(web::delete().to(delete_service)),
        )
        .service(resource("/api/services/{name}/health").route(web::get().to(service_health)))
        .service(
            resource("/api/services/{name}/instances/{id}").route(web::delete().to(deregister)),
        )
        .service(
            resource("/api/services/{name}/instances/{id}/heartbeat")
                .route(web::put().to(heartbeat)),
        )
        .service(
            resource("/api/services/{name}/instances/{id}/health").route(web::put().to(set_health)),
        )
        .service(
            resource("/api/services/{name}/instances/{id}/history").route(web::get().to(history)),
        )
        .service(resource("/api/services/{name}/instances/{id}/drain").route(web::put().to(drain)))
        .service(resource("/api/discover").route(web::get().to(discover)))
        .service(resource("/api/instances").route(web::get().to(all_instances)))
        .service(resource("/api/openapi.json").route(web::get().to(openapi)));
}

/// The OpenAPI document, kept beside the code it describes and checked by a test.
const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

async fn caller(state: &State, req: &HttpRequest) -> Result<Claims, ApiError> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    state
        .auth
        .authenticate(header)
        .await
        .map_err(ApiError::Unauthenticated)
}

fn require_any(claims: &Claims, scopes: &[&str]) -> Result<(), ApiError> {
    if claims.has_scope(ADMIN_SCOPE) || scopes.iter().any(|s| claims.has_scope(s)) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "needs one of the scopes {}",
            scopes.join(", ")
        )))
    }
}

/// An admin, or a token of `service` itself with the register scope.
fn require_owner(claims: &Claims, service: &str) -> Result<(), ApiError> {
    if claims.has_scope(ADMIN_SCOPE) || (claims.has_scope(REGISTER_SCOPE) && claims.sub == service)
    {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only {service}'s own token (or an admin) may change its instances"
        )))
    }
}

/// Instance `id` of `service`, or the 404 that tells its owner to register again.
fn registered(state: &State, service: &ServiceName, id: &str) -> Result<Instance, ApiError> {
    state
        .catalog
        .get(id)
        .filter(|i| i.service == *service)
        .ok_or_else(|| ApiError::NotFound(format!("instance {id} of {service} is not registered")))
}

fn service_name(raw: &str) -> Result<ServiceName, ApiError> {
    ServiceName::parse(raw).map_err(|e| ApiError::invalid("invalid-service-name", e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    common::http::parse_json(body).map_err(ApiError::Body)
}

fn is_hostname(name: &str) -> bool {
    // A last label of digits (or hex) is an address in disguise (`2852039166`,
    // `0xa9.0xfe.0xa9.0xfe`), which resolvers read as one (RFC 1123 §2.1).
    let last = name.rsplit('.').next().unwrap_or_default();
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"));
    (1..=253).contains(&name.len())
        && !numeric
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_instance_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        // `.` and `..` are path segments no client keeps as they are.
        && !id.bytes().all(|b| b == b'.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// Routes one registration may declare.
const MAX_ROUTES: usize = 32;
/// The longest tag or credential name.
const MAX_NAME_BYTES: usize = 255;
/// A registration's metadata, as JSON.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// A path prefix written as the gateway matches request paths (`common::path`): it passes
/// the gateway's checks and is already normalised (escapes only where needed, upper-case
/// hex), with no parameters, query, fragment or anything but visible ASCII.
fn is_route(route: &str) -> bool {
    route.len() <= 512
        && route
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b'?' | b'#'))
        && common::path::check(route, None).is_ok()
        && common::path::normalize(route) == route
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    name: ServiceName,
    #[serde(default)]
    version: String,
    address: String,
    port: u32,
    health_endpoint: String,
    #[serde(default)]
    credentials_needed: Vec<String>,
    #[serde(default)]
    dependencies: Vec<ServiceName>,
    instance_id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight: Option<u32>,
    #[serde(default)]
    routes: Vec<String>,
}

impl Register {
    fn validate(&self) -> Result<(), ApiError> {
        if !(1..=65535).contains(&self.port) {
            return Err(ApiError::invalid(
                "invalid-port",
                "port must be between 1 and 65535",
            ));
        }
        match self.address.parse::<IpAddr>() {
            Ok(ip) => {
                if let Some(why) = common::address::refused(ip) {
                    return Err(ApiError::invalid(
                        "invalid-address",
                        format!("address {ip} is {why}, never an instance's"),
                    ));
                }
            }
            Err(_) if is_hostname(&self.address) => {}
            Err(_) => {
                return Err(ApiError::invalid(
                    "invalid-address",
                    "address must be an IP address or a host name",
                ));
            }
        }
        if !self.health_endpoint.starts_with('/')
            || self.health_endpoint.len() > 1024
            || !self.health_endpoint.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ApiError::invalid(
                "invalid-health-endpoint",
                "health_endpoint must be a path starting with /",
            ));
        }
        if let Some(id) = &self.instance_id
            && !valid_instance_id(id)
        {
            return Err(ApiError::invalid(
                "invalid-instance-id",
                "instance_id is 1 to 128 characters of A-Z a-z 0-9 . _ - :",
            ));
        }
        if self.routes.len() > MAX_ROUTES || !self.routes.iter().all(|r| is_route(r)) {
            return Err(ApiError::invalid(
                "invalid-route",
                "routes are at most 32 path prefixes starting with /, of at most 512 \
                 characters, without '.' or '..' segments, ';', '?', '#' or spaces, escaping \
                 with upper-case hex only what must be escaped",
            ));
        }
        if self.weight == Some(0) || self.weight.is_some_and(|w| w > 1000) {
            return Err(ApiError::invalid(
                "invalid-weight",
                "weight is between 1 and 1000",
            ));
        }
        if self.version.len() > 128
            || self.tags.len() > 64
            || self.tags.iter().any(|t| t.len() > MAX_NAME_BYTES)
            || self.credentials_needed.len() > 256
            || self
                .credentials_needed
                .iter()
                .any(|c| c.len() > MAX_NAME_BYTES)
            || self.dependencies.len() > 64
        {
            return Err(ApiError::invalid(
                "invalid-registration",
                "version (128), tags (64 of 255 bytes), credentials_needed (256 of 255 bytes) \
                 or dependencies (64) too long",
            ));
        }
        // Every registry, gateway and monitor keeps the whole catalog: no registration may
        // make it large.
        let metadata_bytes = serde_json::to_vec(&self.metadata).map_or(usize::MAX, |v| v.len());
        if self.metadata.len() > 64
            || self.metadata.keys().any(|k| k.len() > 128)
            || metadata_bytes > MAX_METADATA_BYTES
        {
            return Err(ApiError::invalid(
                "invalid-metadata",
                "metadata is at most 64 keys of at most 128 bytes, 16 KiB in all",
            ));
        }
        Ok(())
    }
}

async fn register(
    state: StateData,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    let body: Register = parse(&body)?;
    body.validate()?;
    require_owner(&claims, body.name.as_str())?;
    let id = body
        .instance_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let existing = state.catalog.get(&id);
    if existing.as_ref().is_some_and(|e| e.service != body.name) {
        return Err(ApiError::Conflict(format!(
            "instance {id} belongs to another service"
        )));
    }
    let now = Utc::now();
    let instance = Instance {
        instance_id: id.clone(),
        service: body.name.clone(),
        version: body.version,
        address: body.address,
        port: u16::try_from(body.port).unwrap_or(0),
        health_endpoint: body.health_endpoint,
        health: HealthState::Healthy,
        load: None,
        weight: body.weight.unwrap_or(1),
        tags: body.tags,
        metadata: body.metadata,
        routes: body.routes,
        dependencies: body.dependencies,
        registered_at: existing.as_ref().map_or(now, |e| e.registered_at),
        last_heartbeat_at: now,
        health_since: now,
        // An operator's drain and a flap hold survive a re-registration.
        draining: existing.as_ref().is_some_and(|e| e.draining),
        flapping: existing.as_ref().is_some_and(|e| e.flapping),
    };
    let row = store::InstanceRow::from_instance(&instance);
    let previous = existing.as_ref().map(|e| e.health);
    // The row and its history together: an instance never appears without the
    // history that heartbeat revival and the monitor's verdicts are judged by.
    let claimed = state
        .db
        .transaction(move |conn| {
            if !store::upsert(conn, &row)? {
                return Ok(false);
            }
            store::record_transition(
                conn,
                &store::NewTransition {
                    instance_id: &row.instance_id,
                    service: &row.service,
                    at: row.registered_at.max(row.last_heartbeat_at),
                    from_state: previous.map(HealthState::as_str),
                    to_state: HealthState::Healthy.as_str(),
                    reason: "registered",
                },
            )?;
            Ok(true)
        })
        .await
        .map_err(ApiError::from_db)?;
    if !claimed {
        return Err(ApiError::Conflict(format!(
            "instance {id} belongs to another service"
        )));
    }
    state.metrics.registrations.inc();
    let event = if state.catalog.upsert(instance.clone()).is_some() {
        Event::InstanceUpdated { instance }
    } else {
        Event::InstanceRegistered { instance }
    };
    state.publish(event).await;

    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (credentials, missing) = state
        .fetch_credentials(body.name.as_str(), &body.credentials_needed, &authorization)
        .await;
    let ttl = state.ttl();
    Ok(HttpResponse::Created()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((INDEX_HEADER, state.catalog.index().to_string()))
        .json(json!({
            "instance_id": id,
            "heartbeat_interval_s": state.heartbeat_interval.as_secs_f64(),
            "ttl_s": ttl.as_secs_f64(),
            "credentials": credentials,
            "missing_credentials": missing,
        })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Heartbeat {
    load: Option<f64>,
}

async fn heartbeat(
    state: StateData,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    let (name, id) = path.into_inner();
    let service = service_name(&name)?;
    require_owner(&claims, service.as_str())?;
    let beat: Heartbeat = if body.iter().all(u8::is_ascii_whitespace) {
        Heartbeat::default()
    } else {
        parse(&body)?
    };
    if beat
        .load
        .is_some_and(|load| !(0.0..=1.0).contains(&load) || load.is_nan())
    {
        return Err(ApiError::invalid(
            "invalid-load",
            "load is a number from 0 to 1",
        ));
    }
    // A 404 tells a client that the registry forgot it: register again.
    let instance = registered(&state, &service, &id)?;
    let now = Utc::now();
    let (at, load, target) = (now.naive_utc(), beat.load, id.clone());
    let offline = instance.health == HealthState::Offline;
    let expired_here = offline && state.take_expired(&id);
    let owner = service.as_str().to_owned();
    let (updated, revive) = state
        .db
        .transaction(move |conn| {
            let updated = store::heartbeat(conn, &target, at, load)?;
            // The sweep took it offline (here, before a restart, or on another replica),
            // and no verdict of the monitor's came since: the history says so.
            let revive = updated > 0
                && offline
                && (expired_here
                    || store::last_moved_for(conn, &target, crate::state::EXPIRY_REASON)?);
            if revive {
                store::set_health(conn, &target, HealthState::Healthy, at)?;
                store::record_transition(
                    conn,
                    &store::NewTransition {
                        instance_id: &target,
                        service: &owner,
                        at,
                        from_state: Some(HealthState::Offline.as_str()),
                        to_state: HealthState::Healthy.as_str(),
                        reason: "heartbeat resumed",
                    },
                )?;
            }
            Ok((updated, revive))
        })
        .await
        .map_err(ApiError::from_db)?;
    if updated == 0 {
        state.catalog.remove(&id);
        return Err(ApiError::NotFound(format!(
            "instance {id} of {service} is not registered"
        )));
    }
    state.metrics.heartbeats.inc();
    let changed = state.catalog.update(&id, |current| {
        current.last_heartbeat_at = now;
        if beat.load.is_some() {
            current.load = beat.load;
        }
        if revive {
            current.health = HealthState::Healthy;
            current.health_since = now;
        }
    });
    let Some(instance) = changed else {
        // Deregistered while the heartbeat was being written.
        return Err(ApiError::NotFound(format!(
            "instance {id} of {service} is not registered"
        )));
    };
    if revive {
        state
            .publish(Event::HealthChanged {
                service: instance.service.clone(),
                instance_id: id.clone(),
                from: HealthState::Offline,
                to: HealthState::Healthy,
                reason: "heartbeat resumed".into(),
                latency_ms: None,
            })
            .await;
    }
    Ok(HttpResponse::Ok().json(json!({
        "instance_id": id,
        "health": instance.health,
        "ttl_s": state.ttl().as_secs_f64(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetHealth {
    state: HealthState,
    #[serde(default)]
    reason: String,
    /// The latency of the check behind the change, passed on in the event.
    #[serde(default)]
    latency_ms: Option<f64>,
}

async fn set_health(
    state: StateData,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    if !(claims.has_scope(ADMIN_SCOPE) || claims.has_scope(HEALTH_WRITE_SCOPE)) {
        return Err(ApiError::Forbidden(format!(
            "needs the scope {HEALTH_WRITE_SCOPE}"
        )));
    }
    let (name, id) = path.into_inner();
    let service = service_name(&name)?;
    let body: SetHealth = parse(&body)?;
    let instance = registered(&state, &service, &id)?;
    let reason = body.reason.chars().take(512).collect::<String>();
    state.take_expired(&id);
    let latency_ms = body.latency_ms.filter(|l| l.is_finite() && *l >= 0.0);
    if instance.health == body.state {
        // Already so, for missing heartbeats perhaps: the history must now say the
        // monitor's verdict holds it there, or a heartbeat would bring it back.
        let (target, owner, to) = (id.clone(), service.as_str().to_owned(), body.state);
        let at = Utc::now().naive_utc();
        state
            .db
            .run(move |conn| {
                if store::last_moved_for(conn, &target, crate::state::EXPIRY_REASON)? {
                    store::record_transition(
                        conn,
                        &store::NewTransition {
                            instance_id: &target,
                            service: &owner,
                            at,
                            from_state: Some(to.as_str()),
                            to_state: to.as_str(),
                            reason: &reason,
                        },
                    )?;
                }
                Ok(())
            })
            .await
            .map_err(ApiError::from_db)?;
        return Ok(HttpResponse::NoContent().finish());
    }
    state
        .change_health(instance, body.state, reason, latency_ms)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn deregister(
    state: StateData,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    let (name, id) = path.into_inner();
    let service = service_name(&name)?;
    require_owner(&claims, service.as_str())?;
    registered(&state, &service, &id)?;
    state.remove(&service, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn delete_service(
    state: StateData,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    if !claims.has_scope(ADMIN_SCOPE) {
        return Err(ApiError::Forbidden(
            "only an admin may remove a whole service".into(),
        ));
    }
    let service = service_name(&path)?;
    let target = service.as_str().to_owned();
    let removed = state
        .db
        .run(move |conn| store::delete_service(conn, &target))
        .await
        .map_err(ApiError::from_db)?;
    let mut ids: std::collections::BTreeSet<String> = removed.into_iter().collect();
    ids.extend(
        state
            .catalog
            .instances_of(service.as_str())
            .into_iter()
            .map(|i| i.instance_id),
    );
    if ids.is_empty() {
        return Err(ApiError::NotFound(format!(
            "service {service} has no instances"
        )));
    }
    for id in ids {
        state.catalog.remove(&id);
        state
            .publish(Event::InstanceDeregistered {
                service: service.clone(),
                instance_id: id,
            })
            .await;
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `?index=N&wait=30s`: Consul's blocking query.
#[derive(Debug, Deserialize)]
struct Blocking {
    index: Option<u64>,
    wait: Option<String>,
}

impl Blocking {
    /// Holds the request until the index moves past `index` or `wait` ends.
    async fn until_changed(&self, state: &State) -> Result<u64, ApiError> {
        if let Some(seen) = self.index {
            let wait = match &self.wait {
                Some(text) => text
                    .parse::<HumanDuration>()
                    .map_err(|e| ApiError::invalid("invalid-wait", e))?
                    .0
                    .min(MAX_WAIT),
                None => DEFAULT_WAIT,
            };
            let mut watch = state.catalog.watch();
            state.metrics.blocking_reads.inc();
            let _ = tokio::time::timeout(wait, watch.wait_for(|index| *index > seen)).await;
            state.metrics.blocking_reads.dec();
        }
        Ok(state.catalog.index())
    }
}

fn indexed(index: u64) -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Ok();
    response.insert_header((INDEX_HEADER, index.to_string()));
    response
}

async fn list_services(
    state: StateData,
    req: HttpRequest,
    query: web::Query<Blocking>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE, HEALTH_READ_SCOPE])?;
    let index = query.until_changed(&state).await?;
    let services: Vec<_> = state
        .catalog
        .services()
        .into_iter()
        .map(|(name, counts)| json!({ "name": name, "instances": counts }))
        .collect();
    Ok(indexed(index).json(json!({ "services": services })))
}

async fn service_instances(
    state: StateData,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<Blocking>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE, HEALTH_READ_SCOPE])?;
    let service = service_name(&path)?;
    let index = query.until_changed(&state).await?;
    let instances = state.catalog.instances_of(service.as_str());
    if instances.is_empty() {
        return Err(ApiError::NotFound(format!(
            "service {service} is not registered"
        )));
    }
    let dependents: Vec<String> = state
        .catalog
        .all()
        .into_iter()
        .filter(|i| i.dependencies.contains(&service))
        .map(|i| i.service.as_str().to_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Ok(indexed(index).json(json!({
        "name": service,
        "counts": crate::catalog::Catalog::counts(&instances),
        "dependents": dependents,
        "instances": instances,
    })))
}

/// Every instance in every state: the full catalog, for consumers that keep a copy of it
/// (the gateway's route table, the monitor's checks) and reconcile with blocking reads.
async fn all_instances(
    state: StateData,
    req: HttpRequest,
    query: web::Query<Blocking>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE, HEALTH_READ_SCOPE])?;
    let index = query.until_changed(&state).await?;
    let mut instances = state.catalog.all();
    instances.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
    Ok(indexed(index).json(json!({ "index": index, "instances": instances })))
}

async fn service_health(
    state: StateData,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE, HEALTH_READ_SCOPE])?;
    let service = service_name(&path)?;
    let instances = state.catalog.instances_of(service.as_str());
    if instances.is_empty() {
        return Err(ApiError::NotFound(format!(
            "service {service} is not registered"
        )));
    }
    let counts = crate::catalog::Catalog::counts(&instances);
    let health = if counts.healthy > 0 {
        HealthState::Healthy
    } else if counts.degraded > 0 {
        HealthState::Degraded
    } else {
        HealthState::Offline
    };
    Ok(indexed(state.catalog.index())
        .json(json!({ "name": service, "health": health, "counts": counts })))
}

#[derive(Debug, Deserialize)]
struct DiscoverQuery {
    service: Option<String>,
    tag: Option<String>,
    index: Option<u64>,
    wait: Option<String>,
}

async fn discover(
    state: StateData,
    req: HttpRequest,
    query: web::Query<DiscoverQuery>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE])?;
    let query = query.into_inner();
    let raw = query
        .service
        .ok_or_else(|| ApiError::invalid("missing-service", "name the service: ?service=NAME"))?;
    let service = service_name(&raw)?;
    let index = Blocking {
        index: query.index,
        wait: query.wait,
    }
    .until_changed(&state)
    .await?;
    let body =
        state
            .catalog
            .discover_body(service.as_str(), query.tag.as_deref(), |chosen, healthy| {
                let answer = json!({
                    "name": service,
                    "instance_id": chosen.instance_id,
                    "address": chosen.address,
                    "port": chosen.port,
                    "health": chosen.health,
                    "load": chosen.load,
                    "instances": healthy,
                });
                bytes::Bytes::from(answer.to_string())
            });
    let Some(body) = body else {
        if state.catalog.instances_of(service.as_str()).is_empty() {
            return Err(ApiError::NotFound(format!(
                "service {service} is not registered"
            )));
        }
        return Err(ApiError::NoHealthy(service.as_str().to_owned()));
    };
    Ok(indexed(index).content_type("application/json").body(body))
}

async fn history(
    state: StateData,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE, HEALTH_READ_SCOPE])?;
    let (name, id) = path.into_inner();
    let service = service_name(&name)?;
    let target = id.clone();
    let transitions = state
        .db
        .run(move |conn| store::history(conn, &target, 1000))
        .await
        .map_err(ApiError::from_db)?;
    let transitions: Vec<_> = transitions
        .into_iter()
        .filter(|t| t.service == service.as_str())
        .collect();
    if transitions.is_empty() && state.catalog.get(&id).is_none() {
        return Err(ApiError::NotFound(format!(
            "instance {id} of {service} has no history"
        )));
    }
    Ok(HttpResponse::Ok().json(json!({
        "instance_id": id,
        "service": service,
        "transitions": transitions,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Drain {
    draining: bool,
}

async fn drain(
    state: StateData,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    let (name, id) = path.into_inner();
    let service = service_name(&name)?;
    require_owner(&claims, service.as_str())?;
    let body: Drain = parse(&body)?;
    registered(&state, &service, &id)?;
    let target = id.clone();
    state
        .db
        .run(move |conn| store::set_draining(conn, &target, body.draining))
        .await
        .map_err(ApiError::from_db)?;
    let Some(instance) = state
        .catalog
        .update(&id, |current| current.draining = body.draining)
    else {
        return Err(ApiError::NotFound(format!(
            "instance {id} of {service} is not registered"
        )));
    };
    state
        .publish(Event::InstanceUpdated {
            instance: instance.clone(),
        })
        .await;
    Ok(HttpResponse::Ok().json(instance))
}

/// The dependency graph the registrations declare.
async fn graph(state: StateData, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let claims = caller(&state, &req).await?;
    require_any(&claims, &[DISCOVER_SCOPE, HEALTH_READ_SCOPE])?;
    let mut dependencies: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for instance in state.catalog.all() {
        let entry = dependencies
            .entry(instance.service.as_str().to_owned())
            .or_default();
        entry.extend(instance.dependencies.iter().map(|d| d.as_str().to_owned()));
    }
    let mut dependents: std::collections::BTreeMap<&str, Vec<&str>> =
        std::collections::BTreeMap::new();
    let mut edges = Vec::new();
    for (service, needs) in &dependencies {
        for needed in needs {
            dependents
                .entry(needed.as_str())
                .or_default()
                .push(service.as_str());
            edges.push(json!({ "from": service, "to": needed }));
        }
    }
    let services: Vec<_> = dependencies
        .iter()
        .map(|(service, needs)| {
            json!({
                "name": service,
                "registered": true,
                "dependencies": needs,
                "dependents": dependents.get(service.as_str()).cloned().unwrap_or_default(),
            })
        })
        .collect();
    Ok(indexed(state.catalog.index()).json(json!({ "services": services, "edges": edges })))
}
