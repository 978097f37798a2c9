//! Concierge's event bus over Redis pub/sub, and the only crate that imports `redis`.
//!
//! Pub/sub is at-most-once: a subscriber that is disconnected misses messages. So a
//! [`Subscription`] yields [`Signal::Resync`] at start, after every (re)connect and every
//! resync interval, and consumers reload their full state on it (DESIGN.md, "Events").
//! Without `REDIS_URL` only the timer fires, and publishing is a counted no-op.

#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use common::api::{Channel, Envelope, Event};
use common::config::RedisUrl;
use futures_util::StreamExt;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How often a subscriber pings Redis to notice a connection that died silently.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long Redis may take to answer anything before the connection counts as lost.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff: doubling from the first to the cap, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

mod limiter;
mod membership;

pub use limiter::{GCRA_SCRIPT, GcraAnswer, SharedLimiter};
pub use membership::{MEMBERSHIP_SCRIPT, Membership, owner};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    #[error("cannot publish to Redis: {0}")]
    Publish(String),
    #[error("Redis did not decide: {0}")]
    Script(String),
}

/// The bus's metrics, registered in the owning service's registry.
#[derive(Debug, Clone)]
pub struct EventMetrics {
    /// Events handed to `publish`, by channel and outcome (`sent`, `failed`, `no_redis`).
    published: IntCounterVec,
    /// Events received from Redis, by channel and outcome (`ok`, `malformed`).
    received: IntCounterVec,
    /// Resync signals emitted, by reason (`start`, `connected`, `interval`).
    resyncs: IntCounterVec,
    /// 1 while the subscriber holds a live Redis connection.
    connected: IntGauge,
}

impl EventMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        use common::metrics::register;
        Ok(Self {
            published: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "concierge_events_published_total",
                        "Events handed to the bus, by channel and outcome (sent, failed, no_redis).",
                    ),
                    &["channel", "outcome"],
                )?,
            )?,
            received: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "concierge_events_received_total",
                        "Events received from Redis, by channel and outcome (ok, malformed).",
                    ),
                    &["channel", "outcome"],
                )?,
            )?,
            resyncs: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "concierge_events_resyncs_total",
                        "Full-state reloads signalled to consumers, by reason (start, connected, interval).",
                    ),
                    &["reason"],
                )?,
            )?,
            connected: register(
                registry,
                IntGauge::new(
                    "concierge_events_redis_connected",
                    "1 while the event subscriber holds a live Redis connection, else 0.",
                )?,
            )?,
        })
    }
}

fn client(url: &RedisUrl) -> Result<redis::Client, EventsError> {
    // The parse error may quote the URL, and with it a password: keep only its kind.
    redis::Client::open(url.expose())
        .map_err(|e| EventsError::InvalidUrl(format!("{:?}", e.kind())))
}

/// A connection made on first use and remade after a loss, with timeouts on every call.
fn lazy_connection(url: &RedisUrl) -> Result<ConnectionManager, EventsError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(BACKOFF_CAP);
    ConnectionManager::new_lazy_with_config(client(url)?, config)
        .map_err(|e| EventsError::InvalidUrl(format!("{:?}", e.kind())))
}

/// Publishes events on their channels; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    connection: Option<ConnectionManager>,
    origin: String,
    metrics: EventMetrics,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("redis", &self.connection.is_some())
            .field("origin", &self.origin)
            .finish()
    }
}

impl Publisher {
    /// Connects lazily: a service starts while Redis is down and publishes once it is back.
    pub fn new(
        redis_url: Option<&RedisUrl>,
        origin: impl Into<String>,
        metrics: EventMetrics,
    ) -> Result<Self, EventsError> {
        let connection = redis_url.map(lazy_connection).transpose()?;
        Ok(Self {
            connection,
            origin: origin.into(),
            metrics,
        })
    }

