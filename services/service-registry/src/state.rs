//! What the handlers and background loops share, and the changes they make together:
//! every change goes to the database, then to the in-memory catalog, then out as an event.

use std::time::Duration;

use chrono::Utc;
use common::api::{Event, HealthState, Instance, ServiceName};
use common::auth::Authenticator;
use common::client::HttpClient;
use common::db::Db;
use events::Publisher;
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

use crate::catalog::Catalog;
use crate::error::ApiError;

/// How the sweep's transitions to offline begin (`no heartbeat for 95s`): the history
/// tells by it which offline instances a heartbeat may bring back.
pub const EXPIRY_REASON: &str = "no heartbeat for";
use crate::store;

#[derive(Debug, Clone)]
pub struct RegistryMetrics {
    /// Registrations accepted (new and re-registrations).
    pub registrations: IntCounter,
    /// Heartbeats accepted.
    pub heartbeats: IntCounter,
    /// Instances that went offline because their heartbeats stopped.
    pub expiries: IntCounter,
    /// Instances removed after being offline longer than DEREGISTER_AFTER.
    pub deregistrations: IntCounter,
    /// Blocking reads waiting for a change right now.
    pub blocking_reads: IntGauge,
    /// Instances by service and state.
    pub instances: IntGaugeVec,
    /// 1 while the registry refuses to evict because too many instances would expire.
    pub self_preservation: IntGauge,
}

impl RegistryMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        use common::metrics::register;
        Ok(Self {
            registrations: register(
                registry,
                IntCounter::new(
                    "concierge_registry_registrations_total",
                    "Registrations accepted, new and repeated.",
                )?,
            )?,
            heartbeats: register(
                registry,
                IntCounter::new(
                    "concierge_registry_heartbeats_total",
                    "Heartbeats accepted.",
                )?,
            )?,
            expiries: register(
                registry,
                IntCounter::new(
                    "concierge_registry_expiries_total",
                    "Instances that went offline because their heartbeats stopped.",
                )?,
            )?,
            deregistrations: register(
                registry,
                IntCounter::new(
                    "concierge_registry_deregistrations_total",
                    "Instances removed after being offline longer than DEREGISTER_AFTER.",
                )?,
            )?,
            blocking_reads: register(
                registry,
                IntGauge::new(
                    "concierge_registry_blocking_reads_in_flight",
                    "Blocking reads waiting for a change.",
                )?,
            )?,
            self_preservation: register(
                registry,
                IntGauge::new(
                    "concierge_registry_self_preservation",
                    "1 while more than half of all instances would expire at once, so nothing is evicted.",
                )?,
            )?,
            instances: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "concierge_registry_instances",
                        "Registered instances, by service and state.",
                    ),
                    &["service", "state"],
                )?,
            )?,
        })
    }
}

#[derive(Debug)]
pub struct State {
    pub db: Db,
    pub catalog: Catalog,
    pub auth: Authenticator,
    pub publisher: Publisher,
    pub vault_url: String,
    pub client: HttpClient,
    pub heartbeat_interval: Duration,
    pub deregister_after: Duration,
    pub metrics: RegistryMetrics,
    /// Instances this registry marked offline for missing heartbeats: only these come
    /// back with a heartbeat; an offline verdict of the health monitor stands until the
    /// monitor changes it.
    pub expired: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Recent state changes per instance, for flap detection.
    pub transitions: std::sync::Mutex<
        std::collections::HashMap<String, std::collections::VecDeque<std::time::Instant>>,
    >,
    /// `FLAP_THRESHOLD`: more state changes than this within `flap_window` is flapping.
    pub flap_threshold: usize,
    /// `FLAP_WINDOW`.
    pub flap_window: Duration,
    /// `HISTORY_RETENTION`: how long state changes are kept.
    pub history_retention: Duration,
}

impl State {
    /// Three missed heartbeats and an instance is offline.
    pub fn ttl(&self) -> Duration {
        self.heartbeat_interval * 3
    }

    /// Events speed the others up; a lost one is caught by their reconciliation.
    pub async fn publish(&self, event: Event) {
        if let Err(error) = self.publisher.publish(event).await {
            tracing::warn!(%error, "cannot publish an event; consumers will reconcile");
        }
    }

