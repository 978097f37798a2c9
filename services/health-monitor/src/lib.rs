//! The health-monitor: whether every instance is healthy: active checks, states and alerts.
//!
//! [`monitor::Monitor`] follows the registry and checks each instance ([`probe`]) on its
//! schedule; [`tracker`] turns checks into states, [`alerts`] turns states into alerts,
//! [`notify`] delivers them, [`recovery`] calls recovery webhooks; [`api`] shows it all.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod alerts;
pub mod api;
pub mod config;
pub mod docker;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod probe;
pub mod recovery;
mod schema;
pub mod store;
pub mod tracker;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context;
use common::api::Channel;
use common::auth::Authenticator;
use common::config::{CommonConfig, ConfigError, Env};
use common::db::{Db, Migrations};
use common::http::ServerSettings;
use common::readiness::Readiness;
use diesel_migrations::embed_migrations;
use events::{EventMetrics, Publisher, Signal};

pub const NAME: &str = common::api::services::HEALTH_MONITOR;
pub const DEFAULT_PORT: u16 = 8083;

/// The migrations of both backends, embedded in the binary.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: embed_migrations!("../../migrations/health-monitor/postgres"),
    sqlite: embed_migrations!("../../migrations/health-monitor/sqlite"),
};

pub use config::Config;

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
    let readiness = publisher.add_readiness_check(Readiness::new().with_db(db.clone()));
    let settings = ServerSettings::new(&config.common, registry.clone(), readiness);
    let auth = Arc::new(Authenticator::new(
        &config.vault_url,
        config.common.token.clone(),
    ));
    let revocations = events::subscribe(
        config.common.redis_url.as_ref(),
        &[Channel::Vault],
        config.common.resync_interval,
        event_metrics.clone(),
    )?;
    let metrics = metrics::MonitorMetrics::new(&registry)?;
    let monitor = monitor::Monitor::new(config, db, metrics).await?;
    let mut tasks = monitor.start(event_metrics);
    tasks.push(tokio::spawn(follow_revocations(auth.clone(), revocations)));
    let state = actix_web::web::Data::new(api::Api {
        monitor: monitor.clone(),
        auth,
    });
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
    for task in tasks {
        task.abort();
    }
    monitor.leave().await;
    served?;
    Ok(())
}

/// Keeps `auth`'s revoked tokens current: each revocation the vault announces, and the
/// whole list again on every resync (at the start too), for the ones missed; the signing
/// keys too, on every resync, so that a retired one stops being trusted.
async fn follow_revocations(auth: Arc<Authenticator>, mut subscription: events::Subscription) {
    while let Some(signal) = subscription.next().await {
        match signal {
            Signal::Event(envelope) => auth.follow(&envelope.event).await,
            Signal::Resync(_) => auth.resync().await,
        }
    }
}

/// The health-monitor as `main` runs it.
#[derive(Debug)]
pub struct HealthMonitor;

impl common::service::Service for HealthMonitor {
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
