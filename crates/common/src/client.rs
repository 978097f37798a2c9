//! The control plane's outgoing HTTP: one small client for calls between Concierge's own
//! services (JWKS now; registration and vault reads later). The gateway's data-plane
//! proxy has its own pooled client; nothing else opens HTTP connections.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

/// The largest answer read from another Concierge service.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

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

/// A pooled HTTP/1.1 client with a timeout per call.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            timeout,
        }
    }

    /// `GET url` and decode the JSON answer of a 2xx response.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, ClientError> {
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| {
            ClientError::InvalidUrl(url.into(), e.to_string())
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::InvalidUrl(
                url.into(),
                "only http:// is supported between Concierge services".into(),
            ));
        }
        let request = Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| ClientError::InvalidUrl(url.into(), e.to_string()))?;
        let call = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| ClientError::Unreachable(url.into(), e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                return Err(ClientError::Status(url.into(), status));
            }
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Body(url.into(), e.to_string()))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| ClientError::Body(url.into(), e.to_string()))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ClientError::Timeout(url.into(), self.timeout))?
    }
}
