//! The vault's HTTP API (DESIGN.md, "Credential vault"): credentials, tokens, keys, audit.
//!
//! Every handler that touches a credential or a token appends one audit record per
//! credential or token it touches, allowed or refused, before it answers.

use std::future::{Ready, ready};
use std::time::Duration;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, web};
use chrono::{NaiveDateTime, Utc};
use common::api::{Event, ServiceName};
use common::http::RequestId;
use common::secret::Secret;
use serde::{Deserialize, Serialize};

use crate::audit::{Outcome, Verification};
use crate::crypto::{Binding, Sealed};
use crate::error::ApiError;
use crate::store::{self, CredentialRow, ListFilter, StoreError, TokenRow, VersionRow};
use crate::vault::{
    CREDENTIALS_READ, Caller, DEFAULT_SERVICE_SCOPES, RequestContext, SERVICE_SCOPES, Vault,
};

/// The largest credential value, as JSON.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The OpenAPI document, kept beside the code it describes and checked by a test.
const OPENAPI: &str = include_str!("../openapi.json");

type VaultData = web::Data<Vault>;

pub fn routes(config: &mut web::ServiceConfig) {
    use common::http::resource;
    config
        .service(
            resource("/api/credentials")
                .route(web::post().to(create_credential))
                .route(web::get().to(list_credentials)),
        )
        // The hot read first: actix tries routes in order, each dynamic one a regex run.
        // No path matches both, since `{id}` is one segment.
        .service(
            resource("/api/credentials/{id}")
                .route(web::get().to(read_credential))
                .route(web::put().to(rotate_credential))
                .route(web::delete().to(delete_credential)),
        )
        .service(
            resource("/api/credentials/service/{name}").route(web::get().to(service_credentials)),
        )
        .service(resource("/api/credentials/{id}/versions").route(web::get().to(list_versions)))
        .service(
            resource("/api/credentials/{id}/restore").route(web::post().to(restore_credential)),
        )
        .service(resource("/api/credentials/{id}/destroy").route(web::post().to(destroy_versions)))
        .service(resource("/api/tokens").route(web::post().to(issue_token)))
        .service(resource("/api/tokens/revoked").route(web::get().to(revoked_tokens)))
        .service(resource("/api/tokens/{id}").route(web::delete().to(revoke_token)))
        .service(resource("/api/auth/jwks").route(web::get().to(jwks)))
        .service(resource("/api/audit").route(web::get().to(audit_records)))
        .service(resource("/api/audit/verify").route(web::get().to(verify_audit)))
        .service(resource("/api/openapi.json").route(web::get().to(openapi)));
}

impl FromRequest for RequestContext {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default();
        let client_addr = req.peer_addr().map_or_else(
            || "unknown".to_owned(),
            |peer| {
                let forwarded: Vec<&[u8]> = req
                    .headers()
                    .get_all("x-forwarded-for")
                    .map(|value| value.as_bytes())
                    .collect();
                req.app_data::<VaultData>()
                    .map_or(peer.ip(), |vault| {
                        vault.trusted_proxies.client(peer.ip(), &forwarded)
                    })
                    .to_string()
            },
        );
        let bearer = req.headers().get(header::AUTHORIZATION).map(|value| {
            common::auth::bearer(Some(value.as_bytes()))
                .map(|token| Secret::new(token.to_owned()))
                .map_err(drop)
        });
        ready(Ok(Self {
            request_id,
            client_addr,
            bearer,
        }))
    }
}

fn now() -> NaiveDateTime {
    Utc::now().naive_utc()
}

fn utc(at: NaiveDateTime) -> String {
    at.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Credential ids are UUIDs; anything else is refused before it reaches a query.
fn parse_id(raw: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(|id| id.to_string())
        .map_err(|_| ApiError::invalid("invalid-id", "credential ids are UUIDs"))
}

fn parse_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid-name",
            "credential names are 1 to 128 characters of A-Z a-z 0-9 . _ - /",
        ))
    }
}

