//! Errors on the wire: `application/problem+json` (RFC 9457) with a stable `type`.
//!
//! A problem names what went wrong for the client; causes and internals go to the log.
//! Both HTTP stacks render the same [`Problem`]: actix through `ResponseError`
//! (see [`crate::http`]), hyper through [`Problem::to_hyper`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub const CONTENT_TYPE: &str = "application/problem+json";

/// The prefix of every problem `type`: URNs are stable and never pretend to resolve.
pub const TYPE_PREFIX: &str = "urn:concierge:problem:";

/// A problem detail document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `urn:concierge:problem:<code>`; clients branch on this, never on `title` or `detail`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra members, specific to the problem type (e.g. which checks failed).
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem of the given stable `code` (e.g. `not-found`), status and title.
    pub fn new(code: &str, status: u16, title: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind: format!("{TYPE_PREFIX}{code}"),
            title: title.into().into_owned(),
            status,
            detail: None,
            extensions: serde_json::Map::new(),
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_extension(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    /// The code after the prefix, e.g. `not-found`.
    pub fn code(&self) -> &str {
        self.kind.strip_prefix(TYPE_PREFIX).unwrap_or(&self.kind)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new("not-found", 404, "Not Found").with_detail(detail)
    }

    pub fn method_not_allowed() -> Self {
        Self::new("method-not-allowed", 405, "Method Not Allowed")
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(code, 400, "Bad Request").with_detail(detail)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new("payload-too-large", 413, "Payload Too Large")
            .with_detail(format!("the request body exceeds {limit} bytes"))
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new("unavailable", 503, "Service Unavailable").with_detail(detail)
    }

    /// The opaque 500: nothing about the cause reaches the client.
    pub fn internal() -> Self {
        Self::new("internal", 500, "Internal Server Error").with_detail(
            "an unexpected error occurred; quote the X-Request-Id response header to an operator",
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and a JSON map cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The problem as a hyper response, for the gateway's stack.
    pub fn to_hyper(&self) -> http::Response<crate::hyper_server::Body> {
        crate::hyper_server::problem_response(self)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{} ({}): {detail}", self.title, self.status),
            None => write!(f, "{} ({})", self.title, self.status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc9457_members() {
        let problem = Problem::not_found("no credential abc")
            .with_extension("resource", serde_json::json!("abc"));
        let json: serde_json::Value = serde_json::from_slice(&problem.to_json()).unwrap();
        assert_eq!(json["type"], "urn:concierge:problem:not-found");
        assert_eq!(json["status"], 404);
        assert_eq!(json["title"], "Not Found");
        assert_eq!(json["detail"], "no credential abc");
        assert_eq!(json["resource"], "abc");
        assert_eq!(problem.code(), "not-found");
    }
}
