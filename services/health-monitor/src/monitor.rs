//! The monitor at work: follow the registry, check every instance on its schedule, track
//! states, report transitions, keep alerts, deliver notices, trigger recoveries.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::api::{Channel, Event, HealthState, Instance};
use common::client::HttpClient;
use common::db::Db;
use common::secret::Secret;
use events::{EventMetrics, Signal};
use serde_json::json;

use crate::alerts::{self, Alert};
use crate::config::Config;
use crate::metrics::MonitorMetrics;
use crate::notify::{self, Backoff};
use crate::probe::{self, Probe, Verdict, Warning};
use crate::recovery::{self, Attempts, Policy};
use crate::store::{self, RecoveryRow};
use crate::tracker::Tracker;

/// How often alerts and recoveries are evaluated and notices sent.
const TICK: Duration = Duration::from_millis(500);
/// How often the rules run even when no state changed.
const FULL_EVALUATION: Duration = Duration::from_secs(5);
/// How often the scheduler starts the checks that are due.
const SCHEDULE_TICK: Duration = Duration::from_millis(250);
/// How long resolved alerts and recovery attempts stay visible.
const KEEP_RESOLVED: Duration = Duration::from_secs(24 * 3600);

/// A verdict of this monitor's checks the registry does not have.
#[derive(Debug)]
struct Correction {
    instance: Instance,
    to: HealthState,
    registry_said: HealthState,
    latency: Duration,
}

/// How bad a state is: a correction only ever makes the registry's view worse.
fn severity(state: HealthState) -> u8 {
    match state {
        HealthState::Healthy => 0,
        HealthState::Degraded => 1,
        HealthState::Offline => 2,
    }
}

/// One instance as the monitor follows it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub instance: Instance,
    pub tracker: Tracker,
    /// Bumped on every (re)schedule; a stale heap item is skipped.
    generation: u64,
    pub recovery: Attempts,
}