    /// Publishes `event`. Without Redis this does nothing but count; with Redis a failure
    /// is returned (and counted): the event is lost, and reconciliation will catch up.
    pub async fn publish(&self, event: Event) -> Result<(), EventsError> {
        let channel = event.channel().name();
        let Some(connection) = &self.connection else {
            self.metrics
                .published
                .with_label_values(&[channel, "no_redis"])
                .inc();
            return Ok(());
        };
        let payload = serde_json::to_string(&Envelope::new(event, self.origin.clone()))
            .map_err(|e| EventsError::Publish(e.to_string()))?;
        let mut connection = connection.clone();
        let sent = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut connection)
            .await;
        let outcome = if sent.is_ok() { "sent" } else { "failed" };
        self.metrics
            .published
            .with_label_values(&[channel, outcome])
            .inc();
        sent.map(drop)
            .map_err(|e| EventsError::Publish(e.to_string()))
    }

    /// Adds the optional `redis` check to `readiness` when there is a Redis to check:
    /// without Redis every service still works (events fall back to resyncs, rate limits
    /// to each process), so it degrades readiness but never fails it.
    pub fn add_readiness_check(
        &self,
        readiness: common::readiness::Readiness,
    ) -> common::readiness::Readiness {
        if self.connection.is_none() {
            return readiness;
        }
        let publisher = self.clone();
        readiness.with_optional_check("redis", move || {
            let publisher = publisher.clone();
            async move { publisher.ping().await }
        })
    }

    /// `PING`, for `/ready`; `Ok` when there is no Redis to be down.
    pub async fn ping(&self) -> Result<(), String> {
        let Some(connection) = &self.connection else {
            return Ok(());
        };
        let mut connection = connection.clone();
        let answer = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
        }
    }
}

/// Why consumers should reload their full state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The subscription just started.
    Start,
    /// The subscriber (re)connected to Redis; messages may have been missed meanwhile.
    Connected,
    /// The periodic reconciliation.
    Interval,
}

impl ResyncReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Connected => "connected",
            Self::Interval => "interval",
        }
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Resync(ResyncReason),
    Event(Box<Envelope>),
}

/// A stream of [`Signal`]s; dropping it stops its background tasks.
#[derive(Debug)]
pub struct Subscription {
    signals: mpsc::Receiver<Signal>,
    tasks: Vec<JoinHandle<()>>,
}

impl Subscription {
    /// The next signal; `None` only if the background tasks died.
    pub async fn next(&mut self) -> Option<Signal> {
        self.signals.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Subscribes to `channels`. Must be called within a Tokio runtime.
pub fn subscribe(
    redis_url: Option<&RedisUrl>,
    channels: &[Channel],
    resync_interval: Duration,
    metrics: EventMetrics,
) -> Result<Subscription, EventsError> {
    let (tx, signals) = mpsc::channel(1024);
    let client = redis_url.map(client).transpose()?;
    let mut tasks = vec![tokio::spawn(resync_timer(
        tx.clone(),
        resync_interval,
        metrics.clone(),
    ))];
    if let Some(client) = client {
        let channels: Vec<&'static str> = channels.iter().map(|c| c.name()).collect();
        tasks.push(tokio::spawn(listen(client, channels, tx, metrics)));
    }
    Ok(Subscription { signals, tasks })
}

async fn send_resync(
    tx: &mpsc::Sender<Signal>,
    reason: ResyncReason,
    metrics: &EventMetrics,
) -> bool {
    metrics.resyncs.with_label_values(&[reason.as_str()]).inc();
    tx.send(Signal::Resync(reason)).await.is_ok()
}

async fn resync_timer(tx: mpsc::Sender<Signal>, every: Duration, metrics: EventMetrics) {
    if !send_resync(&tx, ResyncReason::Start, &metrics).await {
        return;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !send_resync(&tx, ResyncReason::Interval, &metrics).await {
            return;
        }
    }
}

/// Connect, subscribe, signal a resync, relay messages; on any loss, back off and again.
async fn listen(
    client: redis::Client,
    channels: Vec<&'static str>,
    tx: mpsc::Sender<Signal>,
    metrics: EventMetrics,
) {
    let mut failures: u32 = 0;
    loop {
        match relay(&client, &channels, &tx, &metrics).await {
            Relay::ReceiverGone => return,
            Relay::Lost(error) => {
                metrics.connected.set(0);
                if failures == 0 {
                    tracing::warn!(%error, "event subscriber lost Redis; reconnecting");
                } else {
                    tracing::debug!(%error, failures, "event subscriber still cannot reach Redis");
                }
                failures = failures.saturating_add(1);
            }
            Relay::Subscribed => failures = 0,
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

enum Relay {
    /// Was subscribed, then lost the connection (the next attempt starts afresh).
    Subscribed,
    /// Could not connect or subscribe.
    Lost(String),
    ReceiverGone,
}

async fn relay(
    client: &redis::Client,
    channels: &[&'static str],
    tx: &mpsc::Sender<Signal>,
    metrics: &EventMetrics,
) -> Relay {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        for channel in channels {
            pubsub.subscribe(*channel).await?;
        }
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = match tokio::time::timeout(REDIS_TIMEOUT, connect).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return Relay::Lost(e.to_string()),
        Err(_) => return Relay::Lost(format!("no answer within {REDIS_TIMEOUT:?}")),
    };
    metrics.connected.set(1);
    tracing::info!(?channels, "event subscriber connected to Redis");
    // Subscribed first, reloaded second: nothing falls between the two.
    if !send_resync(tx, ResyncReason::Connected, metrics).await {
        return Relay::ReceiverGone;
    }
    let (mut sink, mut stream) = pubsub.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return Relay::Subscribed };
                let channel = message.get_channel_name().to_owned();
                let Some(signal) = decode(&channel, message.get_payload_bytes(), metrics) else {
                    continue;
                };
                if tx.send(signal).await.is_err() {
                    return Relay::ReceiverGone;
                }
            }
            _ = ping.tick() => {
                let answered = tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<String>()).await;
                if !matches!(answered, Ok(Ok(_))) {
                    tracing::warn!("Redis did not answer the subscriber's ping");
                    return Relay::Subscribed;
                }
            }
        }
    }
}

