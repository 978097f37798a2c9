//! The vault's API errors: each a problem+json with a stable `type`; causes go to the log.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use common::problem::Problem;

use crate::audit::AuditUnavailable;
use crate::store::StoreError;
use crate::vault::AuthFailure;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthenticated: {0:?}")]
    Unauthenticated(AuthFailure),
    #[error("forbidden")]
    Forbidden,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// Input that parsed but makes no sense: `code` is the problem type's suffix.
    #[error("invalid input ({code}): {detail}")]
    Invalid { code: &'static str, detail: String },
    /// A body that is not the JSON the endpoint takes.
    #[error("bad body: {0}")]
    Body(Problem),
    #[error("the value exceeds {0} bytes")]
    ValueTooLarge(usize),
    #[error("version {0} was destroyed")]
    Destroyed(i64),
    /// A stored ciphertext failed its integrity check: tampering, or rows swapped.
    #[error("integrity check failed for {0}")]
    Integrity(String),
    #[error(transparent)]
    AuditUnavailable(AuditUnavailable),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            detail: detail.into(),
        }
    }

    /// A store error, seen from the API: the mapping is explicit, variant by variant.
    pub fn from_store(error: StoreError, resource: &str) -> Self {
        match error {
            StoreError::NotFound => Self::NotFound(resource.to_owned()),
            StoreError::Conflict(detail) => Self::Conflict(detail),
            StoreError::Invalid(detail) => Self::invalid("invalid-request", detail),
            StoreError::Db(common::db::DbError::Unavailable(cause)) => Self::Unavailable(cause),
            StoreError::Db(other) => Self::Internal(other.to_string()),
            StoreError::Crypto(crate::crypto::CryptoError::Integrity) => {
                Self::Integrity(resource.to_owned())
            }
            StoreError::Crypto(other) => Self::Internal(other.to_string()),
            StoreError::Corrupt(detail) => Self::Internal(detail),
        }
    }

    fn problem(&self) -> Problem {
        match self {
            Self::Unauthenticated(failure) => {
                let detail = match failure {
                    AuthFailure::Missing => "send a bearer token in the Authorization header",
                    AuthFailure::Malformed => "the Authorization header is not `Bearer <token>`",
                    AuthFailure::Invalid => "the token is not valid",
                    AuthFailure::Expired => "the token has expired",
                    AuthFailure::Revoked => "the token has been revoked",
                };
                Problem::new("unauthenticated", 401, "Unauthorized").with_detail(detail)
            }
            Self::Forbidden => Problem::new("forbidden", 403, "Forbidden")
                .with_detail("the token does not allow this; the attempt was recorded"),
            Self::NotFound(resource) => Problem::not_found(format!("{resource} does not exist")),
            Self::Conflict(detail) => Problem::new("conflict", 409, "Conflict").with_detail(detail),
            Self::Invalid { code, detail } => Problem::bad_request(code, detail.clone()),
            Self::Body(problem) => problem.clone(),
            Self::ValueTooLarge(limit) => Problem::new("value-too-large", 413, "Payload Too Large")
                .with_detail(format!("a credential value may be at most {limit} bytes of JSON")),
            Self::Destroyed(version) => Problem::new("version-destroyed", 410, "Gone")
                .with_detail(format!("version {version} was destroyed")),
            Self::Integrity(resource) => Problem::new("integrity", 500, "Integrity Check Failed")
                .with_detail(format!(
                    "the stored ciphertext of {resource} failed its integrity check; it was altered or moved"
                )),
            Self::AuditUnavailable(_) => {
                Problem::new("audit-unavailable", 503, "Service Unavailable").with_detail(
                    "the audit log cannot be written, so the request was refused and had no effect",
                )
            }
            Self::Unavailable(_) => Problem::unavailable("the database is unavailable"),
            Self::Internal(_) => Problem::internal(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.problem().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let problem = self.problem();
        match self {
            Self::Internal(cause) | Self::Unavailable(cause) => {
                tracing::error!(%cause, status = problem.status, "request failed");
            }
            Self::AuditUnavailable(cause) => tracing::error!(%cause, "request refused"),
            Self::Integrity(resource) => tracing::error!(%resource, "integrity check failed"),
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code());
        response.content_type(common::problem::CONTENT_TYPE);
        if let Self::Unauthenticated(failure) = self {
            let challenge = match failure {
                AuthFailure::Missing => r#"Bearer realm="concierge""#,
                _ => r#"Bearer realm="concierge", error="invalid_token""#,
            };
            response.insert_header(("WWW-Authenticate", challenge));
        }
        response.body(problem.to_json())
    }
}
