//! The credential-vault: the fleet's secrets (encrypted, versioned, scoped) and the root
//! of trust (it signs the tokens every service verifies), with a tamper-evident audit log.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod api;
pub mod audit;
pub mod cli;
pub mod crypto;
pub mod error;
pub mod metrics;
pub mod schema;
pub mod store;
pub mod vault;

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::RwLock;
use std::time::Duration;

use actix_web::web;
use anyhow::{Context, bail};
use common::api::{Channel, Event};
use common::auth::{Jwks, KeySet, SigningKey};
use common::config::{CommonConfig, ConfigError, DatabaseConfig, Env};
use common::db::{Db, Migrations};
use common::forwarded::TrustedProxies;
use common::http::ServerSettings;
use common::readiness::Readiness;
use common::secret::Secret;
use diesel_migrations::embed_migrations;
use events::{EventMetrics, Publisher, Signal};

use crate::audit::AuditLog;
use crate::crypto::{AuditHasher, Keyring, MasterKey};
use crate::metrics::VaultMetrics;
use crate::vault::{AUDIT_KEY_NAME, SIGNING_PURPOSE, SnapshotCache, Vault};

pub const NAME: &str = common::api::services::CREDENTIAL_VAULT;
pub const DEFAULT_PORT: u16 = 8081;

/// The migrations of both backends, embedded in the binary.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: embed_migrations!("../../migrations/credential-vault/postgres"),
    sqlite: embed_migrations!("../../migrations/credential-vault/sqlite"),
};

/// The credential-vault's configuration, from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub database: DatabaseConfig,
    /// `VAULT_MASTER_KEY_FILE` (seals) plus `VAULT_EXTRA_MASTER_KEY_FILES` (only open).
    pub keyring: Keyring,
    /// `VAULT_DEV_MODE`: set by `cargo xtask up`, whose master key sits beside the data.
    pub dev_mode: bool,
    /// `VAULT_DEFAULT_GRACE_PERIOD`: how long reads return the previous value after a rotation.
    pub default_grace: Duration,
    /// `VAULT_MAX_TOKEN_TTL`: the longest a token issued through the API may live.
    pub max_token_ttl: Duration,
    /// `VAULT_CACHE_TTL`: how long a read credential is served from memory (0 turns it
    /// off). Local changes and other vaults' events invalidate sooner.
    pub cache_ttl: Duration,
    /// `VAULT_TRUSTED_PROXIES`: the proxies (the gateway) whose `X-Forwarded-For` names
    /// the client in audit records; empty, the TCP peer is the client.
    pub trusted_proxies: TrustedProxies,
}

fn master_key(var: &str, text: &Secret<String>) -> Result<MasterKey, ConfigError> {
    MasterKey::from_base64(text).map_err(|e| ConfigError::new(var, e.to_string()))
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        const KEY_VAR: &str = "VAULT_MASTER_KEY_FILE";
        const EXTRA_VAR: &str = "VAULT_EXTRA_MASTER_KEY_FILES";
        let text = env
            .secret_file(KEY_VAR)?
            .ok_or_else(|| ConfigError::new(KEY_VAR, "is required but not set"))?;
        let current = master_key(KEY_VAR, &text)?;
        let mut extra = Vec::new();
        for path in env
            .raw(EXTRA_VAR)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let text = common::config::read_secret_file(std::path::Path::new(path))
                .map_err(|problem| ConfigError::new(EXTRA_VAR, problem))?;
            extra.push(master_key(EXTRA_VAR, &text)?);
        }
        let default_grace =
            env.duration_or("VAULT_DEFAULT_GRACE_PERIOD", Duration::from_secs(3600))?;
        let max_token_ttl =
            env.duration_or("VAULT_MAX_TOKEN_TTL", Duration::from_secs(365 * 24 * 3600))?;
        if max_token_ttl < Duration::from_secs(60) {
            return Err(ConfigError::new(
                "VAULT_MAX_TOKEN_TTL",
                "must be at least 60s",
            ));
        }
        Ok(Self {
            common: CommonConfig::from_env(env, DEFAULT_PORT)?,
            database: DatabaseConfig::from_env(env)?,
            keyring: Keyring::new(current, extra),
            dev_mode: env.or("VAULT_DEV_MODE", false)?,
            default_grace,
            max_token_ttl,
            cache_ttl: env.duration_or("VAULT_CACHE_TTL", Duration::from_secs(1))?,
            trusted_proxies: env.or("VAULT_TRUSTED_PROXIES", TrustedProxies::default())?,
        })
    }
}

/// The vault's own keys, opened from the database.
#[derive(Debug)]
pub struct LoadedKeys {
    pub signer: SigningKey,
    pub keys: KeySet,
    pub jwks: Jwks,
    pub hasher: AuditHasher,
}

