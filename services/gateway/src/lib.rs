//! The gateway: the one door through which traffic enters the fleet.
//!
//! It runs on hyper 1 (DESIGN.md, "Two HTTP stacks"). This file wires the server; the
//! router sends each request to its handler.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::TcpListener;

use common::config::{CommonConfig, ConfigError, Env};
use common::hyper_server::{self, Body, Builtins};
use common::problem::Problem;
use common::readiness::Readiness;
use events::{EventMetrics, Publisher};
use http::{Request, Response};
use hyper::body::Incoming;

pub const NAME: &str = common::api::services::GATEWAY;
pub const DEFAULT_PORT: u16 = 8080;

/// The gateway's configuration, from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env, DEFAULT_PORT)?,
        })
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains open requests.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = common::metrics::new_registry();
    let publisher = Publisher::new(
        config.common.redis_url.as_ref(),
        NAME,
        EventMetrics::new(&registry)?,
    )?;
    let builtins = Builtins::new(
        registry.clone(),
        publisher.add_readiness_check(Readiness::new()),
    );
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let handler = move |req: Request<Incoming>| {
        let builtins = builtins.clone();
        async move { route(&builtins, req).await }
    };
    hyper_server::serve(
        listener,
        &registry,
        handler,
        shutdown,
        config.common.shutdown_timeout,
    )
    .await?;
    Ok(())
}

async fn route(builtins: &Builtins, req: Request<Incoming>) -> Response<Body> {
    if let Some(response) = builtins.respond(req.method(), req.uri().path()).await {
        return response;
    }
    Problem::not_found(format!("no route for {}", req.uri().path())).to_hyper()
}

/// The gateway as `main` runs it.
#[derive(Debug)]
pub struct Gateway;

impl common::service::Service for Gateway {
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
