//! Rate limits: exact under bursts, per client and per service, on one gateway and across
//! two sharing Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::client::ClientResponse;
use serde_json::json;

use crate::support::{Stack, Upstream, burst, get, metric, routes_file};

fn allowed(answers: &[ClientResponse]) -> usize {
    for answer in answers {
        assert!(
            matches!(answer.status.as_u16(), 200 | 429),
            "{}",
            answer.status
        );
    }
    answers.iter().filter(|a| a.status == 200).count()
}

#[tokio::test]
async fn limits_per_client_and_per_service_are_exact_on_one_gateway() {
    let dir = testkit::TempDir::new("gateway-routes").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [
            {"prefix": "/open", "rate_limit": {"per_client": "5/m"}},
            {"prefix": "/mine", "require_token": true, "rate_limit": {"per_client": "3/m"}},
            {"prefix": "/shared", "require_token": true, "rate_limit": {"per_service": "4/m"}},
        ]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let upstream = Upstream::start("u").await;
    for service in ["open", "mine", "shared"] {
        stack
            .register(service, &format!("{service}-1"), upstream.port, json!({}))
            .await;
    }
    stack.wait_for("/shared/x", 401).await;
    stack.wait_for("/mine/x", 401).await;
    stack.wait_for("/open/x", 200).await; // spends one of the five

    let answers = burst(&stack, &[&stack.gateway], "/open/x", None, 30).await;
    assert_eq!(allowed(&answers), 4, "5 per minute, one spent already");
    let refused = answers.iter().find(|a| a.status == 429).unwrap();
    assert_eq!(refused.json()["type"], "urn:concierge:problem:rate-limited");
    assert_eq!(refused.header("ratelimit-limit"), Some("5"));
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry_after), "{retry_after}");
    let reset: u64 = refused.header("ratelimit-reset").unwrap().parse().unwrap();
    assert!((48..=60).contains(&reset), "{reset}");
    let passed = answers.iter().find(|a| a.status == 200).unwrap();
    assert!(passed.header("ratelimit-remaining").is_some());

    // Per client: each token subject has its own allowance.
    let alpha = stack.vault.issue("alpha").await;
    let beta = stack.vault.issue("beta").await;
    assert_eq!(
        allowed(&burst(&stack, &[&stack.gateway], "/mine/x", Some(&alpha), 10).await),
        3
    );
    assert_eq!(
        allowed(&burst(&stack, &[&stack.gateway], "/mine/x", Some(&beta), 10).await),
        3
    );

    // Per service: all clients together.
    let mut both = burst(&stack, &[&stack.gateway], "/shared/x", Some(&alpha), 10).await;
    both.extend(burst(&stack, &[&stack.gateway], "/shared/x", Some(&beta), 10).await);
    assert_eq!(allowed(&both), 4);
    // The proxy endpoint spends the same allowance as the route it stands for.
    let proxied = common::testing::send_json(
        &stack.client,
        "POST",
        &stack.gateway.url("/api/gateway/proxy"),
        Some(&alpha),
        Some(json!({"service": "shared", "method": "GET", "path": "/x"})),
    )
    .await;
    assert_eq!(proxied.status, 429, "{:?}", proxied.json());

    let page = get(&stack.client, &stack.gateway, "/metrics", None).await;
    let page = String::from_utf8_lossy(&page.body).into_owned();
    assert_eq!(
        metric(
            &page,
            r#"concierge_gateway_rate_limited_total{route="/shared",scope="service"}"#
        ),
        Some(16.0)
    );
}