/// A credential's metadata as the API shows it; never its value.
#[derive(Debug, Serialize)]
struct Metadata {
    id: String,
    service: String,
    name: String,
    version: i64,
    description: Option<String>,
    shared_with: Vec<String>,
    grace_period_s: i64,
    created_at: String,
    updated_at: String,
}

fn metadata(row: &CredentialRow) -> Result<Metadata, ApiError> {
    Ok(Metadata {
        id: row.id.clone(),
        service: row.service.clone(),
        name: row.name.clone(),
        version: row.current_version,
        description: row.description.clone(),
        shared_with: row
            .shared_with()
            .map_err(|e| ApiError::from_store(e, "credential"))?,
        grace_period_s: row.grace_period_s,
        created_at: utc(row.created_at),
        updated_at: utc(row.updated_at),
    })
}

/// Opens one version's value, timing it.
fn open_value(
    vault: &Vault,
    row: &CredentialRow,
    version: &VersionRow,
) -> Result<serde_json::Value, ApiError> {
    let resource = format!("credential:{} version {}", row.id, version.version);
    let (Some(ciphertext), Some(wrapped_key)) = (&version.ciphertext, &version.wrapped_key) else {
        return Err(ApiError::Destroyed(version.version));
    };
    let started = std::time::Instant::now();
    let sealed = Sealed {
        ciphertext: ciphertext.clone(),
        wrapped_key: wrapped_key.clone(),
        master_key_id: version.master_key_id.clone(),
    };
    let binding = Binding {
        credential_id: &row.id,
        version: version.version,
        owner: &row.service,
    };
    let plain = vault
        .keyring
        .open(binding, &sealed)
        .map_err(|e| ApiError::from_store(StoreError::Crypto(e), &resource))?;
    vault
        .metrics
        .decrypt_seconds
        .observe(started.elapsed().as_secs_f64());
    serde_json::from_slice(plain.expose()).map_err(|_| ApiError::Integrity(resource))
}

