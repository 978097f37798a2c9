//! The service-registry: where every service instance lives: registration, heartbeats and discovery.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod api;
pub mod catalog;
pub mod error;
pub mod schema;
pub mod state;
pub mod store;

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use common::api::Channel;
use common::auth::Authenticator;
use common::client::HttpClient;
use common::config::{CommonConfig, ConfigError, DatabaseConfig, Env};
use common::db::{Db, Migrations};
use common::http::ServerSettings;
use common::readiness::Readiness;
use diesel_migrations::embed_migrations;
use events::{EventMetrics, Publisher, Signal};

use crate::catalog::Catalog;
use crate::state::{RegistryMetrics, State};

pub const NAME: &str = common::api::services::SERVICE_REGISTRY;
pub const DEFAULT_PORT: u16 = 8082;

/// The migrations of both backends, embedded in the binary.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: embed_migrations!("../../migrations/service-registry/postgres"),
    sqlite: embed_migrations!("../../migrations/service-registry/sqlite"),
};

/// The service-registry's configuration, from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub database: DatabaseConfig,
    /// `VAULT_URL`: where the JWKS, the revocation list and credentials come from.
    pub vault_url: String,
    /// `HEARTBEAT_INTERVAL`: how often instances should beat; TTL is three of them.
    pub heartbeat_interval: Duration,
    /// `DEREGISTER_AFTER`: how long an instance stays offline before it is removed.
    pub deregister_after: Duration,
    /// `FLAP_THRESHOLD` and `FLAP_WINDOW`: more state changes than the threshold within the
    /// window and an instance is flapping, held out of discovery until a quiet window.
    pub flap_threshold: usize,
    pub flap_window: Duration,
    /// `HISTORY_RETENTION`: how long each instance's state changes are kept.
    pub history_retention: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let vault_url: String = env.or("VAULT_URL", "http://127.0.0.1:8081".to_owned())?;
        if !vault_url.starts_with("http://") {
            return Err(ConfigError::new("VAULT_URL", "expected an http:// URL"));
        }
        let heartbeat_interval = env.duration_or("HEARTBEAT_INTERVAL", Duration::from_secs(30))?;
        if heartbeat_interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "HEARTBEAT_INTERVAL",
                "must be at least 100ms",
            ));
        }
        Ok(Self {
            common: CommonConfig::from_env(env, DEFAULT_PORT)?,
            database: DatabaseConfig::from_env(env)?,
            vault_url,
            heartbeat_interval,
            deregister_after: env.duration_or("DEREGISTER_AFTER", Duration::from_secs(600))?,
            flap_threshold: env.or("FLAP_THRESHOLD", 5usize)?,
            flap_window: env.duration_or("FLAP_WINDOW", Duration::from_secs(300))?,
            history_retention: env.duration_or("HISTORY_RETENTION", Duration::from_secs(86_400))?,
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
    let event_metrics = EventMetrics::new(&registry)?;
    let publisher = Publisher::new(
        config.common.redis_url.as_ref(),
        NAME,
        event_metrics.clone(),
    )?;
    let state = web::Data::new(State {
        db: db.clone(),
        catalog: Catalog::default(),
        auth: Authenticator::new(&config.vault_url, config.common.token.clone()),
        publisher: publisher.clone(),
        vault_url: config.vault_url.trim_end_matches('/').to_owned(),
        client: HttpClient::new(Duration::from_secs(5)),
        heartbeat_interval: config.heartbeat_interval,
        deregister_after: config.deregister_after,
        metrics: RegistryMetrics::new(&registry)?,
        expired: std::sync::Mutex::default(),
        transitions: std::sync::Mutex::default(),
        flap_threshold: config.flap_threshold,
        flap_window: config.flap_window,
        history_retention: config.history_retention,
    });
    state
        .reload()
        .await
        .context("cannot load the registrations")?;

    // Events make the catalog fast to follow other registries; reloads make it right.
    let mut subscription = events::subscribe(
        config.common.redis_url.as_ref(),
        &[Channel::Registry, Channel::Health, Channel::Vault],
        config.common.resync_interval,
        event_metrics,
    )?;
    let follower = state.clone();
    let follow = tokio::spawn(async move {
        while let Some(signal) = subscription.next().await {
            match signal {
                Signal::Event(envelope) => {
                    follower.auth.follow(&envelope.event).await;
                    follower.apply(envelope.event);
                }
                Signal::Resync(_) => {
                    if let Err(error) = follower.reload().await {
                        tracing::warn!(%error, "cannot reload the catalog; will retry");
                    }
                    follower.auth.resync().await;
                }
            }
        }
    });
    let sweeper = state.clone();
    let every =
        (config.heartbeat_interval / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let sweep = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = std::time::Instant::now();
        loop {
            ticker.tick().await;
            sweeper.sweep().await;
            if last_prune.elapsed() > Duration::from_secs(60) {
                sweeper.prune_history().await;
                last_prune = std::time::Instant::now();
            }
        }
    });

    let readiness = publisher.add_readiness_check(Readiness::new().with_db(db));
    let settings = ServerSettings::new(&config.common, registry, readiness);
    let served = common::http::serve(
        settings,
        listener,
        move |routes| {
            routes.app_data(state.clone());
            api::routes(routes);
        },
        shutdown,
    )
    .await;
    follow.abort();
    sweep.abort();
    served?;
    Ok(())
}

/// The service-registry as `main` runs it.
#[derive(Debug)]
pub struct ServiceRegistry;

impl common::service::Service for ServiceRegistry {
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