#[tokio::test]
async fn two_gateways_sharing_redis_hold_one_limit() {
    let redis = testkit::RedisServer::start().unwrap();
    let dir = testkit::TempDir::new("gateway-routes").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [
            {"prefix": "/burst", "rate_limit": {"per_service": "10/m"}},
            {"prefix": "/steady", "rate_limit": {"per_service": "40/s"}},
        ]}),
    );
    let env = [("ROUTES_FILE", routes.as_str())];
    let stack = Stack::with_redis(&redis.url(), &env).await;
    let second = stack.spawn_gateway(&env).await;
    let upstream = Upstream::start("u").await;
    stack
        .register("burst", "b-1", upstream.port, json!({}))
        .await;
    stack
        .register("steady", "s-1", upstream.port, json!({}))
        .await;
    for gateway in [&stack.gateway, &second] {
        crate::support::wait_for(&stack.client, gateway, "/steady/x", 200).await;
    }
    let gateways = [&stack.gateway, &second];

    // Exact under a burst: 40 requests at once over two gateways, a limit of 10.
    assert_eq!(
        allowed(&burst(&stack, &gateways, "/burst/x", None, 40).await),
        10
    );

    // Sustained: GCRA lets the burst (40) through, then 40 per second.
    tokio::time::sleep(Duration::from_secs(2)).await; // the bucket refills
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(3);
    let mut loops = Vec::new();
    for i in 0..8 {
        let client = stack.client.clone();
        let url = gateways[i % 2].url("/steady/x");
        let ok = ok.clone();
        loops.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                let answer = common::testing::send_json(&client, "GET", &url, None, None).await;
                if answer.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 40.0 + 40.0 * elapsed;
    let got = ok.load(Ordering::Relaxed) as f64;
    assert!(
        (got - expected).abs() <= expected * 0.1,
        "{got} allowed over {elapsed:.2} s; expected {expected:.0} ± 10 %"
    );
}

/// A route limited per client and per service: a request one limit refuses spends
/// nothing of the other.
async fn a_refused_request_spends_no_other_limit(redis: Option<&str>) {
    let dir = testkit::TempDir::new("gateway-routes").unwrap();
    // The client's limit never refills during the test; the service's does, 5 s after
    // it is spent (time enough for the first four requests on a loaded machine).
    let routes = routes_file(
        &dir,
        json!({"routes": [
            {"prefix": "/both", "require_token": true,
             "rate_limit": {"per_client": "2/m", "per_service": "3/15s"}},
        ]}),
    );
    let env = [("ROUTES_FILE", routes.as_str())];
    let stack = match redis {
        Some(url) => Stack::with_redis(url, &env).await,
        None => Stack::start(&env).await,
    };
    let upstream = Upstream::start("u").await;
    stack
        .register("both", "both-1", upstream.port, json!({}))
        .await;
    stack.wait_for("/both/x", 401).await;
    let alpha = stack.vault.issue("alpha").await;
    let beta = stack.vault.issue("beta").await;

    // alpha spends its two; beta the service's third.
    for token in [&alpha, &alpha, &beta] {
        assert_eq!(stack.get_as("/both/x", token).await.status, 200);
    }
    // Refused by the service's limit: beta's second stays unspent.
    let refused = stack.get_as("/both/x", &beta).await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("ratelimit-limit"),
        Some("3"),
        "the service's"
    );

    // Once the service's limit has room for one more: alpha, refused by its own limit,
    // leaves it to beta, who still has its second.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let refused = stack.get_as("/both/x", &alpha).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("ratelimit-limit"), Some("2"), "the client's");
    let second = stack.get_as("/both/x", &beta).await;
    assert_eq!(
        second.status,
        200,
        "beta's second request: {:?}",
        second.json()
    );
    assert_eq!(second.header("ratelimit-remaining"), Some("0"));
}

#[tokio::test]
async fn a_request_one_limit_refuses_spends_nothing_of_the_other() {
    a_refused_request_spends_no_other_limit(None).await;
}

#[tokio::test]
async fn a_request_one_limit_refuses_spends_nothing_of_the_other_with_redis() {
    let redis = testkit::RedisServer::start().unwrap();
    a_refused_request_spends_no_other_limit(Some(&redis.url())).await;
}

/// When both of a route's limits refuse, the answer is the one that allows the next
/// request last: coming back after the other's `Retry-After` would only be refused again.
#[tokio::test]
async fn refused_by_both_limits_the_later_retry_is_given() {
    let dir = testkit::TempDir::new("gateway-routes").unwrap();
    let routes = routes_file(
        &dir,
        json!({"routes": [
            {"prefix": "/both", "rate_limit": {"per_client": "2/2s", "per_service": "2/m"}},
        ]}),
    );
    let stack = Stack::start(&[("ROUTES_FILE", &routes)]).await;
    let upstream = Upstream::start("u").await;
    stack
        .register("both", "both-1", upstream.port, json!({}))
        .await;
    stack.wait_for("/both/x", 200).await; // spends one of each
    assert_eq!(stack.get("/both/x").await.status, 200);
    let refused = stack.get("/both/x").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["scope"], "service", "{:?}", refused.json());
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((20..=30).contains(&retry_after), "{retry_after}");
}