fn seal_value(
    vault: &Vault,
    id: &str,
    number: i64,
    owner: &str,
    value: &serde_json::Value,
) -> Result<VersionRow, ApiError> {
    let plain =
        Secret::new(serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?);
    if plain.expose().len() > MAX_VALUE_BYTES {
        return Err(ApiError::ValueTooLarge(MAX_VALUE_BYTES));
    }
    let sealed = vault
        .keyring
        .seal(
            Binding {
                credential_id: id,
                version: number,
                owner,
            },
            plain.expose(),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    vault
        .metrics
        .master_key_encryptions
        .with_label_values(&[&sealed.master_key_id])
        .inc();
    Ok(VersionRow {
        credential_id: id.to_owned(),
        version: number,
        ciphertext: Some(sealed.ciphertext),
        wrapped_key: Some(sealed.wrapped_key),
        master_key_id: sealed.master_key_id,
        created_at: now(),
        destroyed_at: None,
    })
}

/// Parses a JSON body once the caller is known; a bad one is recorded as invalid.
async fn body_of<T: serde::de::DeserializeOwned>(
    vault: &Vault,
    ctx: &RequestContext,
    caller: &Caller,
    action: &'static str,
    resource: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    match common::http::parse_json(body) {
        Ok(parsed) => Ok(parsed),
        Err(problem) => {
            vault
                .record(ctx, &caller.actor, action, resource, Outcome::Invalid)
                .await?;
            Err(ApiError::Body(problem))
        }
    }
}

/// Runs a change under the audit writer: the record of it, success or not, commits with it.
async fn audited<T, F>(
    vault: &Vault,
    ctx: &RequestContext,
    caller: &Caller,
    action: &'static str,
    resource: String,
    change: F,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut common::db::DbConnection) -> Result<T, StoreError> + Send + 'static,
{
    let entry_resource = resource.clone();
    let template = Vault::draft_entry(
        ctx,
        &caller.actor,
        action,
        &entry_resource,
        Outcome::Success,
    );
    let metrics = vault.metrics.clone();
    let result = vault
        .audit
        .execute(change, move |result| {
            let mut entry = template;
            if let Err(error) = result {
                entry.outcome = Outcome::of_error(error);
            }
            // Counted once, by the outcome the record says.
            metrics.operation(action, entry.outcome);
            entry
        })
        .await
        .map_err(ApiError::AuditUnavailable)?;
    result.map_err(|e| ApiError::from_store(e, &resource))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCredential {
    service: ServiceName,
    name: String,
    value: serde_json::Value,
    description: Option<String>,
    #[serde(default)]
    shared_with: Vec<ServiceName>,
    grace_period_s: Option<u32>,
}

async fn create_credential(
    vault: VaultData,
    ctx: RequestContext,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    let resource = format!("credential:{id}");
    let caller = vault
        .authorize_admin(&ctx, "credential.create", &resource)
        .await?;
    let body: CreateCredential =
        body_of(&vault, &ctx, &caller, "credential.create", &resource, &body).await?;
    let checked = parse_name(&body.name).and_then(|()| match &body.description {
        Some(d) if d.len() > 1024 => Err(ApiError::invalid(
            "invalid-description",
            "descriptions are at most 1024 bytes",
        )),
        _ => Ok(()),
    });
    let version =
        checked.and_then(|()| seal_value(&vault, &id, 1, body.service.as_str(), &body.value));
    let version = match version {
        Ok(version) => version,
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.create",
                    &resource,
                    Outcome::Invalid,
                    error,
                )
                .await);
        }
    };
    let at = now();
    let mut shared: Vec<String> = body
        .shared_with
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    shared.sort();
    shared.dedup();
    let row = CredentialRow {
        id: id.clone(),
        service: body.service.as_str().to_owned(),
        name: body.name,
        description: body.description,
        shared_with: serde_json::to_string(&shared)
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        current_version: 1,
        grace_period_s: body
            .grace_period_s
            .map_or(vault.default_grace.as_secs() as i64, i64::from),
        deleted_at: None,
        created_at: at,
        updated_at: at,
    };
    let inserted = row.clone();
    audited(
        &vault,
        &ctx,
        &caller,
        "credential.create",
        resource,
        move |conn| store::insert_credential(conn, &inserted, &version),
    )
    .await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/api/credentials/{id}")))
        .json(metadata(&row)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    version: Option<i64>,
}