    /// The credentials `needed` by `service`, read from the vault with the caller's own
    /// token (the registry holds none that can read secrets). Those the vault does not
    /// give are listed as missing; an unreachable vault makes them all missing.
    pub async fn fetch_credentials(
        &self,
        service: &str,
        needed: &[String],
        authorization: &str,
    ) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
        let mut found = serde_json::Map::new();
        if needed.is_empty() {
            return (found, Vec::new());
        }
        let request = http::Request::get(format!(
            "{}/api/credentials/service/{service}",
            self.vault_url
        ))
        .header(http::header::AUTHORIZATION, authorization)
        .body(bytes::Bytes::new());
        let answer = match request {
            Ok(request) => self.client.send(request).await,
            Err(error) => {
                tracing::error!(%error, "cannot build the vault request");
                return (found, needed.to_vec());
            }
        };
        match answer {
            Ok(answer) if answer.status.is_success() => {
                let body = answer.json();
                for credential in body["credentials"].as_array().into_iter().flatten() {
                    let name = credential["name"].as_str().unwrap_or_default();
                    if needed.iter().any(|n| n == name) {
                        found.insert(name.to_owned(), credential["value"].clone());
                    }
                }
            }
            Ok(answer) => {
                tracing::warn!(status = %answer.status, %service, "the vault refused the credentials")
            }
            Err(error) => {
                tracing::warn!(%error, %service, "cannot reach the vault for credentials")
            }
        }
        let missing = needed
            .iter()
            .filter(|n| !found.contains_key(n.as_str()))
            .cloned()
            .collect();
        (found, missing)
    }

    /// Whether a heartbeat may bring `id` back: it went offline for missing heartbeats.
    pub fn take_expired(&self, id: &str) -> bool {
        self.expired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Moves an instance to `to` (database with its history row, catalog, event);
    /// nothing if it is there already.
    pub async fn change_health(
        &self,
        instance: Instance,
        to: HealthState,
        reason: String,
        latency_ms: Option<f64>,
    ) -> Result<(), ApiError> {
        let from = instance.health;
        if from == to {
            return Ok(());
        }
        let now = Utc::now();
        let (id, service, at) = (
            instance.instance_id.clone(),
            instance.service.as_str().to_owned(),
            now.naive_utc(),
        );
        let why = reason.clone();
        self.db
            .transaction(move |conn| {
                store::set_health(conn, &id, to, at)?;
                store::record_transition(
                    conn,
                    &store::NewTransition {
                        instance_id: &id,
                        service: &service,
                        at,
                        from_state: Some(from.as_str()),
                        to_state: to.as_str(),
                        reason: &why,
                    },
                )
            })
            .await
            .map_err(ApiError::from_db)?;
        // Sticky: only a whole quiet window (settle_flapping) clears it.
        let flaps = self.note_transition(&instance.instance_id);
        let (service, instance_id) = (instance.service.clone(), instance.instance_id.clone());
        let changed = self.catalog.update(&instance_id, |current| {
            current.health = to;
            current.health_since = now;
            current.flapping = flaps || current.flapping;
        });
        if changed.is_none() {
            // Deregistered meanwhile: nothing changed health.
            return Ok(());
        }
        self.publish(Event::HealthChanged {
            service,
            instance_id,
            from,
            to,
            reason,
            latency_ms,
        })
        .await;
        Ok(())
    }

    /// Counts a state change of `id` in the flap window; `true` if it now flaps.
    pub fn note_transition(&self, id: &str) -> bool {
        let mut transitions = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let recent = transitions.entry(id.to_owned()).or_default();
        recent.push_back(std::time::Instant::now());
        while recent
            .front()
            .is_some_and(|at| at.elapsed() > self.flap_window)
        {
            recent.pop_front();
        }
        recent.len() > self.flap_threshold
    }

    /// Instances that flapped and have had no state change for a whole window settle.
    fn settle_flapping(&self) {
        let settled: Vec<String> = {
            let mut transitions = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
            for recent in transitions.values_mut() {
                while recent
                    .front()
                    .is_some_and(|at| at.elapsed() > self.flap_window)
                {
                    recent.pop_front();
                }
            }
            transitions.retain(|_, recent| !recent.is_empty());
            self.catalog
                .all()
                .into_iter()
                .filter(|i| i.flapping && !transitions.contains_key(&i.instance_id))
                .map(|i| i.instance_id)
                .collect()
        };
        for id in settled {
            if self.catalog.update(&id, |i| i.flapping = false).is_some() {
                tracing::info!(instance_id = %id, "stopped flapping; back in discovery");
            }
        }
    }

    pub async fn remove(&self, service: &ServiceName, id: &str) -> Result<(), ApiError> {
        let target = id.to_owned();
        self.db
            .run(move |conn| store::delete(conn, &target))
            .await
            .map_err(ApiError::from_db)?;
        if self.catalog.remove(id).is_some() {
            self.publish(Event::InstanceDeregistered {
                service: service.clone(),
                instance_id: id.to_owned(),
            })
            .await;
        }
        Ok(())
    }

    /// Reloads the catalog from the database (reconciliation).
    pub async fn reload(&self) -> Result<usize, common::db::DbError> {
        let rows = self.db.run(store::all).await?;
        let instances: Vec<Instance> = rows
            .into_iter()
            .filter_map(store::InstanceRow::into_instance)
            .collect();
        let count = instances.len();
        self.catalog.replace_all(instances);
        self.update_gauges();
        Ok(count)
    }

    /// Takes the database's last heartbeat of every instance that looks silent here: with
    /// several replicas, heartbeats that went to another reach this one's catalog only at
    /// its next reload, and may be younger than the TTL.
    async fn catch_up_heartbeats(&self, now: chrono::DateTime<Utc>, ttl: chrono::Duration) {
        let silent: Vec<String> = self
            .catalog
            .all()
            .into_iter()
            .filter(|i| now - i.last_heartbeat_at > ttl)
            .map(|i| i.instance_id)
            .collect();
        if silent.is_empty() {
            return;
        }
        let beats = match self
            .db
            .run(move |conn| store::last_heartbeats(conn, &silent))
            .await
        {
            Ok(beats) => beats,
            Err(error) => {
                tracing::warn!(%error, "cannot read the last heartbeats");
                return;
            }
        };
        for (id, at) in beats {
            let at = at.and_utc();
            self.catalog.update(&id, |instance| {
                if at > instance.last_heartbeat_at {
                    instance.last_heartbeat_at = at;
                }
            });
        }
    }

    /// Heartbeats stopped for a TTL: offline. Offline for DEREGISTER_AFTER: removed.
    /// When more than half of all instances would expire at once, the registry suspects
    /// itself or its network rather than the fleet (Eureka's self-preservation): it logs,
    /// raises a metric, and expires nothing.
    pub async fn sweep(&self) {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.ttl()).unwrap_or(chrono::Duration::MAX);
        let grace =
            chrono::Duration::from_std(self.deregister_after).unwrap_or(chrono::Duration::MAX);
        self.catch_up_heartbeats(now, ttl).await;
        let all = self.catalog.all();
        let (silent, rest): (Vec<Instance>, Vec<Instance>) = all
            .into_iter()
            .partition(|i| i.health != HealthState::Offline && now - i.last_heartbeat_at > ttl);
        let total = silent.len() + rest.len();
        let preserving = total >= 2 && silent.len() * 2 > total;
        if preserving {
            if self.metrics.self_preservation.get() == 0 {
                tracing::warn!(
                    expiring = silent.len(),
                    total,
                    "more than half of all instances would expire at once; suspecting the registry or its network and evicting nothing"
                );
            }
            self.metrics.self_preservation.set(1);
        } else {
            self.metrics.self_preservation.set(0);
            for instance in silent {
                let reason = format!(
                    "{EXPIRY_REASON} {}s",
                    (now - instance.last_heartbeat_at).num_seconds()
                );
                let id = instance.instance_id.clone();
                match self
                    .change_health(instance, HealthState::Offline, reason, None)
                    .await
                {
                    Ok(()) => {
                        self.metrics.expiries.inc();
                        self.expired
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id);
                    }
                    Err(error) => tracing::warn!(%error, "cannot mark an instance offline"),
                }
            }
        }
        for instance in rest {
            let gone = instance.health == HealthState::Offline
                && now - instance.health_since > grace
                && now - instance.last_heartbeat_at > ttl;
            if gone && !preserving {
                let service = instance.service.clone();
                match self.remove(&service, &instance.instance_id).await {
                    Ok(()) => self.metrics.deregistrations.inc(),
                    Err(error) => tracing::warn!(%error, "cannot remove an expired instance"),
                }
            }
        }
        self.settle_flapping();
        self.update_gauges();
    }

    /// Drops history older than the retention (called now and then by the sweeper).
    pub async fn prune_history(&self) {
        // A retention longer than the calendar keeps everything.
        let Some(before) = common::config::before(Utc::now(), self.history_retention) else {
            return;
        };
        let before = before.naive_utc();
        if let Err(error) = self
            .db
            .run(move |conn| store::prune_history(conn, before))
            .await
        {
            tracing::warn!(%error, "cannot prune the health history");
        }
    }

    fn update_gauges(&self) {
        self.metrics.instances.reset();
        for (service, counts) in self.catalog.services() {
            for (state, count) in [
                ("healthy", counts.healthy),
                ("degraded", counts.degraded),
                ("offline", counts.offline),
            ] {
                self.metrics
                    .instances
                    .with_label_values(&[service.as_str(), state])
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }

    /// Applies another registry's event to the catalog.
    pub fn apply(&self, event: Event) {
        match event {
            Event::InstanceRegistered { instance } | Event::InstanceUpdated { instance } => {
                self.catalog.upsert(instance);
            }
            Event::InstanceDeregistered { instance_id, .. } => {
                self.catalog.remove(&instance_id);
            }
            Event::HealthChanged {
                instance_id, to, ..
            } => {
                if self
                    .catalog
                    .get(&instance_id)
                    .is_some_and(|instance| instance.health != to)
                {
                    let flaps = self.note_transition(&instance_id);
                    self.catalog.update(&instance_id, |instance| {
                        instance.health = to;
                        instance.health_since = Utc::now();
                        instance.flapping = flaps || instance.flapping;
                    });
                }
            }
            // The vault's events are the `Authenticator`'s (its `follow`, by the caller).
            Event::TokenRevoked { .. }
            | Event::CredentialRotated { .. }
            | Event::CredentialDeleted { .. }
            | Event::SigningKeysChanged {} => {}
        }
    }
}
