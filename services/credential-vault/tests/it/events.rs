//! What the vault tells the others: events on `concierge:vault`, revocations learned by
//! a second vault, metrics, and the audit log's filters.

use std::time::Duration;

use common::api::{Channel, Event};
use common::both_backends;
use common::config::RedisUrl;
use common::secret::Secret;
use events::{EventMetrics, ResyncReason, Signal, Subscription};
use serde_json::json;

use crate::support::Fixture;

/// `action:outcome` of each record in an answer of `GET /api/audit`.
fn actions_of(answer: &serde_json::Value) -> Vec<String> {
    answer["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["action"].as_str().unwrap(),
                r["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

async fn next_vault_event(
    subscription: &mut Subscription,
    wanted: impl Fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Signal::Event(envelope)) = subscription.next().await
                && wanted(&envelope.event)
            {
                assert_eq!(envelope.origin, "credential-vault");
                return envelope.event;
            }
        }
    })
    .await
    .expect("the event did not arrive")
}

both_backends!(
    changes_are_published_and_revocations_reach_other_vaults,
    |backend| async move {
        let redis = common::testing::redis_url();
        let fixture = Fixture::new(backend);
        let a = fixture
            .start_with(&[("REDIS_URL", &redis), ("RESYNC_INTERVAL", "60s")])
            .await;
        let b = fixture
            .start_with(&[("REDIS_URL", &redis), ("RESYNC_INTERVAL", "60s")])
            .await;
        let admin = fixture.admin().to_owned();

        let url = RedisUrl::parse(Secret::new(redis.clone())).unwrap();
        let metrics = EventMetrics::new(&prometheus::Registry::new()).unwrap();
        let mut subscription = events::subscribe(
            Some(&url),
            &[Channel::Vault],
            Duration::from_secs(60),
            metrics,
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while subscription.next().await != Some(Signal::Resync(ResyncReason::Connected)) {}
        })
        .await
        .unwrap();

        let id = a
            .create(
                &admin,
                json!({"service": "payments", "name": "evt", "value": "v1"}),
            )
            .await;
        assert_eq!(
            a.call(
                "PUT",
                &format!("/api/credentials/{id}"),
                Some(&admin),
                Some(json!({"value": "v2"}))
            )
            .await
            .status,
            200
        );
        let rotated = next_vault_event(
            &mut subscription,
            |e| matches!(e, Event::CredentialRotated { id: got, .. } if *got == id),
        )
        .await;
        assert!(
            matches!(rotated, Event::CredentialRotated { version: 2, .. }),
            "{rotated:?}"
        );
        assert_eq!(
            a.call(
                "DELETE",
                &format!("/api/credentials/{id}"),
                Some(&admin),
                None
            )
            .await
            .status,
            204
        );
        next_vault_event(
            &mut subscription,
            |e| matches!(e, Event::CredentialDeleted { id: got, .. } if *got == id),
        )
        .await;

        // A token revoked on one vault is refused by the other well before its resync.
        let (token_id, token) = a.issue(&admin, "payments").await;
        assert_eq!(b.get("/api/credentials", &token).await.status, 200);
        assert_eq!(
            a.call(
                "DELETE",
                &format!("/api/tokens/{token_id}"),
                Some(&admin),
                None
            )
            .await
            .status,
            204
        );
        next_vault_event(
            &mut subscription,
            |e| matches!(e, Event::TokenRevoked { id } if *id == token_id),
        )
        .await;
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let answer = b.get("/api/credentials", &token).await;
                if answer.status == 401 {
                    return answer;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the second vault kept accepting a revoked token");
        assert_eq!(refused.json()["detail"], "the token has been revoked");
    }
);