#[derive(Debug)]
pub struct Monitor {
    pub config: Config,
    pub db: Db,
    pub metrics: MonitorMetrics,
    entries: Mutex<HashMap<String, Entry>>,
    queue: Mutex<BinaryHeap<Reverse<(Instant, u64, String)>>>,
    /// Each owned instance's HTTP connection, kept open between its checks.
    kept: Mutex<HashMap<String, probe::Kept>>,
    /// At most this many are kept (half the open-files limit): beyond it, checks open
    /// and close their own, and the monitor never runs out of descriptors.
    max_kept: usize,
    pub alerts: Mutex<BTreeMap<String, Alert>>,
    pub recoveries: Mutex<Vec<RecoveryRow>>,
    /// Whether the instances were loaded from the registry at least once: alerts are not
    /// evaluated before, or an empty fleet would resolve every alert.
    pub loaded: AtomicBool,
    /// Something the rules look at changed since they were last evaluated.
    dirty: AtomicBool,
    client: HttpClient,
    token: Option<Secret<String>>,
    /// With Redis, the monitors alive (and when that was last learned): each instance is
    /// checked, and each alert kept, by exactly one of them.
    membership: Option<events::Membership>,
    members: Mutex<Option<(Vec<String>, Instant)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Monitor {
    pub async fn new(config: Config, db: Db, metrics: MonitorMetrics) -> anyhow::Result<Arc<Self>> {
        let since = (Utc::now() - chrono::Duration::from_std(KEEP_RESOLVED)?).naive_utc();
        let (rows, recoveries) = db
            .run(move |conn| {
                Ok((
                    store::load_alerts(conn, since)?,
                    store::recoveries_since(conn, since)?,
                ))
            })
            .await?;
        let alerts = rows
            .into_iter()
            .filter_map(Alert::from_row)
            .map(|a| (a.fingerprint.clone(), a))
            .collect();
        let membership = config
            .common
            .redis_url
            .as_ref()
            .map(|url| events::Membership::new(url, crate::NAME, &uuid::Uuid::new_v4().to_string()))
            .transpose()?;
        Ok(Arc::new(Self {
            membership,
            members: Mutex::new(None),
            token: config.common.token.clone(),
            client: HttpClient::new(Duration::from_secs(5)),
            config,
            db,
            metrics,
            entries: Mutex::new(HashMap::new()),
            queue: Mutex::new(BinaryHeap::new()),
            kept: Mutex::new(HashMap::new()),
            // `common::service` raised the limit at start.
            max_kept: usize::try_from(common::service::open_files_limit() / 2)
                .unwrap_or(usize::MAX),
            alerts: Mutex::new(alerts),
            recoveries: Mutex::new(recoveries),
            loaded: AtomicBool::new(false),
            dirty: AtomicBool::new(true),
        }))
    }

    /// A copy of every entry, for the API and the rules.
    pub fn snapshot(&self) -> Vec<Entry> {
        lock(&self.entries).values().cloned().collect()
    }

    /// Starts following the registry, checking, alerting; runs until the process ends.
    pub fn start(
        self: &Arc<Self>,
        event_metrics: EventMetrics,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().follow(event_metrics)),
            tokio::spawn(self.clone().schedule()),
            tokio::spawn(self.clone().tick()),
            tokio::spawn(self.clone().membership()),
        ]
    }

    /// Leaves the group on a clean shutdown, so that the others take over at once.
    pub async fn leave(&self) {
        if let Some(membership) = &self.membership {
            membership.leave().await;
        }
    }

    // --- Sharing the fleet with other monitors ------------------------------------------

    /// How often membership is refreshed, and how long a silent member counts as alive:
    /// together well under one check interval, so that a dead monitor's instances are
    /// taken over within one interval.
    fn beat_period(&self) -> (Duration, Duration) {
        let beat =
            (self.config.interval / 5).clamp(Duration::from_millis(50), Duration::from_secs(2));
        (beat, beat * 3)
    }

    /// Whether this monitor checks `key` (an instance id) or keeps its alerts. Without
    /// Redis, or when membership is stale, it does everything: checking twice is better
    /// than not checking.
    pub fn owns(&self, key: &str) -> bool {
        let Some(membership) = &self.membership else {
            return true;
        };
        let (_, ttl) = self.beat_period();
        match &*lock(&self.members) {
            Some((members, at)) if at.elapsed() <= ttl => {
                events::owner(members, key) == Some(membership.member())
            }
            _ => true,
        }
    }

    async fn membership(self: Arc<Self>) {
        let Some(membership) = self.membership.clone() else {
            return;
        };
        let (beat, ttl) = self.beat_period();
        let mut ticker = tokio::time::interval(beat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match membership.beat(ttl).await {
                Ok(members) => {
                    let changed = {
                        let mut current = lock(&self.members);
                        let changed = current.as_ref().is_none_or(|(old, _)| *old != members);
                        *current = Some((members.clone(), Instant::now()));
                        changed
                    };
                    if changed {
                        tracing::info!(?members, "monitors in the group changed");
                        self.rebalanced().await;
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot refresh the monitors' membership"),
            }
        }
    }

    /// After a membership change: check the instances this monitor now owns soon, and
    /// reload the alerts (another monitor may have kept some that are now this one's).
    async fn rebalanced(&self) {
        let (beat, _) = self.beat_period();
        let ids: Vec<String> = lock(&self.entries).keys().cloned().collect();
        let owned: Vec<String> = ids.into_iter().filter(|id| self.owns(id)).collect();
        let scheduled: Vec<(String, u64)> = {
            let mut entries = lock(&self.entries);
            owned
                .into_iter()
                .filter_map(|id| {
                    let entry = entries.get_mut(&id)?;
                    entry.generation += 1;
                    Some((id, entry.generation))
                })
                .collect()
        };
        {
            let mut queue = lock(&self.queue);
            for (id, generation) in scheduled {
                queue.push(Reverse((
                    Instant::now() + beat.mul_f64(fastrand::f64()),
                    generation,
                    id,
                )));
            }
        }
        let since = (Utc::now() - chrono::Duration::hours(24)).naive_utc();
        match self
            .db
            .run(move |conn| store::load_alerts(conn, since))
            .await
        {
            Ok(rows) => {
                let stored: Vec<Alert> = rows.into_iter().filter_map(Alert::from_row).collect();
                let mut book = lock(&self.alerts);
                for alert in stored {
                    // Another monitor's record is the truth for what it kept; this
                    // monitor's own records it knows best itself.
                    if !book.contains_key(&alert.fingerprint) || !self.owns(&alert.owner_key()) {
                        book.insert(alert.fingerprint.clone(), alert);
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot reload the alerts"),
        }
    }

    // --- Following the registry -------------------------------------------------------

    async fn follow(self: Arc<Self>, event_metrics: EventMetrics) {
        let mut subscription = match events::subscribe(
            self.config.common.redis_url.as_ref(),
            &[Channel::Registry, Channel::Health],
            self.config.common.resync_interval,
            event_metrics,
        ) {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::error!(%error, "cannot follow the registry");
                return;
            }
        };
        while let Some(signal) = subscription.next().await {
            match signal {
                Signal::Resync(_) => self.reload().await,
                Signal::Event(envelope) => match envelope.event {
                    Event::InstanceRegistered { instance }
                    | Event::InstanceUpdated { instance } => {
                        if let Some(correction) = self.upsert(instance) {
                            self.correct(correction).await;
                        }
                    }
                    Event::InstanceDeregistered { instance_id, .. } => {
                        lock(&self.entries).remove(&instance_id);
                        self.dirty.store(true, Ordering::Relaxed);
                    }
                    // Another monitor's findings: the state of instances this one does not check.
                    Event::HealthChanged {
                        instance_id, to, ..
                    } if !self.owns(&instance_id) => {
                        if let Some(entry) = lock(&self.entries).get_mut(&instance_id) {
                            entry.tracker.state = to;
                            entry.tracker.since = envelope.at;
                            self.dirty.store(true, Ordering::Relaxed);
                        }
                    }
                    _ => {}
                },
            }
        }
    }

    async fn reload(&self) {
        let (Some(url), Some(token)) = (&self.config.common.registry_url, &self.token) else {
            self.loaded.store(true, Ordering::Relaxed);
            return;
        };
        match common::registration::fetch_instances(&self.client, url, token).await {
            Ok(instances) => {
                let ids: std::collections::HashSet<String> = instances
                    .iter()
                    .filter(|i| i.service.as_str() != crate::NAME)
                    .map(|i| i.instance_id.clone())
                    .collect();
                lock(&self.entries).retain(|id, _| ids.contains(id));
                let corrections: Vec<Correction> = instances
                    .into_iter()
                    .filter_map(|instance| self.upsert(instance))
                    .collect();
                self.loaded.store(true, Ordering::Relaxed);
                for correction in corrections {
                    self.correct(correction).await;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot load the instances from the registry"),
        }
    }

    /// Adds or refreshes an instance; a new one is first checked at a random point of
    /// the interval, so that checks spread evenly. Returns the correction to send when the
    /// registry says better of an instance this monitor checks than its checks do.
    fn upsert(&self, instance: Instance) -> Option<Correction> {
        self.dirty.store(true, Ordering::Relaxed);
        // Monitors do not check themselves or each other: a monitor that is shutting down
        // would report itself, and its peers' liveness is the registry's heartbeats' job.
        if instance.service.as_str() == crate::NAME {
            return None;
        }
        let id = instance.instance_id.clone();
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get_mut(&id) {
            let mut correction = None;
            if !self.owns(&id) {
                entry.tracker.state = instance.health;
                entry.tracker.since = instance.health_since;
            } else if entry
                .tracker
                .last_check_at
                .is_some_and(|checked| checked > instance.health_since)
                && severity(entry.tracker.state) > severity(instance.health)
            {
                // A report the registry never got (it was down), or a re-registration that
                // set a still failing instance healthy: a check made since the registry's
                // state began still says worse, and goes again. A worse state in the
                // registry (heartbeats stopped) is the registry's own to keep.
                correction = Some(Correction {
                    instance: instance.clone(),
                    to: entry.tracker.state,
                    registry_said: instance.health,
                    latency: Duration::from_secs_f64(
                        entry.tracker.latency_ms.unwrap_or(0.0).max(0.0) / 1e3,
                    ),
                });
            }
            entry.instance = instance;
            return correction;
        }
        let tracker = Tracker::new(instance.health, instance.health_since);
        let jitter = self.config.interval.mul_f64(fastrand::f64());
        entries.insert(
            id.clone(),
            Entry {
                instance,
                tracker,
                generation: 0,
                recovery: Attempts::default(),
            },
        );
        drop(entries);
        lock(&self.queue).push(Reverse((Instant::now() + jitter, 0, id)));
        None
    }

    /// Sends the checks' verdict again to a registry that says better of the instance,
    /// unless the checks have changed their verdict meanwhile.
    async fn correct(&self, correction: Correction) {
        let still = lock(&self.entries)
            .get(&correction.instance.instance_id)
            .is_some_and(|entry| entry.tracker.state == correction.to);
        if !still {
            return;
        }
        tracing::info!(
            service = %correction.instance.service,
            instance = %correction.instance.instance_id,
            registry = correction.registry_said.as_str(),
            checks = correction.to.as_str(),
            "the registry says better of an instance than its checks; reporting again"
        );
        let reason = format!(
            "reported again: the registry said {}",
            correction.registry_said.as_str()
        );
        self.report(
            &correction.instance,
            correction.to,
            &reason,
            correction.latency,
        )
        .await;
    }

    // --- Checking ---------------------------------------------------------------------

    async fn schedule(self: Arc<Self>) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.config.concurrency));
        // Checks due within a tick start together, so their answers arrive together and
        // one wake-up of the runtime handles many: at 10,000 instances, wake-ups per
        // check cost more than the checks. A check is at most one tick late.
        let mut ticker = tokio::time::interval(SCHEDULE_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = Instant::now();
            loop {
                let due = {
                    let mut queue = lock(&self.queue);
                    match queue.peek() {
                        Some(Reverse((at, _, _))) if *at <= now => queue.pop(),
                        _ => None,
                    }
                };
                let Some(Reverse((_, generation, id))) = due else {
                    break;
                };
                if !self.owns(&id) {
                    // Another monitor checks it; look again in an interval, in case it dies.
                    lock(&self.kept).remove(&id);
                    let mut entries = lock(&self.entries);
                    if let Some(entry) = entries.get_mut(&id).filter(|e| e.generation == generation)
                    {
                        entry.generation += 1;
                        let next = (now + self.config.interval, entry.generation, id);
                        drop(entries);
                        lock(&self.queue).push(Reverse(next));
                    }
                    continue;
                }
                let target = {
                    let entries = lock(&self.entries);
                    entries
                        .get(&id)
                        .filter(|e| e.generation == generation)
                        .map(|e| (e.instance.clone(), generation))
                };
                let Some((instance, generation)) = target else {
                    continue;
                };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let monitor = self.clone();
                let kept = lock(&self.kept).remove(&instance.instance_id);
                tokio::spawn(async move {
                    let (probe, kept) = probe::check(
                        &instance.address,
                        instance.port,
                        &method(&instance),
                        monitor.config.timeout,
                        monitor.config.slow,
                        kept,
                    )
                    .await;
                    drop(permit);
                    if let Some(kept) = kept {
                        let mut all = lock(&monitor.kept);
                        if all.len() < monitor.max_kept {
                            all.insert(instance.instance_id.clone(), kept);
                        }
                    }
                    monitor.observed(&instance, generation, &probe).await;
                });
            }
        }
    }

    async fn observed(&self, instance: &Instance, generation: u64, probe: &Probe) {
        let (outcome, reason) = match probe.verdict {
            Verdict::Pass => ("pass", "none"),
            Verdict::Warn(Warning::Slow) => ("warn", "slow"),
            Verdict::Warn(Warning::Degraded) => ("warn", "degraded"),
            Verdict::Fail(reason) => ("fail", reason.as_str()),
        };
        self.metrics.checked(outcome, reason, probe.latency);
        let transition = {
            let mut entries = lock(&self.entries);
            let Some(entry) = entries.get_mut(&instance.instance_id) else {
                return; // deregistered meanwhile
            };
            if entry.generation != generation {
                return;
            }
            let transition = entry
                .tracker
                .observe(probe, Utc::now(), self.config.thresholds);
            entry.generation += 1;
            let next = if entry.tracker.unsettled() {
                self.config.fast_interval
            } else {
                self.config.interval
            };
            let generation = entry.generation;
            drop(entries);
            lock(&self.queue).push(Reverse((
                Instant::now() + next,
                generation,
                instance.instance_id.clone(),
            )));
            transition
        };
        if let Some(transition) = transition {
            self.dirty.store(true, Ordering::Relaxed);
            tracing::info!(
                service = %instance.service,
                instance = %instance.instance_id,
                from = transition.from.as_str(),
                to = transition.to.as_str(),
                reason = transition.reason,
                "health changed"
            );
            self.metrics.transition(transition.to.as_str());
            self.report(instance, transition.to, &transition.reason, probe.latency)
                .await;
        }
    }

    /// Tells the registry, which stores the change and publishes it on `concierge:health`.
    async fn report(&self, instance: &Instance, to: HealthState, reason: &str, latency: Duration) {
        let (Some(url), Some(token)) = (&self.config.common.registry_url, &self.token) else {
            return;
        };
        let url = format!(
            "{}/api/services/{}/instances/{}/health",
            url.trim_end_matches('/'),
            instance.service,
            instance.instance_id
        );
        let body = json!({
            "state": to,
            "reason": reason,
            "latency_ms": latency.as_secs_f64() * 1e3,
        });
        let request = http::Request::put(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.expose()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(bytes::Bytes::from(body.to_string()));
        let Ok(request) = request else { return };
        match self.client.send(request).await {
            Ok(response) if response.status.is_success() => {}
            Ok(response) => {
                tracing::warn!(status = %response.status, "the registry refused a health report")
            }
            Err(error) => tracing::warn!(%error, "cannot report a health change to the registry"),
        }
    }

    // --- Alerts, notices, recoveries ----------------------------------------------------

    async fn tick(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = Instant::now();
        let mut last_full = Instant::now();
        loop {
            ticker.tick().await;
            if !self.loaded.load(Ordering::Relaxed) {
                continue;
            }
            // The rules run when a state changed, and every few seconds for what time
            // alone changes (escalation, flap windows): not over the whole fleet each tick.
            // They run under the lock on borrowed entries: cloning 10,000 instances would
            // cost more than checking them. Only offline instances are copied out.
            let full =
                self.dirty.swap(false, Ordering::Relaxed) || last_full.elapsed() >= FULL_EVALUATION;
            let (conditions, offline) = {
                let entries = lock(&self.entries);
                let conditions = full.then(|| {
                    let pairs: Vec<_> = entries
                        .values()
                        .map(|e| (&e.instance, &e.tracker))
                        .collect();
                    self.count_states(&pairs);
                    // Connections of instances that left go with them.
                    lock(&self.kept).retain(|id, _| entries.contains_key(id));
                    alerts::evaluate(&pairs, &self.config.rules, Utc::now())
                });
                let offline: Vec<Entry> = entries
                    .values()
                    .filter(|e| e.tracker.state == HealthState::Offline)
                    .cloned()
                    .collect();
                (conditions, offline)
            };
            if let Some(mut conditions) = conditions {
                last_full = Instant::now();
                let changed = {
                    conditions.retain(|c| self.owns(&c.owner_key()));
                    let mut book = lock(&self.alerts);
                    let owned = |alert: &Alert| self.owns(&alert.owner_key());
                    let changed = alerts::reconcile(
                        &mut book,
                        conditions,
                        self.config.rules.escalate_after,
                        Utc::now(),
                        &owned,
                    );
                    self.count_alerts(&book);
                    changed
                };
                for alert in changed {
                    tracing::info!(
                        fingerprint = alert.fingerprint,
                        rule = alert.rule.as_str(),
                        service = alert.service,
                        firing = alert.firing,
                        severity = ?alert.severity,
                        caused_by = alert.caused_by,
                        "alert changed"
                    );
                    self.save(&alert).await;
                }
            }
            self.deliver(&mut backoff).await;
            self.recover(&offline).await;
            if last_prune.elapsed() > Duration::from_secs(3600) {
                last_prune = Instant::now();
                self.prune().await;
            }
        }
    }

    async fn save(&self, alert: &Alert) {
        let row = alert.to_row();
        if let Err(error) = self.db.run(move |conn| store::save_alert(conn, &row)).await {
            tracing::error!(%error, "cannot store an alert; it will be stored on its next change");
        }
    }

    async fn deliver(&self, backoff: &mut Backoff) {
        for webhook in &self.config.webhooks {
            if !backoff.ready(&webhook.url, Instant::now()) {
                continue;
            }
            let pending: Vec<Alert> = lock(&self.alerts)
                .values()
                .filter(|a| {
                    a.needs(&webhook.url)
                        && a.settled(Utc::now(), self.config.group_wait)
                        && self.owns(&a.owner_key())
                })
                .cloned()
                .collect();
            for alert in pending {
                let sent = notify::send(&self.client, webhook, &alert).await;
                self.metrics.delivery(sent.is_ok());
                match sent {
                    Ok(()) => {
                        backoff.succeeded(&webhook.url);
                        let updated = {
                            let mut book = lock(&self.alerts);
                            let Some(current) = book.get_mut(&alert.fingerprint) else {
                                continue;
                            };
                            // Record what was sent: the alert may have moved on meanwhile.
                            current
                                .notified
                                .insert(webhook.url.clone(), alert.due().to_owned());
                            current.clone()
                        };
                        self.save(&updated).await;
                    }
                    Err(error) => {
                        tracing::warn!(webhook = webhook.url, %error, "alert webhook failed; will retry");
                        backoff.failed(&webhook.url, Instant::now());
                        break;
                    }
                }
            }
        }
    }

    async fn recover(&self, fleet: &[Entry]) {
        let now = Utc::now();
        let blamed: std::collections::HashSet<String> = lock(&self.alerts)
            .values()
            .filter(|a| a.firing && a.caused_by.is_some())
            .map(|a| a.service.clone())
            .collect();
        for entry in fleet {
            if entry.tracker.state != HealthState::Offline
                || blamed.contains(entry.instance.service.as_str())
                || !self.owns(&entry.instance.instance_id)
            {
                continue;
            }
            let Some(policy) = Policy::of(&entry.instance) else {
                continue;
            };
            let attempts = self.attempts(&entry.instance.instance_id, entry.tracker.since);
            if !recovery::due(&policy, &attempts, entry.tracker.since, now) {
                continue;
            }
            if let recovery::Action::Restart(container) = &policy.action {
                // Whose container it is comes before the budget: a refusal restarts
                // nothing, and spends none of it.
                if let Some(refusal) = self.restart_refusal(entry, container).await {
                    self.record_attempt(entry, attempts.count + 1, "restart_refused", Err(refusal))
                        .await;
                    continue;
                }
                if !self.restart_allowed(now) {
                    continue;
                }
            }
            self.attempt_recovery(entry, &policy, attempts.count + 1)
                .await;
        }
    }

    /// Why `container` may not be restarted for `entry`'s instance, if it may not: it does
    /// not carry `concierge.service=<the instance's service>`. An engine that cannot be
    /// asked is no refusal; the restart will fail and say why.
    async fn restart_refusal(&self, entry: &Entry, container: &str) -> Option<String> {
        let socket = self.config.docker_socket.as_ref()?;
        let service = entry.instance.service.as_str();
        match crate::docker::labelled_for(socket, container, service).await {
            Ok(false) => Some(format!(
                "container {container} is not labelled {}={service}",
                crate::docker::SERVICE_LABEL
            )),
            Ok(true) | Err(_) => None,
        }
    }

    /// Whether a container restart fits the fleet-wide budget (and restarts are on).
    fn restart_allowed(&self, now: chrono::DateTime<Utc>) -> bool {
        if self.config.docker_socket.is_none() {
            return false;
        }
        let since = common::config::before(now, self.config.restart_budget_window)
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
            .naive_utc();
        let spent = lock(&self.recoveries)
            .iter()
            .filter(|r| r.action == "restart" && r.at >= since)
            .count();
        spent < self.config.restart_budget
    }

    /// The attempts made for `instance_id` in its outage that began at `since`.
    fn attempts(&self, instance_id: &str, since: chrono::DateTime<Utc>) -> Attempts {
        let rows = lock(&self.recoveries);
        let mine: Vec<&RecoveryRow> = rows
            .iter()
            .filter(|r| r.instance_id == instance_id && r.at >= since.naive_utc())
            .collect();
        Attempts {
            outage: Some(since),
            count: u32::try_from(mine.len()).unwrap_or(u32::MAX),
            last: mine
                .last()
                .map(|r| chrono::DateTime::<Utc>::from_naive_utc_and_offset(r.at, Utc)),
        }
    }

    async fn call_webhook(&self, url: &str, body: &serde_json::Value) -> Result<(), String> {
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(bytes::Bytes::from(body.to_string()))
            .map_err(|e| e.to_string())?;
        match self.client.send(request).await {
            Ok(response) if response.status.is_success() => Ok(()),
            Ok(response) => Err(format!("answered {}", response.status)),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn attempt_recovery(&self, entry: &Entry, policy: &Policy, attempt: u32) {
        let instance = &entry.instance;
        let body = json!({
            "service": instance.service,
            "instance_id": instance.instance_id,
            "address": instance.address,
            "port": instance.port,
            "offline_since": entry.tracker.since,
            "attempt": attempt,
            "max_attempts": policy.max_attempts,
        });
        let (action, outcome) = match &policy.action {
            recovery::Action::Webhook(url) => ("webhook", self.call_webhook(url, &body).await),
            recovery::Action::Restart(container) => {
                let outcome = match &self.config.docker_socket {
                    Some(socket) => {
                        crate::docker::restart(socket, container, Duration::from_secs(10)).await
                    }
                    None => Err("DOCKER_HOST is not set".to_owned()),
                };
                ("restart", outcome)
            }
        };
        self.record_attempt(entry, attempt, action, outcome).await;
    }

    /// Counts, logs and stores one recovery attempt.
    async fn record_attempt(
        &self,
        entry: &Entry,
        attempt: u32,
        action: &str,
        outcome: Result<(), String>,
    ) {
        let instance = &entry.instance;
        self.metrics.recovery(outcome.is_ok());
        tracing::info!(
            service = %instance.service,
            instance = %instance.instance_id,
            attempt,
            ok = outcome.is_ok(),
                        action,
            "recovery attempted"
        );
        let row = RecoveryRow {
            id: uuid::Uuid::new_v4().to_string(),
            service: instance.service.to_string(),
            instance_id: instance.instance_id.clone(),
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
            action: action.to_owned(),
            at: Utc::now().naive_utc(),
            outcome: if outcome.is_ok() { "ok" } else { "failed" }.to_owned(),
            detail: outcome.err().unwrap_or_default(),
        };
        lock(&self.recoveries).push(row.clone());
        if let Err(error) = self
            .db
            .run(move |conn| store::record_recovery(conn, &row))
            .await
        {
            tracing::error!(%error, "cannot store a recovery attempt");
        }
    }

    async fn prune(&self) {
        let before = (Utc::now() - chrono::Duration::hours(24)).naive_utc();
        lock(&self.alerts)
            .retain(|_, a| a.firing || a.resolved_at.is_none_or(|r| r.naive_utc() >= before));
        lock(&self.recoveries).retain(|r| r.at >= before);
        if let Err(error) = self
            .db
            .run(move |conn| store::prune_alerts(conn, before))
            .await
        {
            tracing::warn!(%error, "cannot prune old alerts");
        }
    }

    fn count_states(&self, fleet: &[(&Instance, &Tracker)]) {
        for state in [
            HealthState::Healthy,
            HealthState::Degraded,
            HealthState::Offline,
        ] {
            let count = fleet.iter().filter(|(_, t)| t.state == state).count();
            self.metrics
                .instances
                .with_label_values(&[state.as_str()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    fn count_alerts(&self, book: &BTreeMap<String, Alert>) {
        for (severity, label) in [
            (alerts::Severity::Warning, "warning"),
            (alerts::Severity::Critical, "critical"),
        ] {
            let count = book
                .values()
                .filter(|a| a.firing && a.severity == severity)
                .count();
            self.metrics
                .alerts_firing
                .with_label_values(&[label])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// How an instance asks to be checked: `metadata.check = "tcp"`, else HTTP on its
/// health endpoint.
/// How to check `instance`, from its registration's metadata: `"check": "tcp"` or
/// `"https"` (with `"tls_skip_verify": true` for a certificate nobody signed, and
/// `"tls_server_name"` when the certificate names something other than the address, as
/// in Consul), else HTTP.
fn method(instance: &Instance) -> probe::Method {
    let path = instance.health_endpoint.clone();
    let metadata = &instance.metadata;
    match metadata.get("check").and_then(|c| c.as_str()) {
        Some("tcp") => probe::Method::Tcp,
        Some("https") => probe::Method::Http {
            path,
            tls: Some(probe::Tls {
                verify: metadata.get("tls_skip_verify") != Some(&serde_json::Value::Bool(true)),
                server_name: metadata
                    .get("tls_server_name")
                    .and_then(|name| name.as_str())
                    .map(str::to_owned),
            }),
        },
        _ => probe::Method::Http { path, tls: None },
    }
}
