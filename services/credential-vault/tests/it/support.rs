//! A vault for one test: its own database, master key and tokens, as a real process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::client::{ClientResponse, HttpClient};
use common::config::Env;
use common::db::{Backend, DatabaseUrl, Db};
use common::testing::{ServiceProcess, TestDb, run_binary};

pub const BINARY: &str = env!("CARGO_BIN_EXE_credential-vault");

/// An initialized vault database: master key file, admin and control-plane tokens.
pub struct Fixture {
    pub url: DatabaseUrl,
    _db: Option<TestDb>,
    pub dir: tempfile::TempDir,
    pub master_key: PathBuf,
    pub tokens: HashMap<String, String>,
}

impl Fixture {
    pub fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend);
        let url = db.url.clone();
        Self::init(url, Some(db))
    }

    /// On a database the test provides (e.g. its own PostgreSQL server).
    pub fn on(url: DatabaseUrl) -> Self {
        Self::init(url, None)
    }

    fn init(url: DatabaseUrl, db: Option<TestDb>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master_key = dir.path().join("master-key");
        generate_key(&master_key);
        let tokens_dir = dir.path().join("tokens");
        let env = [
            ("DATABASE_URL", url.expose()),
            ("VAULT_MASTER_KEY_FILE", master_key.to_str().unwrap()),
        ];
        let init = run_binary(
            BINARY,
            &["init", "--out", tokens_dir.to_str().unwrap()],
            &env,
        );
        assert!(
            init.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let stdout = String::from_utf8_lossy(&init.stdout);
        assert_eq!(
            mode(&tokens_dir),
            0o700,
            "the token folder must be owner-only"
        );
        let mut tokens = HashMap::new();
        for entry in std::fs::read_dir(&tokens_dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            assert_eq!(mode(&path), 0o600, "{} must be owner-only", path.display());
            let token = std::fs::read_to_string(entry.path()).unwrap();
            assert!(!stdout.contains(&token), "init printed a token");
            let name = entry.file_name().into_string().unwrap();
            tokens.insert(name.trim_end_matches("-token").to_owned(), token);
        }
        Self {
            url,
            _db: db,
            dir,
            master_key,
            tokens,
        }
    }

    pub fn admin(&self) -> &str {
        &self.tokens["admin"]
    }

    /// The environment a vault process needs, plus `extra`.
    pub fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("DATABASE_URL", self.url.expose()),
            ("VAULT_MASTER_KEY_FILE", self.master_key.to_str().unwrap()),
            ("RESYNC_INTERVAL", "1s"),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key, value));
        }
        env
    }

    pub async fn start(&self) -> Vault {
        self.start_with(&[]).await
    }

    pub async fn start_with(&self, extra: &[(&str, &str)]) -> Vault {
        let mut process = ServiceProcess::spawn(BINARY, &self.env(extra));
        process.wait_healthy().await;
        Vault {
            process,
            client: HttpClient::new(Duration::from_secs(20)),
        }
    }

    /// A direct connection to the vault's database, for tests that tamper with it.
    pub fn db(&self) -> Db {
        Db::new(&self.url, 1)
    }

    /// The vault's signing key, opened with the master key: to forge expired tokens.
    pub async fn signing_key(&self) -> common::auth::SigningKey {
        let env = Env::from_pairs(self.env(&[]));
        let config = credential_vault::Config::from_env(&env).unwrap();
        credential_vault::load_keys(
            &self.db(),
            &config.keyring,
            config.signing_key_publication(),
        )
        .await
        .unwrap()
        .signing
        .signer
    }
}

pub fn generate_key(path: &std::path::Path) {
    let out = run_binary(
        BINARY,
        &["generate-master-key", "--out", path.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(path), 0o600, "the master key must be owner-only");
}

/// The permission bits of `path`.
pub fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A running vault process and a client for it.
pub struct Vault {
    pub process: ServiceProcess,
    pub client: HttpClient,
}

impl Vault {
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

    /// A `PUT` of `body` with an `If-Match` header.
    pub async fn put_if_match(
        &self,
        path: &str,
        token: &str,
        if_match: &str,
        body: serde_json::Value,
    ) -> ClientResponse {
        let request = http::Request::put(self.process.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("if-match", if_match)
            .body(bytes::Bytes::from(body.to_string()))
            .unwrap();
        self.client.send(request).await.unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> ClientResponse {
        self.call("GET", path, Some(token), None).await
    }

    /// Creates a credential as `admin` and returns its id.
    pub async fn create(&self, admin: &str, body: serde_json::Value) -> String {
        let created = self
            .call("POST", "/api/credentials", Some(admin), Some(body))
            .await;
        assert_eq!(created.status, 201, "{:?}", created.json());
        created.json()["id"].as_str().unwrap().to_owned()
    }

    /// Issues a token for `service` as `admin`; returns (id, token).
    pub async fn issue(&self, admin: &str, service: &str) -> (String, String) {
        let issued = self
            .call(
                "POST",
                "/api/tokens",
                Some(admin),
                Some(serde_json::json!({ "service": service })),
            )
            .await;
        assert_eq!(issued.status, 201, "{:?}", issued.json());
        let body = issued.json();
        (
            body["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }

    /// Asserts that none of `secrets` appears anywhere in the process's output.
    pub fn assert_never_logged(&self, secrets: &[&str]) {
        let output = self.process.output();
        for secret in secrets {
            assert!(
                !output.contains(secret),
                "a secret value reached the logs: {secret}"
            );
        }
    }
}