both_backends!(metrics_and_audit_filters, |backend| async move {
    let fixture = Fixture::new(backend);
    let vault = fixture.start().await;
    let admin = fixture.admin().to_owned();
    // Before anything is sealed, the current master key is counted at 0 (a series for
    // dashboards and alerts from the start).
    let metrics = vault.get("/metrics", &admin).await;
    let text = std::str::from_utf8(&metrics.body).unwrap();
    let zero: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("concierge_vault_master_key_sealed_versions{"))
        .collect();
    assert!(
        zero.len() == 1 && zero[0].ends_with(" 0"),
        "sealed versions before any credential: {zero:?}"
    );
    let (_, payments) = vault.issue(&admin, "payments").await;
    let id = vault
        .create(
            &admin,
            json!({"service": "payments", "name": "m", "value": "metric-s3cret"}),
        )
        .await;
    assert_eq!(
        vault
            .get(&format!("/api/credentials/{id}"), &payments)
            .await
            .status,
        200
    );
    let stale = vault
        .call(
            "PUT",
            &format!("/api/credentials/{id}"),
            Some(&admin),
            Some(json!({"value": "x", "cas": 7})),
        )
        .await;
    assert_eq!(stale.status, 409);

    let metrics = vault.get("/metrics", &admin).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for expected in [
        r#"concierge_vault_operations_total{operation="credential.read",outcome="success"} 1"#,
        r#"concierge_vault_operations_total{operation="credential.rotate",outcome="conflict"} 1"#,
        "concierge_vault_decrypt_duration_seconds_count 1",
        "concierge_vault_audit_append_duration_seconds_count",
        "concierge_vault_audit_failures_total 0",
        "concierge_vault_master_key_encryptions_total{master_key_id=",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    assert!(!text.contains("metric-s3cret"));

    // The database's count of versions per master key, for the wear-out alert: the one
    // version made so far, once the next resync (1 s here) has counted it.
    let sealed = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| line.starts_with("concierge_vault_master_key_sealed_versions{"))
            .map(|line| line.rsplit(' ').next().unwrap_or_default().to_owned())
            .collect()
    };
    let started = std::time::Instant::now();
    loop {
        let metrics = vault.get("/metrics", &admin).await;
        let counts = sealed(std::str::from_utf8(&metrics.body).unwrap());
        if counts == ["1"] {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "sealed versions per master key: {counts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The failed rotation counts once, as a conflict, never also as a success.
    assert!(
        !text.contains(r#"operation="credential.rotate",outcome="success""#),
        "{text}"
    );

    // Every rotation attempt has its record, the failed one too.
    let resource = format!("credential:{id}");
    let records = vault
        .get(&format!("/api/audit?resource={resource}"), &admin)
        .await
        .json();
    let actions = actions_of(&records);
    assert_eq!(
        actions,
        [
            "credential.create:success",
            "credential.read:success",
            "credential.rotate:conflict"
        ]
    );
    let by_payments = vault.get("/api/audit?actor=payments", &admin).await.json();
    let by_payments = by_payments["records"].as_array().unwrap();
    assert_eq!(by_payments.len(), 1);
    assert!(
        by_payments[0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("payments token=hmac-sha256:")
    );
    assert!(
        !by_payments[0]["actor"]
            .as_str()
            .unwrap()
            .contains(&payments)
    );
    let future = vault
        .get("/api/audit?since=2999-01-01T00:00:00Z", &admin)
        .await
        .json();
    assert_eq!(future["records"].as_array().unwrap().len(), 0);
    let until = vault
        .get("/api/audit?until=2000-01-01T00:00:00Z", &admin)
        .await
        .json();
    assert_eq!(until["records"].as_array().unwrap().len(), 0);

    // Reading the log is on the record too: each of the four reads above, a bad limit as
    // invalid, and this read itself, written before it ran.
    assert_eq!(vault.get("/api/audit?limit=0", &admin).await.status, 400);
    let reads = actions_of(&vault.get("/api/audit?resource=audit", &admin).await.json());
    let mut expected = vec!["audit.read:success"; 4];
    expected.extend(["audit.read:invalid", "audit.read:success"]);
    assert_eq!(reads, expected);
    vault.assert_never_logged(&["metric-s3cret", &payments]);
});

/// Behind a trusted proxy the audit log names the client that proxy forwarded
/// (`X-Forwarded-For`, read from the right); from any other peer the header is ignored.
#[tokio::test]
async fn audit_records_name_the_client_a_trusted_proxy_forwarded() {
    let fixture = Fixture::new(common::db::Backend::Sqlite);
    let admin = fixture.admin().to_owned();
    // The test connects from 127.0.0.1: trusted in the first run, not in the second.
    for (trusted, expected) in [("127.0.0.0/8", "203.0.113.9"), ("10.0.0.0/8", "127.0.0.1")] {
        let vault = fixture
            .start_with(&[("VAULT_TRUSTED_PROXIES", trusted)])
            .await;
        let name = format!("forwarded-{}", trusted.replace(['.', '/'], "-"));
        let body = json!({ "service": "payments", "name": name, "value": "x" });
        let request = http::Request::post(vault.process.url("/api/credentials"))
            .header("authorization", format!("Bearer {admin}"))
            .header("content-type", "application/json")
            // The client claims 6.6.6.6; the proxy appended the peer it saw.
            .header("x-forwarded-for", "6.6.6.6, 203.0.113.9")
            .body(bytes::Bytes::from(body.to_string()))
            .unwrap();
        let created = vault.client.send(request).await.unwrap();
        assert_eq!(created.status, 201, "{:?}", created.json());
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let records = vault
            .get(&format!("/api/audit?resource=credential:{id}"), &admin)
            .await
            .json();
        assert_eq!(
            records["records"][0]["client_addr"], expected,
            "trusting {trusted}"
        );
        // The list is logged at start, so that an operator sees whom the vault believes.
        let output = vault.process.output();
        assert!(
            output.contains("X-Forwarded-For is read from these peers") && output.contains(trusted),
            "{output}"
        );
    }
}
