//! Two monitors share the fleet: each instance checked by exactly one per interval, and a
//! dead monitor's share taken over within one interval.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::support::{Mode, Stack, Upstream};

/// Checks each upstream received during `window`.
async fn checks_during(upstreams: &[Upstream], window: Duration) -> Vec<u64> {
    let before: Vec<u64> = upstreams
        .iter()
        .map(|u| u.hits.load(Ordering::Relaxed))
        .collect();
    tokio::time::sleep(window).await;
    upstreams
        .iter()
        .zip(before)
        .map(|(u, b)| u.hits.load(Ordering::Relaxed) - b)
        .collect()
}

#[tokio::test]
async fn two_monitors_split_the_fleet_and_one_covers_for_a_dead_one() {
    let redis = testkit::RedisServer::start().unwrap();
    // One check per second per instance; membership beats every 200 ms.
    let env = [("CHECK_INTERVAL", "1s")];
    let stack = Stack::start(Some(&redis.url()), &env).await;
    let second = stack.another_monitor(&env).await;
    let mut upstreams = Vec::new();
    for i in 0..16 {
        let upstream = Upstream::start(Mode::Healthy).await;
        stack
            .register(
                "fleet",
                &format!("f-{i}"),
                "127.0.0.1",
                upstream.port,
                json!({}),
            )
            .await;
        upstreams.push(upstream);
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // everyone loaded and on schedule

    // Four intervals: four checks each (one monitor per instance), give or take a
    // boundary; two monitors both checking would make it eight.
    let counts = checks_during(&upstreams, Duration::from_secs(4)).await;
    assert!(
        counts.iter().all(|c| (3..=5).contains(c)),
        "checks per instance: {counts:?}"
    );
    let checks = |page: &str| -> f64 {
        page.lines()
            .filter(|l| l.starts_with("concierge_monitor_checks_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let client = stack.client.clone();
    let page = |url: String| {
        let client = client.clone();
        async move {
            let answer = common::testing::send_json(&client, "GET", &url, None, None).await;
            String::from_utf8_lossy(&answer.body).into_owned()
        }
    };
    let first_checks = checks(&page(stack.monitor.url("/metrics")).await);
    let second_checks = checks(&page(second.url("/metrics")).await);
    assert!(
        first_checks > 8.0 && second_checks > 8.0,
        "both share: {first_checks} and {second_checks}"
    );

    // The second monitor dies without a word; the first takes over its share.
    drop(second); // SIGKILL
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = checks_during(&upstreams, Duration::from_secs(4)).await;
    assert!(
        counts.iter().all(|c| (3..=5).contains(c)),
        "after the kill: {counts:?}"
    );
}
