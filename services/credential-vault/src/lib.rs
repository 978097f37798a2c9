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
use std::sync::{Arc, RwLock};
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

impl Config {
    /// How long a new signing key is published before it signs: two resyncs, so that
    /// every vault lists it in its JWKS before any token carries its `kid`.
    pub fn signing_key_publication(&self) -> Duration {
        self.common.resync_interval.saturating_mul(2)
    }
}

/// The signing keys in use: the one that signs, and all that verify (in the JWKS).
#[derive(Debug)]
pub struct SigningKeys {
    pub signer: SigningKey,
    pub keys: KeySet,
    pub jwks: Jwks,
}

impl SigningKeys {
    /// The `kid`s that verify.
    pub fn kids(&self) -> std::collections::BTreeSet<&str> {
        self.jwks.keys.iter().map(|key| key.kid.as_str()).collect()
    }
}

/// The vault's own keys, opened from the database.
#[derive(Debug)]
pub struct LoadedKeys {
    pub signing: SigningKeys,
    pub hasher: AuditHasher,
}

/// Which of the signing keys created at these times (oldest first; `true` once retired)
/// verify, and which one signs at `now`: a retired key does neither; the newest key
/// published for `publication` signs, or else the oldest, the one most likely known
/// everywhere (the only one after `init`, or after a rotation that retired the others).
pub fn signing_roles(
    created: &[(chrono::NaiveDateTime, bool)],
    now: chrono::NaiveDateTime,
    publication: Duration,
) -> (Vec<usize>, Option<usize>) {
    let verifying: Vec<usize> = (0..created.len())
        .filter(|&index| !created[index].1)
        .collect();
    // A publication too long to add (an absurd RESYNC_INTERVAL) is never over.
    let published_at = |created: chrono::NaiveDateTime| {
        chrono::Duration::from_std(publication)
            .ok()
            .and_then(|publication| created.checked_add_signed(publication))
    };
    let published = verifying
        .iter()
        .rev()
        .find(|&&index| published_at(created[index].0).is_some_and(|at| at <= now));
    let signer = published.or(verifying.first()).copied();
    (verifying, signer)
}

/// Opens the signing keys and the audit HMAC key; see [`signing_roles`] for which
/// signing keys are in use.
pub async fn load_keys(
    db: &Db,
    keyring: &Keyring,
    publication: Duration,
) -> anyhow::Result<LoadedKeys> {
    let rows = db
        .run(|conn| Ok(store::sealed_keys(conn)))
        .await?
        .context("cannot read the vault's keys")?;
    if rows.is_empty() {
        bail!("the vault is not initialized: run `credential-vault init --out DIR` first");
    }
    let signing_rows: Vec<_> = rows
        .iter()
        .filter(|row| row.purpose == SIGNING_PURPOSE)
        .collect();
    let created: Vec<_> = signing_rows
        .iter()
        .map(|row| (row.created_at, row.retired_at.is_some()))
        .collect();
    let (verifying, signer_index) =
        signing_roles(&created, chrono::Utc::now().naive_utc(), publication);
    let mut signer = None;
    let mut jwks = Jwks::default();
    for index in verifying {
        let row = signing_rows[index];
        let opened = keyring
            .open_key(&row.name, &row.sealed, &row.master_key_id)
            .with_context(|| format!("cannot open the vault key {:?}", row.name))?;
        let key = SigningKey::from_pkcs8(opened).context("a stored signing key is invalid")?;
        jwks.keys.push(key.public_jwk());
        if Some(index) == signer_index {
            signer = Some(key);
        }
    }
    let audit_row = rows
        .iter()
        .find(|row| row.name == AUDIT_KEY_NAME)
        .context("no audit HMAC key")?;
    let audit_key = keyring
        .open_key(&audit_row.name, &audit_row.sealed, &audit_row.master_key_id)
        .with_context(|| format!("cannot open the vault key {:?}", audit_row.name))?;
    Ok(LoadedKeys {
        signing: SigningKeys {
            signer: signer.context("no active signing key: every one is retired")?,
            keys: KeySet::from_jwks(&jwks),
            jwks,
        },
        hasher: AuditHasher::new(audit_key.expose()),
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
    let publication = config.signing_key_publication();
    let LoadedKeys { signing, hasher } = load_keys(&db, &config.keyring, publication).await?;
    tracing::info!(
        signs = signing.signer.kid(),
        verify = ?signing.kids(),
        "signing keys loaded"
    );
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
        signing: RwLock::new(Arc::new(signing)),
        signing_key_publication: publication,
        signing_keys_stale: RwLock::new(None),
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
                    Event::SigningKeysChanged {} => reconciler.follow_signing_keys().await,
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
                    reconciler.follow_signing_keys().await;
                }
            }
        }
    });
    let checked = vault.clone();
    let readiness = publisher.add_readiness_check(Readiness::new().with_db(db).with_check(
        "signing_keys",
        move || {
            let vault = checked.clone();
            async move { vault.check_signing_keys().await }
        },
    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_signs_once_published_and_a_retired_one_does_nothing() {
        let start = chrono::NaiveDate::from_ymd_opt(2026, 11, 25)
            .and_then(|day| day.and_hms_opt(8, 0, 0))
            .unwrap_or_default();
        let at = |seconds: i64| start + chrono::Duration::seconds(seconds);
        let publication = Duration::from_secs(60);

        // The first key signs at once: there is no other.
        assert_eq!(
            signing_roles(&[(at(0), false)], at(0), publication),
            (vec![0], Some(0))
        );
        // A rotation at 100 s: both verify; the old key signs until the new one has been
        // published for a minute.
        let rotated = [(at(0), false), (at(100), false)];
        assert_eq!(
            signing_roles(&rotated, at(159), publication),
            (vec![0, 1], Some(0))
        );
        assert_eq!(
            signing_roles(&rotated, at(160), publication),
            (vec![0, 1], Some(1))
        );
        // The old key retired with the rotation (it leaked): the new one signs at once,
        // the old one no longer verifies.
        assert_eq!(
            signing_roles(&[(at(0), true), (at(100), false)], at(100), publication),
            (vec![1], Some(1))
        );
        // A rotation soon after `init`: neither key is published long enough, and the
        // older one keeps signing.
        assert_eq!(
            signing_roles(&[(at(0), false), (at(1), false)], at(2), publication),
            (vec![0, 1], Some(0))
        );
        // Two rotations within a minute: the newest published key signs.
        assert_eq!(
            signing_roles(
                &[(at(0), false), (at(100), false), (at(130), false)],
                at(165),
                publication
            ),
            (vec![0, 1, 2], Some(1))
        );
        // Everything retired: nothing signs (the vault refuses to start so).
        assert_eq!(
            signing_roles(&[(at(0), true)], at(0), publication),
            (vec![], None)
        );
    }
}