async fn read_credential(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
    query: web::Query<VersionQuery>,
) -> Result<HttpResponse, ApiError> {
    let resource = format!("credential:{}", path.as_str());
    let caller = vault.authorize(&ctx, "credential.read", &resource).await?;
    let id = match parse_id(&path) {
        Ok(id) => id,
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.read",
                    &resource,
                    Outcome::Invalid,
                    error,
                )
                .await);
        }
    };
    let loaded = match query.version {
        // The hot path: the current version, from the snapshot cache.
        None => vault.snapshot(&id).await.map(|snapshot| {
            let snapshot = snapshot.as_ref();
            (
                snapshot.row.clone(),
                snapshot.current.clone(),
                snapshot.previous.clone(),
            )
        }),
        Some(number) => {
            let lookup = id.clone();
            vault
                .read(move |conn| {
                    let row = store::credential(conn, &lookup)?;
                    let version = store::version(conn, &lookup, number)?;
                    Ok((row, version, None))
                })
                .await
        }
    };
    let (row, version, previous) = match loaded {
        Ok(found) => found,
        Err(error) => {
            let outcome = Outcome::of_error(&error);
            vault
                .record(&ctx, &caller.actor, "credential.read", &resource, outcome)
                .await?;
            return Err(ApiError::from_store(error, &resource));
        }
    };
    let shared = row
        .shared_with()
        .map_err(|e| ApiError::from_store(e, &resource))?;
    if !caller.may_read(&row.service, &shared) {
        return Err(vault
            .deny(&ctx, &caller, "credential.read", &resource)
            .await);
    }
    if row.deleted_at.is_some() {
        return Err(vault
            .refuse(
                &ctx,
                &caller,
                "credential.read",
                &resource,
                Outcome::NotFound,
                ApiError::NotFound(resource.clone()),
            )
            .await);
    }
    let value = match open_value(&vault, &row, &version) {
        Ok(value) => value,
        Err(error) => {
            let outcome = match error {
                ApiError::Destroyed(_) => Outcome::NotFound,
                _ => Outcome::Error,
            };
            vault
                .record(&ctx, &caller.actor, "credential.read", &resource, outcome)
                .await?;
            return Err(error);
        }
    };
    // Within the grace window after a rotation, the previous value travels along, so
    // that a consumer can accept both until it has switched.
    let grace_ends = row.updated_at + chrono::Duration::seconds(row.grace_period_s);
    let previous = match previous {
        Some(previous) if now() < grace_ends && previous.destroyed_at.is_none() => {
            Some(serde_json::json!({
                "version": previous.version,
                "value": open_value(&vault, &row, &previous)?,
                "valid_until": utc(grace_ends),
            }))
        }
        _ => None,
    };
    vault
        .record(
            &ctx,
            &caller.actor,
            "credential.read",
            &resource,
            Outcome::Success,
        )
        .await?;
    let mut body =
        serde_json::to_value(metadata(&row)?).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["version"] = version.version.into();
    body["current_version"] = row.current_version.into();
    body["value"] = value;
    if let Some(previous) = previous {
        body["previous"] = previous;
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, format!("\"{}\"", row.current_version)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateCredential {
    value: serde_json::Value,
    cas: Option<i64>,
}

/// `If-Match: 3`, `"3"` or `W/"3"`; anything else is a 400.
fn if_match(req: &HttpRequest) -> Result<Option<i64>, ApiError> {
    let Some(value) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse()
        .map(Some)
        .map_err(|_| ApiError::invalid("invalid-if-match", "If-Match must name a version number"))
}

async fn rotate_credential(
    vault: VaultData,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let resource = format!("credential:{}", path.as_str());
    let caller = vault
        .authorize_admin(&ctx, "credential.rotate", &resource)
        .await?;
    let body: RotateCredential =
        body_of(&vault, &ctx, &caller, "credential.rotate", &resource, &body).await?;
    let prepared = parse_id(&path).and_then(|id| {
        let expected = match (if_match(&req)?, body.cas) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::invalid(
                    "invalid-cas",
                    "If-Match and cas disagree",
                ));
            }
            (a, b) => a.or(b),
        };
        Ok((id, expected))
    });
    let (id, expected) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.rotate",
                    &resource,
                    Outcome::Invalid,
                    error,
                )
                .await);
        }
    };
    let lookup = id.clone();
    let current = match vault
        .read(move |conn| store::credential(conn, &lookup))
        .await
    {
        Ok(row) if row.deleted_at.is_none() => row,
        Ok(_) | Err(StoreError::NotFound) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.rotate",
                    &resource,
                    Outcome::NotFound,
                    ApiError::NotFound(resource.clone()),
                )
                .await);
        }
        Err(error) => return Err(ApiError::from_store(error, &resource)),
    };
    let next = current.current_version + 1;
    let version = match seal_value(&vault, &id, next, &current.service, &body.value) {
        Ok(version) => version,
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.rotate",
                    &resource,
                    Outcome::Invalid,
                    error,
                )
                .await);
        }
    };
    let at = now();
    let rotated_id = id.clone();
    audited(
        &vault,
        &ctx,
        &caller,
        "credential.rotate",
        resource.clone(),
        move |conn| store::add_version(conn, &rotated_id, expected, &version, at),
    )
    .await?;
    vault.snapshots.invalidate(&id);
    let lookup = id.clone();
    let row = vault
        .read(move |conn| store::credential(conn, &lookup))
        .await
        .map_err(|e| ApiError::from_store(e, &resource))?;
    publish(
        &vault,
        Event::CredentialRotated {
            id: row.id.clone(),
            service: service_name(&row.service)?,
            name: row.name.clone(),
            version: row.current_version,
        },
    )
    .await;
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, format!("\"{}\"", row.current_version)))
        .json(metadata(&row)?))
}

