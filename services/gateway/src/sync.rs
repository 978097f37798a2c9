//! Keeping the route table in step with the registry (DESIGN.md, "Events"): the full list
//! of instances at start, on every (re)connect and every `RESYNC_INTERVAL`, and each
//! registry and health event in between. Token revocations from the vault ride along.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::api::{Channel, Event, Instance};
use common::client::{ClientError, HttpClient};
use common::secret::Secret;
use events::{EventMetrics, EventsError, Signal, Subscription};

use crate::Shared;
use crate::table::Table;

/// Where the instances come from.
#[derive(Debug)]
pub struct Source {
    pub registry_url: String,
    pub token: Secret<String>,
    pub client: HttpClient,
}

impl Source {
    async fn load(&self) -> Result<BTreeMap<String, Instance>, ClientError> {
        let instances =
            common::registration::fetch_instances(&self.client, &self.registry_url, &self.token)
                .await?;
        Ok(instances
            .into_iter()
            .map(|i| (i.instance_id.clone(), i))
            .collect())
    }
}

/// Subscribes to the registry's, the monitor's and the vault's events, and to the resync
/// timer, before the gateway serves. It fails only on a Redis URL that cannot be used
/// (which the event publisher refuses earlier); a Redis server that is down is retried
/// by the subscription, and `/ready` waits for the first load of the routes.
pub fn subscribe(shared: &Shared, metrics: EventMetrics) -> Result<Subscription, EventsError> {
    events::subscribe(
        shared.config.common.redis_url.as_ref(),
        &[Channel::Registry, Channel::Health, Channel::Vault],
        shared.config.common.resync_interval,
        metrics,
    )
}

/// Follows the registry until the process ends.
pub async fn follow(shared: Arc<Shared>, source: Option<Source>, mut subscription: Subscription) {
    let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
    while let Some(signal) = subscription.next().await {
        let changed = match signal {
            Signal::Resync(_) => {
                close_idle_connections(&shared);
                if let Some(auth) = &shared.auth {
                    auth.resync().await;
                }
                match &source {
                    Some(source) => match source.load().await {
                        Ok(fresh) => {
                            shared.loaded.store(true, Ordering::Relaxed);
                            instances = fresh;
                            Some("resync")
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot load the instances; keeping the routes as they are");
                            None
                        }
                    },
                    None => Some("resync"),
                }
            }
            Signal::Event(envelope) => {
                if let Some(auth) = &shared.auth {
                    auth.follow(&envelope.event).await;
                }
                apply(&mut instances, envelope.event)
            }
        };
        if let Some(cause) = changed {
            rebuild(&shared, &instances, cause);
        }
    }
}

/// Closes the connections to instances that have sat idle too long, at every resync.
fn close_idle_connections(shared: &Shared) {
    let table = shared.table.load();
    let endpoints = table.pools().flat_map(|pool| &pool.endpoints);
    shared.upstreams.close_idle(endpoints);
}

/// Applies one event; `Some` when the routes changed.
fn apply(instances: &mut BTreeMap<String, Instance>, event: Event) -> Option<&'static str> {
    match event {
        Event::InstanceRegistered { instance } | Event::InstanceUpdated { instance } => {
            instances.insert(instance.instance_id.clone(), instance);
        }
        Event::InstanceDeregistered { instance_id, .. } => {
            instances.remove(&instance_id)?;
        }
        Event::HealthChanged {
            instance_id, to, ..
        } => {
            let instance = instances.get_mut(&instance_id)?;
            instance.health = to;
        }
        // The vault's events are the `Authenticator`'s (`follow`).
        Event::TokenRevoked { .. }
        | Event::CredentialRotated { .. }
        | Event::CredentialDeleted { .. }
        | Event::SigningKeysChanged {} => return None,
    }
    Some("event")
}

/// Builds and swaps in a new table; requests under way keep the one they started with.
pub fn rebuild(shared: &Shared, instances: &BTreeMap<String, Instance>, cause: &str) {
    let previous = shared.table.load_full();
    let table = Table::build(
        instances,
        &shared.statics,
        &previous,
        &shared.config.pool_settings(),
        &shared.metrics,
    );
    let before: HashSet<_> = previous.instance_keys().into_iter().collect();
    let after: HashSet<_> = table.instance_keys().into_iter().collect();
    for (service, instance) in after.difference(&before) {
        let state = table
            .pool(service)
            .and_then(|p| p.endpoints.iter().find(|e| e.instance_id == *instance))
            .map(|e| e.live.breaker().state(std::time::Instant::now()));
        if let Some(state) = state {
            shared.metrics.circuit_seen(service, instance, state);
        }
    }
    for (service, instance) in before.difference(&after) {
        shared.metrics.circuit_gone(service, instance);
    }
    shared.metrics.table_updated(cause, after.len());
    shared.table.store(Arc::new(table));
}
