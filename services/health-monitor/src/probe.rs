//! One check of one instance, over HTTP or TCP, with the reason of every failure:
//! `dns`, `connect`, `timeout`, `status` or `body` (what blackbox_exporter users ask for).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::time::timeout_at;

/// The largest health-endpoint body read.
const MAX_BODY: usize = 64 * 1024;

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The address did not resolve.
    Dns,
    /// Nothing accepted the connection, or it broke before an answer.
    Connect,
    /// No answer within the check's timeout.
    Timeout,
    /// An answer outside 2xx.
    Status,
    /// A body that says the instance is down, or that could not be read.
    Body,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dns => "dns",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Status => "status",
            Self::Body => "body",
        }
    }
}

/// Why a passing check is still a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warning {
    /// The body said `{"status": "degraded"}`.
    Degraded,
    /// Slower than the slow threshold.
    Slow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Warn(Warning),
    Fail(Reason),
}

/// A check's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub verdict: Verdict,
    pub latency: Duration,
    /// What happened, for people (no secrets: addresses and status codes only).
    pub detail: String,
}

/// How to check an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET path`: 2xx passes.
    Http { path: String },
    /// A TCP connection that is accepted passes.
    Tcp,
}

/// Checks `address:port` within `timeout`; slower than `slow` is a warning.
pub async fn check(
    address: &str,
    port: u16,
    method: &Method,
    timeout: Duration,
    slow: Duration,
) -> Probe {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let result = attempt(address, port, method, deadline).await;
    let latency = started.elapsed();
    match result {
        Ok(verdict) => {
            let verdict = match verdict {
                Verdict::Pass if latency > slow => Verdict::Warn(Warning::Slow),
                other => other,
            };
            let detail = match verdict {
                Verdict::Pass => "passed".to_owned(),
                Verdict::Warn(Warning::Slow) => {
                    format!("answered in {latency:?}, slower than {slow:?}")
                }
                Verdict::Warn(Warning::Degraded) => "reports itself degraded".to_owned(),
                Verdict::Fail(_) => "failed".to_owned(),
            };
            Probe {
                verdict,
                latency,
                detail,
            }
        }
        Err((reason, detail)) => Probe {
            verdict: Verdict::Fail(reason),
            latency,
            detail,
        },
    }
}

type Failure = (Reason, String);

async fn attempt(
    address: &str,
    port: u16,
    method: &Method,
    deadline: tokio::time::Instant,
) -> Result<Verdict, Failure> {
    let timed_out = || {
        (
            Reason::Timeout,
            "no answer within the check timeout".to_owned(),
        )
    };
    let mut addresses = timeout_at(deadline, tokio::net::lookup_host((address, port)))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| (Reason::Dns, format!("{address} does not resolve: {e}")))?;
    let target = addresses
        .next()
        .ok_or_else(|| (Reason::Dns, format!("{address} resolves to nothing")))?;
    let stream = timeout_at(deadline, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| (Reason::Connect, format!("cannot connect to {target}: {e}")))?;
    let Method::Http { path } = method else {
        return Ok(Verdict::Pass);
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = timeout_at(
        deadline,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(|e| (Reason::Connect, format!("HTTP handshake failed: {e}")))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(path.as_str())
        .header(http::header::HOST, format!("{address}:{port}"))
        .header(http::header::USER_AGENT, "concierge-health-monitor")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| {
            (
                Reason::Connect,
                format!("invalid health endpoint {path:?}: {e}"),
            )
        })?;
    let answer = timeout_at(deadline, sender.send_request(request)).await;
    let response = match answer {
        Err(_) => {
            driver.abort();
            return Err(timed_out());
        }
        Ok(Err(e)) => {
            driver.abort();
            return Err((Reason::Connect, format!("the connection broke: {e}")));
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    let body = timeout_at(
        deadline,
        Limited::new(response.into_body(), MAX_BODY).collect(),
    )
    .await;
    driver.abort();
    let body = match body {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err((Reason::Body, format!("the body could not be read: {e}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if !status.is_success() {
        return Err((Reason::Status, format!("answered {}", status.as_u16())));
    }
    judge_body(&body).map_err(|said| (Reason::Body, format!("the body says {said:?}")))
}

/// A health body's own verdict: `{"status": "degraded"}` warns, a status that means down
/// fails; anything else (or no JSON at all) passes on the 2xx alone.
fn judge_body(body: &[u8]) -> Result<Verdict, String> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(Verdict::Pass);
    };
    match json.get("status").and_then(|s| s.as_str()) {
        Some(status) => match status.to_ascii_lowercase().as_str() {
            "degraded" | "warn" | "warning" => Ok(Verdict::Warn(Warning::Degraded)),
            "down" | "fail" | "failed" | "unhealthy" | "offline" | "error" => {
                Err(status.chars().take(32).collect())
            }
            _ => Ok(Verdict::Pass),
        },
        None => Ok(Verdict::Pass),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_judge_themselves() {
        assert_eq!(judge_body(br#"{"status":"ok"}"#), Ok(Verdict::Pass));
        assert_eq!(judge_body(b"plain text"), Ok(Verdict::Pass));
        assert_eq!(
            judge_body(br#"{"status":"Degraded"}"#),
            Ok(Verdict::Warn(Warning::Degraded))
        );
        assert_eq!(judge_body(br#"{"status":"down"}"#), Err("down".to_owned()));
    }
}
