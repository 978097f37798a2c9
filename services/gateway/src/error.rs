//! What can go wrong at the edge, tagged with its source and whether another instance may
//! be tried (pingora's taxonomy), and how each becomes a problem+json answer. Causes go to
//! the log; the client learns the kind of failure, never an address or an internal error.

use std::time::Duration;

use common::auth::AuthError;
use common::hyper_server::{Body, problem_response};
use common::problem::Problem;
use http::{HeaderValue, Response};

use crate::ratelimit::Decision;
use crate::routing::BadTarget;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Upstream,
    Gateway,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bad request target: {0:?}")]
    BadTarget(BadTarget),
    #[error("no route for the path")]
    NoRoute,
    #[error("the request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(AuthError),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("rate limited ({scope})")]
    RateLimited {
        scope: &'static str,
        decision: Decision,
    },
    #[error("no instance of {0} may take the request")]
    NoInstance(String),
    #[error("cannot connect to instance {instance} of {service}: {cause}")]
    Connect {
        service: String,
        instance: String,
        cause: String,
    },
    #[error("instance {instance} of {service} failed: {cause}")]
    Upstream {
        service: String,
        instance: String,
        cause: String,
    },
    #[error("instance {instance} of {service} did not answer within {timeout:?}")]
    Timeout {
        service: String,
        instance: String,
        timeout: Duration,
    },
    #[error("the vault's signing keys are unavailable")]
    AuthUnavailable,
    #[error("internal: {0}")]
    Internal(String),
}

impl GatewayError {
    pub fn source(&self) -> Source {
        match self {
            Self::BadTarget(_)
            | Self::NoRoute
            | Self::BodyTooLarge(_)
            | Self::BadRequest(_)
            | Self::Unauthenticated(_)
            | Self::Forbidden(_)
            | Self::RateLimited { .. } => Source::Client,
            Self::NoInstance(_)
            | Self::Connect { .. }
            | Self::Upstream { .. }
            | Self::Timeout { .. } => Source::Upstream,
            Self::AuthUnavailable | Self::Internal(_) => Source::Gateway,
        }
    }

    /// Whether another instance may be tried (the request never reached this one).
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadTarget(BadTarget::TooLong) => "uri-too-long",
            Self::BadTarget(BadTarget::Malformed(_)) => "bad-path",
            Self::NoRoute => "no-route",
            Self::BodyTooLarge(_) => "payload-too-large",
            Self::BadRequest(_) => "bad-request",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited { .. } => "rate-limited",
            Self::NoInstance(_) => "no-healthy-instance",
            Self::Connect { .. } => "upstream-unreachable",
            Self::Upstream { .. } => "upstream-failed",
            Self::Timeout { .. } => "upstream-timeout",
            Self::AuthUnavailable => "auth-unavailable",
            Self::Internal(_) => "internal",
        }
    }

    pub fn to_response(&self) -> Response<Body> {
        let problem = match self {
            Self::BadTarget(BadTarget::TooLong) => Problem::new(self.code(), 414, "URI Too Long")
                .with_detail(format!(
                    "the request target exceeds {} bytes",
                    crate::routing::MAX_TARGET_BYTES
                )),
            Self::BadTarget(BadTarget::Malformed(why)) => Problem::bad_request(self.code(), *why),
            Self::NoRoute => Problem::new(self.code(), 404, "Not Found")
                .with_detail("no route matches this path"),
            Self::BodyTooLarge(limit) => Problem::payload_too_large(*limit),
            Self::BadRequest(detail) => Problem::bad_request(self.code(), detail.clone()),
            Self::Unauthenticated(error) => {
                Problem::new(self.code(), 401, "Unauthorized").with_detail(error.to_string())
            }
            Self::Forbidden(why) => Problem::new(self.code(), 403, "Forbidden").with_detail(*why),
            Self::RateLimited { scope, .. } => Problem::new(self.code(), 429, "Too Many Requests")
                .with_detail(format!("the {scope} rate limit of this route is spent"))
                .with_extension("scope", (*scope).into()),
            Self::NoInstance(service) => Problem::new(self.code(), 503, "Service Unavailable")
                .with_detail(format!(
                    "no instance of {service} can take requests right now"
                )),
            Self::Connect { .. } => Problem::new(self.code(), 502, "Bad Gateway")
                .with_detail("the upstream instance could not be reached"),
            Self::Upstream { .. } => Problem::new(self.code(), 502, "Bad Gateway")
                .with_detail("the upstream instance failed to answer"),
            Self::Timeout { timeout, .. } => Problem::new(self.code(), 504, "Gateway Timeout")
                .with_detail(format!(
                    "the upstream instance did not answer within {timeout:?}"
                )),
            Self::AuthUnavailable => Problem::new(self.code(), 503, "Service Unavailable")
                .with_detail("tokens cannot be checked right now"),
            Self::Internal(_) => Problem::internal(),
        };
        let mut response = problem_response(&problem);
        let headers = response.headers_mut();
        match self {
            Self::NoInstance(_) | Self::AuthUnavailable => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::RateLimited { decision, .. } => {
                insert_rate_headers(headers, decision);
                headers.insert(http::header::RETRY_AFTER, seconds(decision.retry_after));
            }
            Self::Unauthenticated(_) => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
            }
            _ => {}
        }
        response
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds, rounded up).
pub fn insert_rate_headers(headers: &mut http::HeaderMap, decision: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert("ratelimit-reset", seconds(decision.reset));
}

fn seconds(duration: Duration) -> HeaderValue {
    let whole = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    HeaderValue::from(whole.max(1))
}
