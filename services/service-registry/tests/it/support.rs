//! A registry process for one test, beside a real vault.

use std::time::Duration;

use common::client::{ClientResponse, HttpClient};
use common::db::DatabaseUrl;
use common::testing::{ServiceProcess, VaultFixture};

pub const BINARY: &str = env!("CARGO_BIN_EXE_service-registry");

pub struct Registry {
    pub process: ServiceProcess,
    pub client: HttpClient,
}

impl Registry {
    pub async fn start(vault: &VaultFixture, db: &DatabaseUrl, extra: &[(&str, &str)]) -> Self {
        let vault_url = vault.url();
        let token_file = vault.token_file("service-registry");
        let mut env = vec![
            ("DATABASE_URL", db.expose()),
            ("VAULT_URL", vault_url.as_str()),
            ("TOKEN_FILE", token_file.to_str().unwrap()),
            ("HEARTBEAT_INTERVAL", "200ms"),
            ("DEREGISTER_AFTER", "1s"),
            ("RESYNC_INTERVAL", "300ms"),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key, value));
        }
        let mut process = ServiceProcess::spawn(BINARY, &env);
        process.wait_healthy().await;
        Self {
            process,
            client: HttpClient::new(Duration::from_secs(30)),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> ClientResponse {
        let url = self.process.url(path);
        common::testing::send_json(&self.client, method, &url, token, body).await
    }

    pub async fn register(&self, token: &str, body: serde_json::Value) -> ClientResponse {
        self.call("POST", "/api/services/register", Some(token), Some(body))
            .await
    }

    pub async fn get(&self, path: &str, token: &str) -> ClientResponse {
        self.call("GET", path, Some(token), None).await
    }
}

/// Polls `check` until it holds, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not happen within {within:?}");
}