fn service_name(name: &str) -> Result<ServiceName, ApiError> {
    ServiceName::parse(name)
        .map_err(|_| ApiError::Internal(format!("stored service name {name:?} is invalid")))
}

/// Events speed others up; a lost one is caught by their reconciliation, so a failure
/// to publish is logged, not returned.
async fn publish(vault: &Vault, event: Event) {
    if let Err(error) = vault.publisher.publish(event).await {
        tracing::warn!(%error, "cannot publish an event; consumers will reconcile");
    }
}

async fn delete_credential(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let row = set_deleted(&vault, &ctx, &path, "credential.delete", true).await?;
    publish(
        &vault,
        Event::CredentialDeleted {
            id: row.id.clone(),
            service: service_name(&row.service)?,
            name: row.name.clone(),
        },
    )
    .await;
    Ok(HttpResponse::NoContent().finish())
}

async fn restore_credential(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let row = set_deleted(&vault, &ctx, &path, "credential.restore", false).await?;
    Ok(HttpResponse::Ok().json(metadata(&row)?))
}

async fn set_deleted(
    vault: &Vault,
    ctx: &RequestContext,
    raw_id: &str,
    action: &'static str,
    delete: bool,
) -> Result<CredentialRow, ApiError> {
    let resource = format!("credential:{raw_id}");
    let caller = vault.authorize_admin(ctx, action, &resource).await?;
    let id = match parse_id(raw_id) {
        Ok(id) => id,
        Err(error) => {
            return Err(vault
                .refuse(ctx, &caller, action, &resource, Outcome::Invalid, error)
                .await);
        }
    };
    let at = now();
    let changed = id.clone();
    let mut row = audited(vault, ctx, &caller, action, resource, move |conn| {
        store::set_deleted(conn, &changed, delete.then_some(at))
    })
    .await?;
    vault.snapshots.invalidate(&id);
    row.deleted_at = delete.then_some(at);
    Ok(row)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyVersions {
    versions: Vec<i64>,
}

async fn destroy_versions(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let resource = format!("credential:{}", path.as_str());
    let caller = vault
        .authorize_admin(&ctx, "credential.destroy", &resource)
        .await?;
    let body: DestroyVersions = body_of(
        &vault,
        &ctx,
        &caller,
        "credential.destroy",
        &resource,
        &body,
    )
    .await?;
    let id = match parse_id(&path) {
        Ok(id) if !body.versions.is_empty() && body.versions.len() <= 1000 => id,
        Ok(_) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.destroy",
                    &resource,
                    Outcome::Invalid,
                    ApiError::invalid("invalid-versions", "name 1 to 1000 versions to destroy"),
                )
                .await);
        }
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.destroy",
                    &resource,
                    Outcome::Invalid,
                    error,
                )
                .await);
        }
    };
    let versions = body.versions;
    let destroyed = versions.clone();
    let at = now();
    let changed = id.clone();
    audited(
        &vault,
        &ctx,
        &caller,
        "credential.destroy",
        resource,
        move |conn| store::destroy_versions(conn, &changed, &versions, at),
    )
    .await?;
    vault.snapshots.invalidate(&id);
    Ok(HttpResponse::Ok().json(serde_json::json!({ "destroyed": destroyed })))
}

