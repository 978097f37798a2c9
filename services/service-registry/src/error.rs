//! The registry's API errors: each a problem+json with a stable `type`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use common::auth::AuthError;
use common::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(AuthError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid input ({code}): {detail}")]
    Invalid { code: &'static str, detail: String },
    #[error("bad body: {0}")]
    Body(Problem),
    /// The service is known but has no healthy instance now.
    #[error("no healthy instance of {0}")]
    NoHealthy(String),
    #[error("unavailable: {0}")]
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

    /// A database error, seen from the API: unreachable is 503, anything else opaque.
    pub fn from_db(error: common::db::DbError) -> Self {
        match error {
            common::db::DbError::Unavailable(cause) => Self::Unavailable(cause),
            other => Self::Internal(other.to_string()),
        }
    }

    fn problem(&self) -> Problem {
        match self {
            Self::Unauthenticated(AuthError::KeysUnavailable) => Problem::unavailable(
                "the vault's signing keys cannot be fetched to check the token",
            ),
            Self::Unauthenticated(error) => {
                Problem::new("unauthenticated", 401, "Unauthorized").with_detail(error.to_string())
            }
            Self::Forbidden(detail) => {
                Problem::new("forbidden", 403, "Forbidden").with_detail(detail.clone())
            }
            Self::NotFound(detail) => Problem::not_found(detail.clone()),
            Self::Conflict(detail) => {
                Problem::new("conflict", 409, "Conflict").with_detail(detail.clone())
            }
            Self::Invalid { code, detail } => Problem::bad_request(code, detail.clone()),
            Self::Body(problem) => problem.clone(),
            Self::NoHealthy(service) => {
                Problem::new("no-healthy-instance", 503, "Service Unavailable")
                    .with_detail(format!("{service} has no healthy instance right now"))
            }
            Self::Unavailable(_) => Problem::unavailable("the registry's database is unavailable"),
            Self::Internal(_) => Problem::internal(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.problem().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(cause) | Self::Unavailable(cause) = self {
            tracing::error!(%cause, "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.content_type(common::problem::CONTENT_TYPE);
        match self {
            Self::Unauthenticated(AuthError::Missing) => {
                response.insert_header(("WWW-Authenticate", r#"Bearer realm="concierge""#));
            }
            Self::Unauthenticated(AuthError::KeysUnavailable) => {}
            Self::Unauthenticated(_) => {
                response.insert_header((
                    "WWW-Authenticate",
                    r#"Bearer realm="concierge", error="invalid_token""#,
                ));
            }
            Self::NoHealthy(_) => {
                response.insert_header(("Retry-After", "5"));
            }
            _ => {}
        }
        response.body(self.problem().to_json())
    }
}