/// Opens the signing keys (the newest signs; all verify) and the audit HMAC key.
pub async fn load_keys(db: &Db, keyring: &Keyring) -> anyhow::Result<LoadedKeys> {
    let rows = db
        .run(|conn| Ok(store::sealed_keys(conn)))
        .await?
        .context("cannot read the vault's keys")?;
    if rows.is_empty() {
        bail!("the vault is not initialized: run `credential-vault init --out DIR` first");
    }
    let mut signer = None;
    let mut jwks = Jwks::default();
    let mut hasher = None;
    for row in &rows {
        let opened = keyring
            .open_key(&row.name, &row.sealed, &row.master_key_id)
            .with_context(|| format!("cannot open the vault key {:?}", row.name))?;
        if row.purpose == SIGNING_PURPOSE {
            let key = SigningKey::from_pkcs8(opened).context("a stored signing key is invalid")?;
            jwks.keys.push(key.public_jwk());
            if row.retired_at.is_none() {
                signer = Some(key);
            }
        } else if row.name == AUDIT_KEY_NAME {
            hasher = Some(AuditHasher::new(opened.expose()));
        }
    }
    Ok(LoadedKeys {
        signer: signer.context("no active signing key")?,
        keys: KeySet::from_jwks(&jwks),
        jwks,
        hasher: hasher.context("no audit HMAC key")?,
    })
}

/// Migrates, opens the keys, then serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.dev_mode {
        tracing::warn!(
            "DEV MODE: the master key was generated by `cargo xtask up` and sits beside the data in ./.data; never use it for real secrets"
        );
    }
    if !config.trusted_proxies.is_empty() {
        // Who may name the client in audit records: worth seeing at every start.
        tracing::info!(trusted_proxies = %config.trusted_proxies, "X-Forwarded-For is read from these peers");
    }
    let registry = common::metrics::new_registry();
    let db = Db::new(&config.database.url, config.database.pool_size);
    let applied = db
        .migrate(&MIGRATIONS)
        .await
        .with_context(|| format!("cannot migrate {}", config.database.url.redacted()))?;
    tracing::info!(backend = db.backend().as_str(), ?applied, "database ready");
    let LoadedKeys {
        signer,
        keys,
        jwks,
        hasher,
    } = load_keys(&db, &config.keyring).await?;
    let metrics = VaultMetrics::new(&registry)?;
    let event_metrics = EventMetrics::new(&registry)?;
    let publisher = Publisher::new(
        config.common.redis_url.as_ref(),
        NAME,
        event_metrics.clone(),
    )?;
    let vault = web::Data::new(Vault {
        audit: AuditLog::start(db.clone(), metrics.clone(), hasher.clone())
            .context("cannot start the audit writer")?,
        db: db.clone(),
        keyring: config.keyring.clone(),
        signer,
        keys,
        jwks,
        hasher,
        publisher: publisher.clone(),
        metrics,
        revoked: RwLock::new(HashSet::new()),
        default_grace: config.default_grace,
        max_token_ttl: config.max_token_ttl,
        trusted_proxies: config.trusted_proxies.clone(),
        snapshots: SnapshotCache::new(config.cache_ttl),
        verified: common::auth::VerifiedTokens::default(),
    });
    vault
        .reload_revoked()
        .await
        .context("cannot load revoked tokens")?;
    vault
        .refresh_key_wear()
        .await
        .context("cannot count the versions per master key")?;
    let mut subscription = events::subscribe(
        config.common.redis_url.as_ref(),
        &[Channel::Vault],
        config.common.resync_interval,
        event_metrics,
    )?;
    let reconciler = vault.clone();
    let reconcile = tokio::spawn(async move {
        while let Some(signal) = subscription.next().await {
            match signal {
                Signal::Event(envelope) => match envelope.event {
                    Event::TokenRevoked { id } => reconciler.mark_revoked(id),
                    Event::CredentialRotated { id, .. } | Event::CredentialDeleted { id, .. } => {
                        reconciler.snapshots.invalidate(&id);
                    }
                    _ => {}
                },
                Signal::Resync(_) => {
                    reconciler.snapshots.clear();
                    if let Err(error) = reconciler.reload_revoked().await {
                        tracing::warn!(%error, "cannot reload revoked tokens; will retry");
                    }
                    if let Err(error) = reconciler.refresh_key_wear().await {
                        tracing::warn!(%error, "cannot count the versions per master key; will retry");
                    }
                }
            }
        }
    });
    let readiness = publisher.add_readiness_check(Readiness::new().with_db(db));
    let settings = ServerSettings::new(&config.common, registry, readiness);
    let served = common::http::serve(
        settings,
        listener,
        move |routes| {
            routes.app_data(vault.clone());
            api::routes(routes);
        },
        shutdown,
    )
    .await;
    reconcile.abort();
    served?;
    Ok(())
}

/// The credential-vault as `main` runs it.
#[derive(Debug)]
pub struct CredentialVault;

impl common::service::Service for CredentialVault {
    type Config = Config;
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = DEFAULT_PORT;
    const SUBCOMMANDS: &'static str = cli::USAGE;

    fn load(env: &Env) -> Result<Config, ConfigError> {
        Config::from_env(env)
    }

    fn common(config: &Config) -> &CommonConfig {
        &config.common
    }

    fn run(
        config: Config,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = anyhow::Result<()>> {
        run(config, listener, shutdown)
    }

    fn subcommand(name: &str, args: &[String], env: &Env) -> Option<ExitCode> {
        cli::run(name, args, env)
    }
}