async fn list_versions(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let resource = format!("credential:{}", path.as_str());
    let caller = vault
        .authorize(&ctx, "credential.versions", &resource)
        .await?;
    let id = match parse_id(&path) {
        Ok(id) => id,
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.versions",
                    &resource,
                    Outcome::Invalid,
                    error,
                )
                .await);
        }
    };
    let loaded = vault
        .read(move |conn| Ok((store::credential(conn, &id)?, store::versions(conn, &id)?)))
        .await;
    let (row, versions) = match loaded {
        Ok(found) if found.0.deleted_at.is_none() => found,
        Ok(_) | Err(StoreError::NotFound) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.versions",
                    &resource,
                    Outcome::NotFound,
                    ApiError::NotFound(resource.clone()),
                )
                .await);
        }
        Err(error) => return Err(ApiError::from_store(error, &resource)),
    };
    let shared = row
        .shared_with()
        .map_err(|e| ApiError::from_store(e, &resource))?;
    if !caller.may_read(&row.service, &shared) {
        return Err(vault
            .deny(&ctx, &caller, "credential.versions", &resource)
            .await);
    }
    vault
        .record(
            &ctx,
            &caller.actor,
            "credential.versions",
            &resource,
            Outcome::Success,
        )
        .await?;
    let versions: Vec<_> = versions
        .iter()
        .map(|v| {
            serde_json::json!({
                "version": v.version,
                "created_at": utc(v.created_at),
                "destroyed": v.destroyed_at.is_some(),
                "destroyed_at": v.destroyed_at.map(utc),
                "current": v.version == row.current_version,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "id": row.id, "versions": versions })))
}

