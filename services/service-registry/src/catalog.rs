//! The in-memory view every read is served from, kept fresh by this process's own
//! changes, other registries' events and periodic reconciliation with the database.
//!
//! The index moves on changes a client would act on (registrations, removals, state,
//! address, metadata, load in tenths), not on a heartbeat that only refreshes a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::api::{HealthState, Instance};
use serde::Serialize;
use tokio::sync::watch;

/// Instances by id, and the ids of each service, so that a service's instances are found
/// without looking at the others.
#[derive(Debug, Default)]
struct State {
    by_id: HashMap<String, Instance>,
    by_service: HashMap<String, BTreeSet<String>>,
}

impl State {
    fn insert(&mut self, instance: Instance) -> Option<Instance> {
        let id = instance.instance_id.clone();
        let service = instance.service.as_str().to_owned();
        let previous = self.by_id.insert(id.clone(), instance);
        if let Some(previous) = &previous
            && previous.service.as_str() != service
        {
            self.unlink(previous.service.as_str(), &id);
        }
        self.by_service.entry(service).or_default().insert(id);
        previous
    }

    fn remove(&mut self, id: &str) -> Option<Instance> {
        let removed = self.by_id.remove(id)?;
        self.unlink(removed.service.as_str(), id);
        Some(removed)
    }

    fn unlink(&mut self, service: &str, id: &str) {
        if let Some(ids) = self.by_service.get_mut(service) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    fn of(&self, service: &str) -> impl Iterator<Item = &Instance> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
    }
}

#[derive(Debug)]
pub struct Catalog {
    state: RwLock<State>,
    index: watch::Sender<u64>,
    /// Round-robin position per service, for discovery among equals.
    turns: RwLock<HashMap<String, AtomicUsize>>,
    /// Discovery answers per service, rendered once per index (untagged queries).
    answers: RwLock<HashMap<String, Arc<Answers>>>,
}

/// The rendered answers of one service at one index: one per equally good instance.
#[derive(Debug)]
struct Answers {
    index: u64,
    bodies: Vec<Bytes>,
}

/// The part of an instance that a client acts on; a change in it moves the index.
fn material(instance: &Instance) -> impl PartialEq + '_ {
    (
        (
            &instance.service,
            &instance.version,
            &instance.address,
            instance.port,
            &instance.health_endpoint,
            instance.health,
        ),
        (
            instance.load.map(|load| (load * 10.0).round() as i64),
            instance.weight,
            &instance.tags,
            &instance.metadata,
            &instance.routes,
            &instance.dependencies,
            (instance.draining, instance.flapping),
        ),
    )
}

/// Instance counts per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub healthy: usize,
    pub degraded: usize,
    pub offline: usize,
}

impl Counts {
    fn add(&mut self, state: HealthState) {
        match state {
            HealthState::Healthy => self.healthy += 1,
            HealthState::Degraded => self.degraded += 1,
            HealthState::Offline => self.offline += 1,
        }
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            state: RwLock::new(State::default()),
            index: watch::Sender::new(1),
            turns: RwLock::new(HashMap::new()),
            answers: RwLock::new(HashMap::new()),
        }
    }
}

