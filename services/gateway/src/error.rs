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

    /// The problem+json answer.
    pub fn to_response(&self) -> Response<Body> {
        let mut response = problem_response(&self.problem());
        self.add_headers(response.headers_mut());
        response
    }

    /// The answer a gRPC client understands (`content-type: application/grpc…` asked):
    /// a Trailers-Only response, status 200 with `grpc-status` and `grpc-message`, as
    /// Envoy answers gRPC requests it fails itself. A gRPC client reads an HTTP error
    /// status only as UNAVAILABLE, UNIMPLEMENTED and the like, losing a deadline or a
    /// spent quota.
    pub fn to_grpc_response(&self) -> Response<Body> {
        let problem = self.problem();
        let mut response = Response::new(common::hyper_server::full(bytes::Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(self.grpc_status()));
        let message = problem.detail.as_deref().unwrap_or(&problem.title);
        if let Ok(value) = HeaderValue::from_str(&grpc_message(message)) {
            headers.insert("grpc-message", value);
        }
        self.add_headers(headers);
        response
    }

    /// The gRPC status code (grpc/doc/statuscodes.md) for this failure.
    fn grpc_status(&self) -> u16 {
        const INVALID_ARGUMENT: u16 = 3;
        const DEADLINE_EXCEEDED: u16 = 4;
        const PERMISSION_DENIED: u16 = 7;
        const RESOURCE_EXHAUSTED: u16 = 8;
        const UNIMPLEMENTED: u16 = 12;
        const INTERNAL: u16 = 13;
        const UNAVAILABLE: u16 = 14;
        const UNAUTHENTICATED: u16 = 16;
        match self {
            Self::BadTarget(_) | Self::BadRequest(_) => INVALID_ARGUMENT,
            Self::NoRoute => UNIMPLEMENTED,
            Self::BodyTooLarge(_) | Self::RateLimited { .. } => RESOURCE_EXHAUSTED,
            Self::Unauthenticated(_) => UNAUTHENTICATED,
            Self::Forbidden(_) => PERMISSION_DENIED,
            Self::NoInstance(_)
            | Self::Connect { .. }
            | Self::Upstream { .. }
            | Self::AuthUnavailable => UNAVAILABLE,
            Self::Timeout { .. } => DEADLINE_EXCEEDED,
            Self::Internal(_) => INTERNAL,
        }
    }

    fn problem(&self) -> Problem {
        match self {
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
        }
    }

    /// `Retry-After`, the rate-limit headers, `WWW-Authenticate`: whatever the answer's form.
    fn add_headers(&self, headers: &mut http::HeaderMap) {
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
    }
}

/// `message` percent-encoded as `grpc-message` wants: printable ASCII but `%` stays.
fn grpc_message(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded_outside_printable_ascii() {
        assert_eq!(grpc_message("no instance of a-b"), "no instance of a-b");
        assert_eq!(grpc_message("100% café\n"), "100%25 caf%C3%A9%0A");
    }

    #[test]
    fn grpc_answers_carry_the_status_and_the_headers_of_the_problem() {
        let answer = GatewayError::Unauthenticated(AuthError::Missing).to_grpc_response();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["grpc-status"], "16");
        assert_eq!(answer.headers()["www-authenticate"], "Bearer");
        let timeout = GatewayError::Timeout {
            service: "s".into(),
            instance: "internal-address:1".into(),
            timeout: Duration::from_secs(1),
        };
        let answer = timeout.to_grpc_response();
        assert_eq!(answer.headers()["grpc-status"], "4");
        let message = answer.headers()["grpc-message"].to_str().unwrap();
        assert!(!message.contains("internal-address"), "{message}");
    }
}
