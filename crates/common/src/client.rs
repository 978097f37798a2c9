//! The control plane's outgoing HTTP: one small client for calls between Concierge's own
//! services (JWKS now; registration and vault reads later). The gateway's data-plane
//! proxy has its own pooled client; nothing else opens HTTP connections.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

/// The largest answer read from another Concierge service (the full catalog of 10,000
/// instances is about 5 MiB).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {0:?}: {1}")]
    InvalidUrl(String, String),
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0} answered {1}")]
    Status(String, StatusCode),
    #[error("{0} sent an unreadable body: {1}")]
    Body(String, String),
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl ClientResponse {
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A pooled HTTP/1.1 client with a timeout per call.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

/// How long an idle connection stays in the pool.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

impl HttpClient {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            // Below the servers' keep-alive (actix-web's 5 s): a connection the server
            // is closing at that moment is never picked for a request, which would then
            // fail half-sent.
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build(connector),
            timeout,
        }
    }

    /// `GET url` and decode the JSON answer of a 2xx response.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, ClientError> {
        let request = Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Bytes::new())
            .map_err(|e| ClientError::InvalidUrl(url.into(), e.to_string()))?;
        let response = self.send(request).await?;
        if !response.status.is_success() {
            return Err(ClientError::Status(url.into(), response.status));
        }
        serde_json::from_slice(&response.body)
            .map_err(|e| ClientError::Body(url.into(), e.to_string()))
    }

    /// Sends `request` and reads the whole answer, whatever its status.
    pub async fn send(&self, request: Request<Bytes>) -> Result<ClientResponse, ClientError> {
        let url = request.uri().to_string();
        if request.uri().scheme_str() != Some("http") {
            return Err(ClientError::InvalidUrl(
                url,
                "only http:// is supported between Concierge services".into(),
            ));
        }
        let request = request.map(Full::new);
        let call = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| ClientError::Unreachable(url.clone(), e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Body(url.clone(), e.to_string()))?
                .to_bytes();
            Ok(ClientResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ClientError::Timeout(url.clone(), self.timeout))?
    }
}