async fn service_credentials(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let resource = format!("service:{}", path.as_str());
    let caller = vault.authorize(&ctx, "credential.read", &resource).await?;
    let service = match ServiceName::parse(&path) {
        Ok(service) => service,
        Err(error) => {
            return Err(vault
                .refuse(
                    &ctx,
                    &caller,
                    "credential.read",
                    &resource,
                    Outcome::Invalid,
                    ApiError::invalid("invalid-service", error.to_string()),
                )
                .await);
        }
    };
    // A service reads its own set, and only with the scope that lets it read credentials.
    let own_set =
        caller.service() == Some(service.as_str()) && caller.claims.has_scope(CREDENTIALS_READ);
    if !caller.is_admin() && !own_set {
        return Err(vault
            .deny(&ctx, &caller, "credential.read", &resource)
            .await);
    }
    // Everything available to the service: what it owns and what is shared with it.
    let target = service.as_str().to_owned();
    let rows = vault
        .read(move |conn| {
            let filter = ListFilter {
                readable_by: Some(target),
                limit: 10_000,
                ..ListFilter::default()
            };
            let rows = store::list_credentials(conn, &filter)?;
            rows.into_iter()
                .map(|row| {
                    let version = store::version(conn, &row.id, row.current_version)?;
                    Ok((row, version))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .map_err(|e| ApiError::from_store(e, &resource))?;
    let mut credentials = Vec::with_capacity(rows.len());
    for (row, version) in &rows {
        let one = format!("credential:{}", row.id);
        let value = match open_value(&vault, row, version) {
            Ok(value) => value,
            Err(error) => {
                return Err(vault
                    .refuse(
                        &ctx,
                        &caller,
                        "credential.read",
                        &one,
                        Outcome::Error,
                        error,
                    )
                    .await);
            }
        };
        vault
            .record(
                &ctx,
                &caller.actor,
                "credential.read",
                &one,
                Outcome::Success,
            )
            .await?;
        let mut body =
            serde_json::to_value(metadata(row)?).map_err(|e| ApiError::Internal(e.to_string()))?;
        body["value"] = value;
        credentials.push(body);
    }
    if rows.is_empty() {
        vault
            .record(
                &ctx,
                &caller.actor,
                "credential.read",
                &resource,
                Outcome::Success,
            )
            .await?;
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(serde_json::json!({ "service": service, "credentials": credentials })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    service: Option<String>,
    name_prefix: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_credentials(
    vault: VaultData,
    ctx: RequestContext,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let resource = "credentials";
    let caller = vault.authorize(&ctx, "credential.list", resource).await?;
    let query = query.into_inner();
    let limit = query.limit.unwrap_or(100);
    let checked = (|| {
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid(
                "invalid-limit",
                "limit is between 1 and 1000",
            ));
        }
        if let Some(service) = &query.service {
            ServiceName::parse(service)
                .map_err(|e| ApiError::invalid("invalid-service", e.to_string()))?;
        }
        if let Some(cursor) = &query.cursor {
            parse_id(cursor).map_err(|_| {
                ApiError::invalid("invalid-cursor", "the cursor is not one this API gave")
            })?;
        }
        Ok(())
    })();
    if let Err(error) = checked {
        return Err(vault
            .refuse(
                &ctx,
                &caller,
                "credential.list",
                resource,
                Outcome::Invalid,
                error,
            )
            .await);
    }
    let filter = ListFilter {
        service: query.service,
        readable_by: caller
            .service()
            .map(str::to_owned)
            .filter(|_| !caller.is_admin()),
        name_prefix: query.name_prefix,
        after_id: query.cursor,
        limit,
    };
    let mut rows = vault
        .read(move |conn| store::list_credentials(conn, &filter))
        .await
        .map_err(|e| ApiError::from_store(e, resource))?;
    vault
        .record(
            &ctx,
            &caller.actor,
            "credential.list",
            resource,
            Outcome::Success,
        )
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|row| row.id.clone()))
        .flatten();
    let items = rows.iter().map(metadata).collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "credentials": items, "next_cursor": next_cursor })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueToken {
    service: ServiceName,
    ttl_s: Option<u64>,
    scopes: Option<Vec<String>>,
}

async fn issue_token(
    vault: VaultData,
    ctx: RequestContext,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = vault.authorize_admin(&ctx, "token.issue", "tokens").await?;
    let body: IssueToken = body_of(&vault, &ctx, &caller, "token.issue", "tokens", &body).await?;
    let resource = format!("tokens:{}", body.service);
    let ttl = Duration::from_secs(body.ttl_s.unwrap_or(30 * 24 * 3600));
    let scopes: Vec<String> = body.scopes.unwrap_or_else(|| {
        DEFAULT_SERVICE_SCOPES
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    });
    let checked = if body.service.as_str() == "admin" {
        // A service token named like the admin would read like the admin in the audit log.
        Err(ApiError::invalid(
            "invalid-service",
            "admin is not a service name",
        ))
    } else if ttl < Duration::from_secs(60) || ttl > vault.max_token_ttl {
        Err(ApiError::invalid(
            "invalid-ttl",
            format!("ttl_s is between 60 and {}", vault.max_token_ttl.as_secs()),
        ))
    } else if let Some(unknown) = scopes
        .iter()
        .find(|s| !SERVICE_SCOPES.contains(&s.as_str()))
    {
        Err(ApiError::invalid(
            "invalid-scope",
            format!(
                "unknown scope {unknown:?}; known: {}",
                SERVICE_SCOPES.join(", ")
            ),
        ))
    } else {
        Ok(())
    };
    if let Err(error) = checked {
        return Err(vault
            .refuse(
                &ctx,
                &caller,
                "token.issue",
                &resource,
                Outcome::Invalid,
                error,
            )
            .await);
    }
    let (token, claims) = vault.sign(body.service.as_str(), scopes.clone(), ttl);
    let row = token_row(&claims);
    let resource = format!("token:{}", vault.hasher.hash(&claims.jti));
    audited(
        &vault,
        &ctx,
        &caller,
        "token.issue",
        resource,
        move |conn| store::insert_token(conn, &row),
    )
    .await?;
    Ok(HttpResponse::Created()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(serde_json::json!({
            "id": claims.jti,
            "token": token.expose(),
            "service": claims.sub,
            "scopes": claims.scopes,
            "expires_at": chrono::DateTime::from_timestamp(claims.exp, 0).map(|at| at.to_rfc3339()),
        })))
}

pub fn token_row(claims: &common::auth::Claims) -> TokenRow {
    let at = |seconds| {
        chrono::DateTime::from_timestamp(seconds, 0)
            .map(|at| at.naive_utc())
            .unwrap_or_default()
    };
    TokenRow {
        id: claims.jti.clone(),
        subject: claims.sub.clone(),
        scopes: serde_json::to_string(&claims.scopes).unwrap_or_else(|_| "[]".into()),
        issued_at: at(claims.iat),
        expires_at: at(claims.exp),
        revoked_at: None,
    }
}

async fn revoke_token(
    vault: VaultData,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let resource = format!("token:{}", vault.hasher.hash(&id));
    let caller = vault
        .authorize_admin(&ctx, "token.revoke", &resource)
        .await?;
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(vault
            .refuse(
                &ctx,
                &caller,
                "token.revoke",
                &resource,
                Outcome::Invalid,
                ApiError::invalid("invalid-id", "token ids are UUIDs"),
            )
            .await);
    }
    let revoked = id.clone();
    let at = now();
    audited(
        &vault,
        &ctx,
        &caller,
        "token.revoke",
        resource,
        move |conn| store::revoke_token(conn, &revoked, at),
    )
    .await?;
    vault.mark_revoked(id.clone());
    publish(&vault, Event::TokenRevoked { id }).await;
    Ok(HttpResponse::NoContent().finish())
}

async fn revoked_tokens(vault: VaultData, ctx: RequestContext) -> Result<HttpResponse, ApiError> {
    let resource = "tokens:revoked";
    let caller = vault
        .authorize(&ctx, "token.list_revoked", resource)
        .await?;
    let at = now();
    let ids = vault
        .read(move |conn| store::revoked_tokens(conn, at))
        .await
        .map_err(|e| ApiError::from_store(e, resource))?;
    vault
        .record(
            &ctx,
            &caller.actor,
            "token.list_revoked",
            resource,
            Outcome::Success,
        )
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "revoked": ids })))
}

