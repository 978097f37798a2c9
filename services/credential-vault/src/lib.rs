//! The credential-vault: the fleet's secrets: encrypted, versioned credentials, signed tokens and the audit log.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::TcpListener;

use anyhow::Context;
use common::config::{CommonConfig, ConfigError, DatabaseConfig, Env};
use common::db::{Db, Migrations};
use common::http::ServerSettings;
use common::readiness::Readiness;
use diesel_migrations::embed_migrations;
use events::{EventMetrics, Publisher};

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
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env, DEFAULT_PORT)?,
            database: DatabaseConfig::from_env(env)?,
        })
    }
}

/// Migrates the database, then serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = common::metrics::new_registry();
    let db = Db::new(&config.database.url, config.database.pool_size);
    let applied = db
        .migrate(&MIGRATIONS)
        .await
        .with_context(|| format!("cannot migrate {}", config.database.url.redacted()))?;
    tracing::info!(backend = db.backend().as_str(), ?applied, "database ready");
    let publisher = Publisher::new(
        config.common.redis_url.as_ref(),
        NAME,
        EventMetrics::new(&registry)?,
    )?;
    let readiness = publisher.add_readiness_check(Readiness::new().with_db(db));
    let settings = ServerSettings::new(&config.common, registry, readiness);
    common::http::serve(settings, listener, |_routes| {}, shutdown).await?;
    Ok(())
}

/// The credential-vault as `main` runs it.
#[derive(Debug)]
pub struct CredentialVault;

impl common::service::Service for CredentialVault {
    type Config = Config;
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = DEFAULT_PORT;

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
}