impl Catalog {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.index.send_modify(|index| *index += 1);
    }

    pub fn index(&self) -> u64 {
        *self.index.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.index.subscribe()
    }

    /// Adds or replaces an instance; `Some(previous)` if it existed. Moves the index only
    /// on a material change.
    pub fn upsert(&self, instance: Instance) -> Option<Instance> {
        let previous = self.write().insert(instance.clone());
        if previous
            .as_ref()
            .is_none_or(|p| material(p) != material(&instance))
        {
            self.bump();
        }
        previous
    }

    /// Changes the instance as `change` says, if it is still there: a handler that read it
    /// before awaiting the database must not bring back an instance deregistered
    /// meanwhile, nor undo a change made meanwhile to fields it did not touch. Returns the
    /// instance as it now is.
    pub fn update(&self, id: &str, change: impl FnOnce(&mut Instance)) -> Option<Instance> {
        let mut state = self.write();
        let mut instance = state.by_id.get(id)?.clone();
        change(&mut instance);
        let previous = state.insert(instance.clone());
        drop(state);
        if previous.is_none_or(|p| material(&p) != material(&instance)) {
            self.bump();
        }
        Some(instance)
    }

    pub fn remove(&self, id: &str) -> Option<Instance> {
        let removed = self.write().remove(id);
        if removed.is_some() {
            self.bump();
        }
        removed
    }

    pub fn get(&self, id: &str) -> Option<Instance> {
        self.read().by_id.get(id).cloned()
    }

    /// Replaces everything with the database's view (reconciliation).
    pub fn replace_all(&self, instances: Vec<Instance>) {
        let mut state = self.write();
        let mut fresh = State::default();
        let mut changed = state.by_id.len() != instances.len();
        for mut instance in instances {
            if let Some(old) = state.by_id.get(&instance.instance_id) {
                // Flapping is this process's judgement, not a stored fact: keep it.
                instance.flapping = old.flapping;
                changed |= material(old) != material(&instance);
            } else {
                changed = true;
            }
            fresh.insert(instance);
        }
        *state = fresh;
        drop(state);
        if changed {
            self.bump();
        }
    }

    pub fn all(&self) -> Vec<Instance> {
        let mut all: Vec<Instance> = self.read().by_id.values().cloned().collect();
        all.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        all
    }

    /// The instances of `service`, in id order.
    pub fn instances_of(&self, service: &str) -> Vec<Instance> {
        // By id already: the service's ids are a sorted set.
        self.read().of(service).cloned().collect()
    }

    /// Every service with its counts per state.
    pub fn services(&self) -> BTreeMap<String, Counts> {
        let mut services: BTreeMap<String, Counts> = BTreeMap::new();
        for instance in self.read().by_id.values() {
            services
                .entry(instance.service.as_str().to_owned())
                .or_default()
                .add(instance.health);
        }
        services
    }

    pub fn counts(instances: &[Instance]) -> Counts {
        let mut counts = Counts::default();
        for instance in instances {
            counts.add(instance.health);
        }
        counts
    }

    /// The instance a client should use now: the least loaded healthy one, round robin
    /// among equals; with all healthy instances of the service (filtered by `tag`).
    fn next_turn(&self, service: &str) -> usize {
        let turn = {
            let turns = self.turns.read().unwrap_or_else(|p| p.into_inner());
            turns
                .get(service)
                .map(|t| t.fetch_add(1, Ordering::Relaxed))
        };
        turn.unwrap_or_else(|| {
            let mut turns = self.turns.write().unwrap_or_else(|p| p.into_inner());
            turns
                .entry(service.to_owned())
                .or_insert_with(|| AtomicUsize::new(0))
                .fetch_add(1, Ordering::Relaxed)
        })
    }

    /// The discovery answer for `service`, rendered by `render(chosen, healthy)`: for an
    /// untagged query the answers are rendered once per index and reused, which makes a
    /// discovery read cost about what serving a file does. `None` if nothing is healthy.
    pub fn discover_body(
        &self,
        service: &str,
        tag: Option<&str>,
        render: impl Fn(&Instance, &[Instance]) -> Bytes,
    ) -> Option<Bytes> {
        let index = self.index();
        if tag.is_none() {
            let cached = self
                .answers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(service)
                .filter(|a| a.index == index)
                .cloned();
            if let Some(answers) = cached {
                let turn = self.next_turn(service);
                return Some(answers.bodies[turn % answers.bodies.len()].clone());
            }
        }
        let (healthy, equals) = self.candidates(service, tag);
        if equals.is_empty() {
            return None;
        }
        let bodies: Vec<Bytes> = equals.iter().map(|i| render(i, &healthy)).collect();
        let turn = self.next_turn(service);
        let body = bodies[turn % bodies.len()].clone();
        if tag.is_none() {
            self.answers
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(service.to_owned(), Arc::new(Answers { index, bodies }));
        }
        Some(body)
    }

    /// The healthy instances in rotation, and those among them with the least load.
    fn candidates(&self, service: &str, tag: Option<&str>) -> (Vec<Instance>, Vec<Instance>) {
        let healthy: Vec<Instance> = self
            .read()
            .of(service)
            .filter(|i| i.health == HealthState::Healthy && !i.draining && !i.flapping)
            .filter(|i| tag.is_none_or(|tag| i.tags.iter().any(|t| t == tag)))
            .cloned()
            .collect();
        let load = |i: &Instance| i.load.map_or(0, |l| (l * 100.0).round() as i64);
        let least = healthy.iter().map(load).min();
        let equals = healthy
            .iter()
            .filter(|i| Some(load(i)) == least)
            .cloned()
            .collect();
        (healthy, equals)
    }

    pub fn discover(&self, service: &str, tag: Option<&str>) -> (Option<Instance>, Vec<Instance>) {
        let (healthy, equals) = self.candidates(service, tag);
        if equals.is_empty() {
            return (None, healthy);
        }
        let chosen = equals[self.next_turn(service) % equals.len()].clone();
        (Some(chosen), healthy)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use common::api::ServiceName;

    use super::*;

    fn instance(id: &str, load: Option<f64>, health: HealthState) -> Instance {
        let now = Utc::now();
        Instance {
            instance_id: id.into(),
            service: ServiceName::parse("payments").unwrap(),
            version: "1".into(),
            address: "10.0.0.1".into(),
            port: 8000,
            health_endpoint: "/health".into(),
            health,
            load,
            weight: 1,
            tags: vec![],
            metadata: serde_json::Map::new(),
            routes: vec![],
            dependencies: vec![],
            registered_at: now,
            last_heartbeat_at: now,
            health_since: now,
            draining: false,
            flapping: false,
        }
    }

    #[test]
    fn the_index_moves_on_material_changes_only() {
        let catalog = Catalog::default();
        let start = catalog.index();
        catalog.upsert(instance("a", Some(0.11), HealthState::Healthy));
        assert_eq!(catalog.index(), start + 1);
        let mut refreshed = instance("a", Some(0.12), HealthState::Healthy);
        refreshed.last_heartbeat_at = Utc::now() + chrono::Duration::seconds(5);
        catalog.upsert(refreshed);
        assert_eq!(
            catalog.index(),
            start + 1,
            "a heartbeat in the same load bucket"
        );
        catalog.upsert(instance("a", Some(0.5), HealthState::Healthy));
        assert_eq!(catalog.index(), start + 2, "the load moved a bucket");
        catalog.upsert(instance("a", Some(0.5), HealthState::Offline));
        assert_eq!(catalog.index(), start + 3);
        assert!(catalog.remove("a").is_some());
        assert_eq!(catalog.index(), start + 4);
        assert!(catalog.remove("a").is_none());
        assert_eq!(catalog.index(), start + 4);
    }

    #[test]
    fn an_update_changes_only_what_it_says_and_only_what_is_there() {
        let catalog = Catalog::default();
        // A heartbeat read the instance healthy; the monitor set it offline meanwhile.
        catalog.upsert(instance("a", Some(0.1), HealthState::Offline));
        let now = Utc::now();
        let updated = catalog.update("a", |i| i.last_heartbeat_at = now).unwrap();
        assert_eq!(
            updated.health,
            HealthState::Offline,
            "not the heartbeat's copy"
        );
        assert_eq!(updated.last_heartbeat_at, now);
        // Deregistered while a handler awaited the database: it stays gone.
        catalog.remove("a");
        let index = catalog.index();
        assert!(catalog.update("a", |i| i.draining = true).is_none());
        assert!(catalog.get("a").is_none());
        assert_eq!(catalog.index(), index);
        // A material change moves the index.
        catalog.upsert(instance("b", Some(0.1), HealthState::Healthy));
        let index = catalog.index();
        catalog.update("b", |i| i.health = HealthState::Degraded);
        assert_eq!(catalog.index(), index + 1);
    }

    #[test]
    fn discovery_prefers_least_load_and_rotates_among_equals() {
        let catalog = Catalog::default();
        catalog.upsert(instance("busy", Some(0.9), HealthState::Healthy));
        catalog.upsert(instance("idle-1", Some(0.1), HealthState::Healthy));
        catalog.upsert(instance("idle-2", Some(0.1), HealthState::Healthy));
        catalog.upsert(instance("down", Some(0.0), HealthState::Offline));
        catalog.upsert(instance("sick", Some(0.0), HealthState::Degraded));
        let mut draining = instance("draining", Some(0.0), HealthState::Healthy);
        draining.draining = true;
        catalog.upsert(draining);
        let mut flapping = instance("flapping", Some(0.0), HealthState::Healthy);
        flapping.flapping = true;
        catalog.upsert(flapping);
        let picks: Vec<String> = (0..4)
            .map(|_| catalog.discover("payments", None).0.unwrap().instance_id)
            .collect();
        assert_eq!(
            picks.iter().filter(|p| *p == "idle-1").count(),
            2,
            "{picks:?}"
        );
        assert_eq!(
            picks.iter().filter(|p| *p == "idle-2").count(),
            2,
            "{picks:?}"
        );
        let (_, healthy) = catalog.discover("payments", None);
        assert_eq!(healthy.len(), 3);
        assert!(catalog.discover("orders", None).0.is_none());
        assert!(catalog.discover("payments", Some("canary")).0.is_none());
    }
}