fn decode(channel: &str, payload: &[u8], metrics: &EventMetrics) -> Option<Signal> {
    let label = common::api::Channel::from_name(channel).map_or("other", |c| c.name());
    match serde_json::from_slice::<Envelope>(payload) {
        Ok(envelope) => {
            metrics.received.with_label_values(&[label, "ok"]).inc();
            Some(Signal::Event(Box::new(envelope)))
        }
        Err(error) => {
            // Newer publishers may send types this build does not know: skip, don't stop.
            metrics
                .received
                .with_label_values(&[label, "malformed"])
                .inc();
            tracing::warn!(channel, %error, "skipping an event this build cannot read");
            None
        }
    }
}

fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return BACKOFF_FIRST;
    }
    let doubled = BACKOFF_FIRST.saturating_mul(1 << failures.min(16));
    let capped = doubled.min(BACKOFF_CAP);
    // ±20 % so that many subscribers do not reconnect in lockstep.
    capped.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// Keeps a registered instance's credentials fresh: whenever the vault announces a
/// rotation of one of them, the client registers again and so receives the new value.
/// Reconciliation (every resync) registers again too, in case an event was lost.
pub fn refresh_credentials_on_rotation(
    client: std::sync::Arc<common::registration::RegistryClient>,
    redis_url: Option<&RedisUrl>,
    resync_interval: Duration,
    metrics: EventMetrics,
) -> Result<JoinHandle<()>, EventsError> {
    let mut subscription = subscribe(redis_url, &[Channel::Vault], resync_interval, metrics)?;
    Ok(tokio::spawn(async move {
        while let Some(signal) = subscription.next().await {
            let rotated = match &signal {
                Signal::Event(envelope) => match &envelope.event {
                    Event::CredentialRotated { service, name, .. } => {
                        client.wants(service.as_str(), name)
                    }
                    _ => false,
                },
                // At start the client registers by itself; later resyncs catch lost events.
                Signal::Resync(reason) => *reason == ResyncReason::Interval,
            };
            if rotated && let Err(error) = client.register().await {
                tracing::warn!(%error, "cannot refresh credentials; will retry on the next resync");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        assert_eq!(backoff(0), BACKOFF_FIRST);
        let third = backoff(3);
        assert!(
            third >= Duration::from_millis(640) && third <= Duration::from_millis(960),
            "{third:?}"
        );
        for failures in [10, 100, u32::MAX] {
            assert!(backoff(failures) <= BACKOFF_CAP.mul_f64(1.2));
        }
    }
}