async fn jwks(vault: VaultData) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "max-age=60"))
        .json(&vault.signing().jwks)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    actor: Option<String>,
    resource: Option<String>,
    since: Option<chrono::DateTime<Utc>>,
    until: Option<chrono::DateTime<Utc>>,
    limit: Option<i64>,
    cursor: Option<i64>,
}

async fn audit_records(
    vault: VaultData,
    ctx: RequestContext,
    query: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    const ACTION: &str = "audit.read";
    let caller = vault.authorize_admin(&ctx, ACTION, "audit").await?;
    let query = query.into_inner();
    let limit = query.limit.unwrap_or(100);
    // Who read the log is itself recorded, before the read, as every read is.
    let outcome = if (1..=1000).contains(&limit) {
        Outcome::Success
    } else {
        Outcome::Invalid
    };
    vault
        .record(&ctx, &caller.actor, ACTION, "audit", outcome)
        .await?;
    if outcome == Outcome::Invalid {
        return Err(ApiError::invalid(
            "invalid-limit",
            "limit is between 1 and 1000",
        ));
    }
    let filter = crate::audit::Filter {
        actor_prefix: query.actor,
        resource: query.resource,
        since: query.since.map(|at| at.naive_utc()),
        until: query.until.map(|at| at.naive_utc()),
        after_seq: query.cursor.unwrap_or(0),
        limit: limit + 1,
    };
    let mut records = vault
        .db
        .run(move |conn| crate::audit::records(conn, &filter))
        .await
        .map_err(|e| ApiError::from_store(StoreError::Db(e), "audit"))?;
    let more = records.len() as i64 > limit;
    records.truncate(limit as usize);
    let next_cursor = more.then(|| records.last().map(|r| r.seq)).flatten();
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "records": records, "next_cursor": next_cursor })))
}

async fn verify_audit(vault: VaultData, ctx: RequestContext) -> Result<HttpResponse, ApiError> {
    const ACTION: &str = "audit.verify";
    let caller = vault.authorize_admin(&ctx, ACTION, "audit").await?;
    vault
        .record(&ctx, &caller.actor, ACTION, "audit", Outcome::Success)
        .await?;
    let verification: Verification = vault
        .db
        .run({
            let key = vault.hasher.clone();
            move |conn| crate::audit::verify(conn, &key)
        })
        .await
        .map_err(|e| ApiError::from_store(StoreError::Db(e), "audit"))?;
    Ok(HttpResponse::Ok().json(verification))
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}
