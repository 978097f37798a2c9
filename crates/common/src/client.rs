//! The control plane's outgoing HTTP: one small client for calls between Concierge's own
//! services (JWKS now; registration and vault reads later). The gateway's data-plane
//! proxy has its own pooled client; nothing else opens HTTP connections.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
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
    inner: Client<HttpConnector<Resolver>, Full<Bytes>>,
    timeout: Duration,
}

/// How long an idle connection stays in the pool.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

impl HttpClient {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
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
        // A literal address is never resolved, so never filtered by `Resolver`.
        let host = request.uri().host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Some(why) = host
            .parse::<IpAddr>()
            .ok()
            .and_then(crate::address::refused)
        {
            return Err(ClientError::InvalidUrl(
                url,
                format!("{host} is {why}, never connected to"),
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

/// The system's resolver, leaving out the addresses no Concierge service connects to
/// ([`crate::address`]): a webhook a registration names, say, must not reach the cloud's
/// metadata service through a name that resolves there (`metadata.google.internal`).
#[derive(Debug, Clone)]
struct Resolver(GaiResolver);

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolving = self.0.call(name.clone());
        Box::pin(async move { usable(name.as_str(), resolving.await?.collect()) })
    }
}

/// The addresses `name` resolved to that may be connected to; an error if it resolved
/// only to others.
fn usable(
    name: &str,
    found: Vec<SocketAddr>,
) -> Result<std::vec::IntoIter<SocketAddr>, std::io::Error> {
    let refused = found
        .iter()
        .find_map(|address| crate::address::refused(address.ip()).map(|why| (address, why)));
    let kept: Vec<SocketAddr> = found
        .iter()
        .copied()
        .filter(|address| crate::address::refused(address.ip()).is_none())
        .collect();
    match refused {
        Some((address, why)) if kept.is_empty() => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{name} resolves to {}, {why}: never connected to",
                address.ip()
            ),
        )),
        _ => Ok(kept.into_iter()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_metadata_address_is_never_called() {
        let client = HttpClient::new(Duration::from_secs(5));
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/latest/meta-data/",
            "http://[::ffff:169.254.169.254]:80/",
        ] {
            let request = Request::get(url).body(Bytes::new()).unwrap();
            let error = client.send(request).await.unwrap_err();
            assert!(
                matches!(&error, ClientError::InvalidUrl(_, why) if why.contains("metadata")),
                "{url}: {error}"
            );
        }
    }

    #[test]
    fn a_name_keeps_only_the_addresses_that_may_be_called() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let mixed = usable("mixed", vec![at("169.254.169.254:80"), at("10.0.0.7:80")]).unwrap();
        assert_eq!(mixed.collect::<Vec<_>>(), [at("10.0.0.7:80")]);
        let error = usable("metadata.google.internal", vec![at("169.254.169.254:80")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("metadata.google.internal resolves to 169.254.169.254"),
            "{error}"
        );
        assert!(usable("nothing", vec![]).unwrap().next().is_none());
    }
}
