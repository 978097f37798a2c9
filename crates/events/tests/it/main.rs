//! The event bus against a real Redis server: delivery, reconnects, and life without Redis.

use std::time::Duration;

use common::api::{Channel, Event, ServiceName};
use common::config::RedisUrl;
use common::secret::Secret;
use events::{EventMetrics, Publisher, ResyncReason, Signal, Subscription};
use prometheus::Registry;
use testkit::RedisServer;

const PATIENCE: Duration = Duration::from_secs(20);

fn url(server: &RedisServer) -> RedisUrl {
    RedisUrl::parse(Secret::new(server.url())).unwrap()
}

fn metrics() -> (Registry, EventMetrics) {
    let registry = Registry::new();
    let metrics = EventMetrics::new(&registry).unwrap();
    (registry, metrics)
}

fn revoked(id: &str) -> Event {
    Event::TokenRevoked { id: id.into() }
}

/// Waits for the next signal that `pick` accepts, skipping others (interval resyncs).
async fn next_matching(subscription: &mut Subscription, pick: impl Fn(&Signal) -> bool) -> Signal {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let signal = subscription.next().await.expect("subscription ended");
            if pick(&signal) {
                return signal;
            }
        }
    })
    .await
    .expect("no matching signal in time")
}

async fn next_event(subscription: &mut Subscription) -> Event {
    match next_matching(subscription, |s| matches!(s, Signal::Event(_))).await {
        Signal::Event(envelope) => envelope.event,
        Signal::Resync(_) => unreachable!(),
    }
}

async fn connected(subscription: &mut Subscription) {
    next_matching(subscription, |s| {
        *s == Signal::Resync(ResyncReason::Connected)
    })
    .await;
}

