//! The registry client every service uses: register, heartbeat in the background,
//! register again when the registry forgot the instance (a heartbeat's 404), refresh the
//! credentials on demand, and deregister on a graceful shutdown.
//!
//! A registry that is down is not this service's problem: the client keeps trying with
//! backoff, and the service keeps serving.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::client::HttpClient;
use crate::secret::Secret;

/// What an instance tells the registry about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub name: String,
    pub version: String,
    pub address: String,
    pub port: u16,
    pub health_endpoint: String,
    pub instance_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credentials_needed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

/// The credentials the last registration returned, by name.
pub type Credentials = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error("the registry is unreachable: {0}")]
    Unreachable(String),
    #[error("the registry refused: {0}")]
    Refused(StatusCode),
    #[error("the registry forgot this instance")]
    Forgotten,
}

/// A registered instance, kept alive in the background.
pub struct RegistryClient {
    base: String,
    token: Secret<String>,
    http: HttpClient,
    registration: Registration,
    interval: Mutex<Duration>,
    credentials: watch::Sender<Credentials>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registry", &self.base)
            .field("instance_id", &self.registration.instance_id)
            .finish_non_exhaustive()
    }
}

/// The first retry after a failure, doubling to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl RegistryClient {
    pub fn new(registry_url: &str, token: Secret<String>, registration: Registration) -> Arc<Self> {
        Arc::new(Self {
            base: registry_url.trim_end_matches('/').to_owned(),
            token,
            http: HttpClient::new(Duration::from_secs(5)),
            registration,
            interval: Mutex::new(Duration::from_secs(30)),
            credentials: watch::Sender::new(Credentials::new()),
        })
    }

    /// Whether `service`'s credential `name` is one this instance needs.
    pub fn wants(&self, service: &str, name: &str) -> bool {
        self.registration.name == service
            && self
                .registration
                .credentials_needed
                .iter()
                .any(|n| n == name)
    }

    pub fn instance_id(&self) -> &str {
        &self.registration.instance_id
    }

    /// The current credentials; changes when a (re-)registration brings new ones.
    pub fn credentials(&self) -> watch::Receiver<Credentials> {
        self.credentials.subscribe()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<crate::client::ClientResponse, RegistrationError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            );
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Bytes::from(body.unwrap_or_default()))
            .map_err(|e| RegistrationError::Unreachable(e.to_string()))?;
        self.http
            .send(request)
            .await
            .map_err(|e| RegistrationError::Unreachable(e.to_string()))
    }

    /// Registers (again); the answer's credentials replace the current ones.
    pub async fn register(&self) -> Result<(), RegistrationError> {
        let body = serde_json::to_vec(&self.registration)
            .map_err(|e| RegistrationError::Unreachable(e.to_string()))?;
        let answer = self
            .call(Method::POST, "/api/services/register", Some(body))
            .await?;
        if answer.status != StatusCode::CREATED {
            return Err(RegistrationError::Refused(answer.status));
        }
        let body = answer.json();
        if let Some(seconds) = body["heartbeat_interval_s"].as_f64().filter(|s| *s > 0.0) {
            *self.interval.lock().await = Duration::from_secs_f64(seconds);
        }
        if let Some(credentials) = body["credentials"].as_object() {
            self.credentials.send_replace(credentials.clone());
        }
        if let Some(missing) = body["missing_credentials"]
            .as_array()
            .filter(|m| !m.is_empty())
        {
            tracing::warn!(?missing, "the registry could not provide some credentials");
        }
        Ok(())
    }

    pub async fn heartbeat(&self) -> Result<(), RegistrationError> {
        let path = format!(
            "/api/services/{}/instances/{}/heartbeat",
            self.registration.name, self.registration.instance_id
        );
        let answer = self.call(Method::PUT, &path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistrationError::Forgotten),
            other => Err(RegistrationError::Refused(other)),
        }
    }

    pub async fn deregister(&self) -> Result<(), RegistrationError> {
        let path = format!(
            "/api/services/{}/instances/{}",
            self.registration.name, self.registration.instance_id
        );
        let answer = self.call(Method::DELETE, &path, None).await?;
        match answer.status {
            StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
            other => Err(RegistrationError::Refused(other)),
        }
    }

    /// Registers, then heartbeats every interval, registering again whenever the
    /// registry answers that it does not know the instance. Runs until aborted.
    pub fn start(self: &Arc<Self>) -> JoinHandle<()> {
        let client = self.clone();
        tokio::spawn(async move {
            let mut registered = false;
            let mut backoff = FIRST_BACKOFF;
            loop {
                let outcome = if registered {
                    client.heartbeat().await
                } else {
                    client.register().await
                };
                match outcome {
                    Ok(()) => {
                        if !registered {
                            tracing::info!(registry = %client.base, instance_id = %client.registration.instance_id, "registered");
                        }
                        registered = true;
                        backoff = FIRST_BACKOFF;
                        let interval = *client.interval.lock().await;
                        tokio::time::sleep(interval).await;
                    }
                    Err(RegistrationError::Forgotten) => {
                        tracing::info!("the registry forgot this instance; registering again");
                        registered = false;
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?backoff, "registration or heartbeat failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        })
    }
}

/// The client a Concierge service registers itself with, when `REGISTRY_URL` and
/// `TOKEN_FILE` are both set.
pub fn for_service(
    name: &str,
    common: &crate::config::CommonConfig,
) -> Option<Arc<RegistryClient>> {
    let (Some(url), Some(token)) = (&common.registry_url, &common.token) else {
        if common.registry_url.is_some() {
            tracing::warn!("REGISTRY_URL is set but TOKEN_FILE is not: not registering");
        }
        return None;
    };
    let listen = common.listen_addr;
    let address = common.advertise_address.clone().unwrap_or_else(|| {
        if listen.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            listen.ip().to_string()
        }
    });
    let registration = Registration {
        name: name.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        // Stable across restarts, so that a restart updates rather than duplicates.
        instance_id: format!("{name}-{address}-{}", listen.port()).replace(['[', ']'], ""),
        address,
        port: listen.port(),
        health_endpoint: "/health".into(),
        credentials_needed: Vec::new(),
        dependencies: Vec::new(),
        tags: vec!["control-plane".into()],
        routes: Vec::new(),
    };
    Some(RegistryClient::new(url, token.clone(), registration))
}

/// Every instance the registry knows, in every state (`GET /api/instances`): the full
/// state that consumers of registry events reload on every resync.
pub async fn fetch_instances(
    client: &HttpClient,
    registry_url: &str,
    token: &Secret<String>,
) -> Result<Vec<crate::api::Instance>, crate::client::ClientError> {
    use crate::client::ClientError;
    #[derive(Deserialize)]
    struct List {
        instances: Vec<crate::api::Instance>,
    }
    let url = format!("{}/api/instances", registry_url.trim_end_matches('/'));
    let request = http::Request::get(&url)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        )
        .body(bytes::Bytes::new())
        .map_err(|e| ClientError::InvalidUrl(url.clone(), e.to_string()))?;
    let response = client.send(request).await?;
    if !response.status.is_success() {
        return Err(ClientError::Status(url, response.status));
    }
    let list: List = serde_json::from_slice(&response.body)
        .map_err(|e| ClientError::Body(url, e.to_string()))?;
    Ok(list.instances)
}