#[tokio::test]
async fn an_event_published_on_one_connection_arrives_on_another() {
    let server = RedisServer::start().unwrap();
    let (_, sub_metrics) = metrics();
    let mut subscription = events::subscribe(
        Some(&url(&server)),
        &[Channel::Vault, Channel::Registry],
        Duration::from_secs(60),
        sub_metrics,
    )
    .unwrap();
    assert_eq!(
        subscription.next().await,
        Some(Signal::Resync(ResyncReason::Start))
    );
    connected(&mut subscription).await;

    let (registry, pub_metrics) = metrics();
    let publisher = Publisher::new(Some(&url(&server)), "test-origin", pub_metrics).unwrap();
    publisher.ping().await.unwrap();
    publisher.publish(revoked("t-1")).await.unwrap();
    let deregistered = Event::InstanceDeregistered {
        service: ServiceName::parse("payments").unwrap(),
        instance_id: "i-9".into(),
    };
    publisher.publish(deregistered.clone()).await.unwrap();
    // Not subscribed to the health channel: this one must not arrive.
    publisher
        .publish(Event::HealthChanged {
            service: ServiceName::parse("payments").unwrap(),
            instance_id: "i-9".into(),
            from: common::api::HealthState::Healthy,
            to: common::api::HealthState::Offline,
            reason: "connect".into(),
            latency_ms: None,
        })
        .await
        .unwrap();
    publisher.publish(revoked("t-2")).await.unwrap();

    assert_eq!(next_event(&mut subscription).await, revoked("t-1"));
    assert_eq!(next_event(&mut subscription).await, deregistered);
    assert_eq!(next_event(&mut subscription).await, revoked("t-2"));

    let text = String::from_utf8(common::metrics::render(&registry)).unwrap();
    assert!(
        text.contains(
            r#"concierge_events_published_total{channel="concierge:vault",outcome="sent"} 2"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn the_subscriber_reconnects_after_redis_restarts_and_asks_for_a_resync() {
    let mut server = RedisServer::start().unwrap();
    let (registry, sub_metrics) = metrics();
    let mut subscription = events::subscribe(
        Some(&url(&server)),
        &[Channel::Vault],
        Duration::from_secs(60),
        sub_metrics,
    )
    .unwrap();
    connected(&mut subscription).await;
    let (_, pub_metrics) = metrics();
    let publisher = Publisher::new(Some(&url(&server)), "test-origin", pub_metrics).unwrap();
    publisher.publish(revoked("before")).await.unwrap();
    assert_eq!(next_event(&mut subscription).await, revoked("before"));

    let readiness = publisher.add_readiness_check(
        common::readiness::Readiness::new().with_check("database", || async { Ok(()) }),
    );
    assert_eq!(readiness.evaluate().await.unwrap()["status"], "ready");

    server.stop();
    // While Redis is away, a publish fails and says so; the event is not silently "sent".
    assert!(publisher.publish(revoked("lost")).await.is_err());
    assert!(publisher.ping().await.is_err());
    // The service stays ready (it works without Redis), and says what is down.
    let degraded = readiness
        .evaluate()
        .await
        .expect("still ready without Redis");
    assert_eq!(degraded["status"], "degraded");
    assert_eq!(degraded["checks"]["redis"], "down");
    server.start_server().unwrap();

    connected(&mut subscription).await;
    // The publisher's connection manager reconnects by itself too.
    tokio::time::timeout(PATIENCE, async {
        while publisher.publish(revoked("after")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the publisher did not reconnect");
    assert_eq!(next_event(&mut subscription).await, revoked("after"));

    let text = String::from_utf8(common::metrics::render(&registry)).unwrap();
    assert!(
        text.contains(r#"concierge_events_resyncs_total{reason="connected"} 2"#),
        "{text}"
    );
    assert!(
        text.contains("concierge_events_redis_connected 1"),
        "{text}"
    );
}

#[tokio::test]
async fn without_redis_only_the_timer_fires_and_publishing_is_counted() {
    let (registry, metrics) = metrics();
    let mut subscription = events::subscribe(
        None,
        &Channel::ALL,
        Duration::from_millis(150),
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(
        subscription.next().await,
        Some(Signal::Resync(ResyncReason::Start))
    );
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .unwrap();
        assert_eq!(next, Some(Signal::Resync(ResyncReason::Interval)));
    }

    let publisher = Publisher::new(None, "test-origin", metrics).unwrap();
    publisher.publish(revoked("nowhere")).await.unwrap();
    publisher.ping().await.unwrap();
    let text = String::from_utf8(common::metrics::render(&registry)).unwrap();
    assert!(
        text.contains(
            r#"concierge_events_published_total{channel="concierge:vault",outcome="no_redis"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_bad_redis_url_is_refused_without_quoting_it() {
    let bad = RedisUrl::parse(Secret::new("redis://:hunter2@[::1".into())).unwrap();
    let (_, metrics) = metrics();
    let error = Publisher::new(Some(&bad), "x", metrics).unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");
}

#[tokio::test]
async fn the_shared_limit_is_exact_across_connections_and_refills_by_the_interval() {
    let server = RedisServer::start().unwrap();
    let one = events::SharedLimiter::new(&url(&server)).unwrap();
    let two = events::SharedLimiter::new(&url(&server)).unwrap();
    // 5 per minute: an interval of 12 s, so nothing refills during the burst.
    let (interval, period) = (12_000_000, 60_000_000);
    let mut calls = Vec::new();
    for i in 0..40 {
        let limiter = if i % 2 == 0 { one.clone() } else { two.clone() };
        calls.push(tokio::spawn(async move {
            limiter.gcra("test:burst", interval, period).await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| a.allowed).count(), 5);
    let refused = answers.iter().find(|a| !a.allowed).unwrap();
    assert!(
        (11_000_000..=12_000_000).contains(&refused.retry_after_us),
        "{refused:?}"
    );
    assert!(refused.full_in_us > 59_000_000 && refused.full_in_us <= 60_000_000);

    // A fast limit: 1 per 50 ms lets one more through after 50 ms.
    let first = one.gcra("test:fast", 50_000, 50_000).await.unwrap();
    let second = one.gcra("test:fast", 50_000, 50_000).await.unwrap();
    assert!(first.allowed && !second.allowed);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(two.gcra("test:fast", 50_000, 50_000).await.unwrap().allowed);
}

#[tokio::test]
async fn members_see_each_other_and_a_silent_one_expires() {
    let server = RedisServer::start().unwrap();
    let a = events::Membership::new(&url(&server), "test", "a").unwrap();
    let b = events::Membership::new(&url(&server), "test", "b").unwrap();
    let ttl = Duration::from_millis(300);
    assert_eq!(a.beat(ttl).await.unwrap(), ["a"]);
    assert_eq!(b.beat(ttl).await.unwrap(), ["a", "b"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.beat(ttl).await.unwrap(), ["a", "b"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.beat(ttl).await.unwrap(), ["a"], "b stopped beating");
    b.beat(ttl).await.unwrap();
    b.leave().await;
    assert_eq!(a.beat(ttl).await.unwrap(), ["a"], "b left");
}

#[tokio::test]
async fn a_request_one_limit_refuses_spends_nothing_of_the_others() {
    let server = RedisServer::start().unwrap();
    let limiter = events::SharedLimiter::new(&url(&server)).unwrap();
    // Two per minute each: nothing refills during the test.
    let (interval, period) = (30_000_000, 60_000_000);
    let both = [("test:a", interval, period), ("test:b", interval, period)];
    for _ in 0..2 {
        let spent = limiter.gcra("test:b", interval, period).await.unwrap();
        assert!(spent.allowed, "{spent:?}");
    }
    // b is spent: refused, and a is not charged for it, however often.
    for _ in 0..3 {
        let answers = limiter.gcra_all(&both).await.unwrap();
        assert!(answers[0].allowed && !answers[1].allowed, "{answers:?}");
        assert_eq!(answers[0].full_in_us, 0, "a was charged: {answers:?}");
    }
    // a still has both of its own.
    assert!(
        limiter
            .gcra("test:a", interval, period)
            .await
            .unwrap()
            .allowed
    );
    let second = limiter.gcra("test:a", interval, period).await.unwrap();
    assert!(second.allowed, "{second:?}");
}
