//! Registration with credentials, heartbeats, discovery, expiry, restarts, scopes,
//! blocking reads, bad input, and two registries over one database.

use std::time::{Duration, Instant};

use common::both_backends;
use common::testing::{TestDb, VaultFixture};
use serde_json::json;

use crate::support::{Registry, eventually};

fn registration(id: &str) -> serde_json::Value {
    json!({
        "name": "payments", "version": "1.4.2", "address": "127.0.0.1", "port": 9100,
        "health_endpoint": "/health", "instance_id": id, "tags": ["blue"],
        "credentials_needed": ["db-password", "not-there"], "dependencies": ["orders"],
    })
}

both_backends!(register_heartbeat_discover_expire, |backend| async move {
    let vault = VaultFixture::start().await;
    vault
        .create_credential("payments", "db-password", json!("pg-s3cret"))
        .await;
    let payments = vault.issue("payments").await;
    let db = TestDb::new(backend);
    let registry = Registry::start(&vault, &db.url, &[]).await;

    let registered = registry.register(&payments, registration("p-1")).await;
    assert_eq!(registered.status, 201, "{:?}", registered.json());
    let body = registered.json();
    assert_eq!(body["instance_id"], "p-1");
    assert_eq!(
        body["credentials"]["db-password"], "pg-s3cret",
        "fetched with the caller's own token"
    );
    assert_eq!(body["missing_credentials"], json!(["not-there"]));
    assert_eq!(body["ttl_s"].as_f64().unwrap(), 0.6);

    // Re-registering the same id updates in place.
    let mut again = registration("p-1");
    again["port"] = 9101.into();
    assert_eq!(registry.register(&payments, again).await.status, 201);
    let listed = registry
        .get("/api/services/payments", &payments)
        .await
        .json();
    assert_eq!(listed["instances"].as_array().unwrap().len(), 1);
    assert_eq!(listed["instances"][0]["port"], 9101);

    let beat = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/heartbeat",
            Some(&payments),
            Some(json!({"load": 0.3})),
        )
        .await;
    assert_eq!(beat.status, 200, "{:?}", beat.json());
    let found = registry
        .get("/api/discover?service=payments", &payments)
        .await;
    assert_eq!(found.status, 200);
    assert_eq!(found.json()["address"], "127.0.0.1");
    assert_eq!(found.json()["port"], 9101);
    assert_eq!(found.json()["load"], 0.3);
    let health = registry
        .get("/api/services/payments/health", &payments)
        .await
        .json();
    assert_eq!(health["health"], "healthy");
    let everything = registry.get("/api/instances", &payments).await;
    assert_eq!(everything.status, 200);
    let everything = everything.json();
    let ids: Vec<&str> = everything["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["p-1"]);
    assert_eq!(
        everything["index"].to_string(),
        registry
            .get("/api/instances", &payments)
            .await
            .header("x-concierge-index")
            .unwrap()
    );

    // Heartbeats stop: offline after the TTL, then removed after DEREGISTER_AFTER.
    eventually(Duration::from_secs(5), "going offline", || async {
        registry
            .get("/api/discover?service=payments", &payments)
            .await
            .status
            == 503
    })
    .await;
    let unavailable = registry
        .get("/api/discover?service=payments", &payments)
        .await;
    assert_eq!(
        unavailable.json()["type"],
        "urn:concierge:problem:no-healthy-instance"
    );
    assert!(unavailable.header("retry-after").is_some());
    eventually(Duration::from_secs(5), "deregistration", || async {
        registry
            .get("/api/discover?service=payments", &payments)
            .await
            .status
            == 404
    })
    .await;
    let gone = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/heartbeat",
            Some(&payments),
            None,
        )
        .await;
    assert_eq!(
        gone.status, 404,
        "a heartbeat for a forgotten instance says: register again"
    );
    assert!(
        !registry.process.output().contains("pg-s3cret"),
        "a credential reached the logs"
    );
});

both_backends!(registrations_survive_a_restart, |backend| async move {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let db = TestDb::new(backend);
    let registry = Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
    assert_eq!(
        registry
            .register(&payments, registration("p-1"))
            .await
            .status,
        201
    );
    drop(registry);
    let registry = Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
    let found = registry
        .get("/api/discover?service=payments", &payments)
        .await;
    assert_eq!(found.status, 200, "{:?}", found.json());
    assert_eq!(found.json()["instance_id"], "p-1");
});

#[tokio::test]
async fn a_service_cannot_touch_another_services_instances() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let orders = vault.issue("orders").await;
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
    assert_eq!(
        registry
            .register(&payments, registration("p-1"))
            .await
            .status,
        201
    );

    assert_eq!(
        registry.register(&orders, registration("p-2")).await.status,
        403
    );
    let beat = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/heartbeat",
            Some(&orders),
            None,
        )
        .await;
    assert_eq!(beat.status, 403);
    let removal = registry
        .call(
            "DELETE",
            "/api/services/payments/instances/p-1",
            Some(&orders),
            None,
        )
        .await;
    assert_eq!(removal.status, 403);
    let health = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/health",
            Some(&orders),
            Some(json!({"state": "offline"})),
        )
        .await;
    assert_eq!(health.status, 403, "only the monitor's scope sets health");
    let monitor = vault.token("health-monitor");
    let health = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/health",
            Some(monitor),
            Some(json!({"state": "degraded", "reason": "slow"})),
        )
        .await;
    assert_eq!(health.status, 204);
    assert_eq!(
        registry
            .get("/api/services/payments/health", &orders)
            .await
            .json()["health"],
        "degraded"
    );
    assert_eq!(
        registry
            .call(
                "DELETE",
                "/api/services/payments/instances/p-1",
                Some(&payments),
                None
            )
            .await
            .status,
        204
    );
    assert_eq!(
        registry
            .call("GET", "/api/services", None, None)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn a_blocking_read_returns_soon_after_a_change_or_after_its_wait() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let db = TestDb::sqlite();
    let registry = std::sync::Arc::new(
        Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await,
    );
    assert_eq!(
        registry
            .register(&payments, registration("p-1"))
            .await
            .status,
        201
    );
    let first = registry.get("/api/services", &payments).await;
    let index: u64 = first.header("x-concierge-index").unwrap().parse().unwrap();

    // Nothing changes: the read waits out its `wait`.
    let started = Instant::now();
    let quiet = registry
        .get(
            &format!("/api/services?index={index}&wait=300ms"),
            &payments,
        )
        .await;
    let waited = started.elapsed();
    assert_eq!(quiet.status, 200);
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(
        quiet.header("x-concierge-index"),
        Some(index.to_string().as_str())
    );

    // A heartbeat that only refreshes the time does not wake it.
    let blocked = {
        let (registry, payments) = (registry.clone(), payments.clone());
        tokio::spawn(async move {
            let answer = registry
                .get(&format!("/api/services?index={index}&wait=20s"), &payments)
                .await;
            (answer, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/heartbeat",
            Some(&payments),
            None,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "a plain heartbeat moved the index");
    let changed_at = Instant::now();
    assert_eq!(
        registry
            .register(&payments, registration("p-2"))
            .await
            .status,
        201
    );
    let (answer, answered_at) = blocked.await.unwrap();
    let latency = answered_at.saturating_duration_since(changed_at);
    assert!(
        latency < Duration::from_millis(100),
        "answered {latency:?} after the change"
    );
    let new_index: u64 = answer.header("x-concierge-index").unwrap().parse().unwrap();
    assert!(new_index > index);
    assert_eq!(answer.json()["services"][0]["instances"]["healthy"], 2);
}

#[tokio::test]
async fn bad_input_gets_a_clear_problem() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
    let with = |field: &str, value: serde_json::Value| {
        let mut body = registration("p-1");
        body[field] = value;
        body
    };
    let cases = [
        (
            registry
                .register(&payments, with("name", json!("Pay_ments")))
                .await,
            422,
        ),
        (
            registry
                .register(&payments, with("name", json!("x".repeat(64))))
                .await,
            422,
        ),
        (
            registry.register(&payments, with("port", json!(0))).await,
            400,
        ),
        (
            registry
                .register(&payments, with("port", json!(70000)))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("address", json!("not an address!")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("address", json!("169.254.169.254")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("address", json!("::ffff:169.254.169.254")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("address", json!("0.0.0.0")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("address", json!("2852039166")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("address", json!("0xa9.0xfe.0xa9.0xfe")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("health_endpoint", json!("health")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("instance_id", json!("has space")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("surprise", json!(1)))
                .await,
            422,
        ),
        (
            registry
                .register(&payments, with("instance_id", json!("..")))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("health_endpoint", json!("/a b")))
                .await,
            400,
        ),
        // Routes the gateway could only match in another spelling, or too many.
        (
            registry
                .register(&payments, with("routes", json!(["/pay/../admin"])))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("routes", json!(["/p%61y"])))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("routes", json!(["/caf%c3%a9"])))
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("routes", json!(["/pay;v=1"])))
                .await,
            400,
        ),
        (
            registry
                .register(
                    &payments,
                    with(
                        "routes",
                        json!((0..33).map(|i| format!("/r{i}")).collect::<Vec<_>>()),
                    ),
                )
                .await,
            400,
        ),
        // Every registry, gateway and monitor keeps the catalog: it stays small.
        (
            registry
                .register(
                    &payments,
                    with("metadata", json!({"blob": "x".repeat(20_000)})),
                )
                .await,
            400,
        ),
        (
            registry
                .register(
                    &payments,
                    with(
                        "metadata",
                        json!(
                            (0..65)
                                .map(|i| (format!("k{i}"), json!(i)))
                                .collect::<serde_json::Map<_, _>>()
                        ),
                    ),
                )
                .await,
            400,
        ),
        (
            registry
                .register(&payments, with("tags", json!(["t".repeat(256)])))
                .await,
            400,
        ),
        (
            registry
                .call("POST", "/api/services/register", Some(&payments), None)
                .await,
            400,
        ),
        (
            registry
                .call(
                    "PUT",
                    "/api/services/payments/instances/p-1/heartbeat",
                    Some(&payments),
                    Some(json!({"load": 1.5})),
                )
                .await,
            400,
        ),
        (
            registry
                .call(
                    "PUT",
                    "/api/services/payments/instances/nope/heartbeat",
                    Some(&payments),
                    None,
                )
                .await,
            404,
        ),
        (registry.get("/api/discover", &payments).await, 400),
        (
            registry.get("/api/discover?service=NOPE", &payments).await,
            400,
        ),
        (
            registry
                .get("/api/discover?service=nobody", &payments)
                .await,
            404,
        ),
        (
            registry
                .get("/api/services?index=1&wait=soon", &payments)
                .await,
            400,
        ),
        (
            registry
                .call("PATCH", "/api/services", Some(&payments), None)
                .await,
            405,
        ),
    ];
    for (i, (answer, status)) in cases.iter().enumerate() {
        assert_eq!(
            answer.status.as_u16(),
            *status,
            "case {i}: {:?}",
            answer.json()
        );
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json"),
            "case {i}"
        );
    }
    // What the gateway can match as written is taken.
    let mut escaped = registration("p-9");
    escaped["routes"] = json!(["/caf%C3%A9", "/Shop/Items", "/a-b_c~d"]);
    let taken = registry.register(&payments, escaped).await;
    assert_eq!(taken.status, 201, "{:?}", taken.json());
    let huge = registry
        .client
        .send(
            http::Request::post(registry.process.url("/api/services/register"))
                .header("authorization", format!("Bearer {payments}"))
                .header("content-type", "application/json")
                .body(bytes::Bytes::from(vec![b' '; 2 * 1024 * 1024]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(huge.status, 413);
    assert_eq!(
        huge.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        huge.json()["type"],
        "urn:concierge:problem:payload-too-large"
    );
}

async fn two_registries(redis: Option<&str>) {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let db = TestDb::postgres();
    let mut extra = vec![("HEARTBEAT_INTERVAL", "30s")];
    if let Some(redis) = redis {
        extra.push(("REDIS_URL", redis));
        extra.push(("RESYNC_INTERVAL", "60s"));
    }
    let a = Registry::start(&vault, &db.url, &extra).await;
    let b = Registry::start(&vault, &db.url, &extra).await;
    assert_eq!(a.register(&payments, registration("p-1")).await.status, 201);
    let within = if redis.is_some() {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    eventually(
        within,
        "the registration reaching the other registry",
        || async {
            b.get("/api/discover?service=payments", &payments)
                .await
                .status
                == 200
        },
    )
    .await;
    assert_eq!(
        b.call(
            "DELETE",
            "/api/services/payments/instances/p-1",
            Some(&payments),
            None
        )
        .await
        .status,
        204
    );
    eventually(
        within,
        "the removal reaching the first registry",
        || async {
            a.get("/api/discover?service=payments", &payments)
                .await
                .status
                == 404
        },
    )
    .await;
}

#[tokio::test]
async fn two_registries_over_one_postgres_agree_without_redis() {
    two_registries(None).await;
}

#[tokio::test]
async fn two_registries_over_one_postgres_agree_with_redis() {
    let redis = common::testing::redis_url();
    two_registries(Some(&redis)).await;
}

#[tokio::test]
async fn a_heartbeat_revives_what_missed_heartbeats_but_not_the_monitors_verdict() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let monitor = vault.token("health-monitor").to_owned();
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[("DEREGISTER_AFTER", "60s")]).await;
    assert_eq!(
        registry
            .register(&payments, registration("p-1"))
            .await
            .status,
        201
    );
    eventually(Duration::from_secs(5), "going offline", || async {
        registry
            .get("/api/discover?service=payments", &payments)
            .await
            .status
            == 503
    })
    .await;
    let beat = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/heartbeat",
            Some(&payments),
            None,
        )
        .await;
    assert_eq!(beat.json()["health"], "healthy");
    assert_eq!(
        registry
            .get("/api/discover?service=payments", &payments)
            .await
            .status,
        200
    );

    let set = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/health",
            Some(&monitor),
            Some(json!({"state": "offline", "reason": "connect"})),
        )
        .await;
    assert_eq!(set.status, 204);
    let beat = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-1/heartbeat",
            Some(&payments),
            None,
        )
        .await;
    assert_eq!(
        beat.json()["health"],
        "offline",
        "the monitor's verdict stands"
    );
}

// A registry replica whose catalog has not caught up knows nothing of an id another
// replica gave out: the database alone keeps the id with its service.
both_backends!(
    an_instance_id_stays_with_its_service_across_replicas,
    |backend| async move {
        let vault = VaultFixture::start().await;
        let payments = vault.issue("payments").await;
        let orders = vault.issue("orders").await;
        let db = TestDb::new(backend);
        let slow = [("HEARTBEAT_INTERVAL", "30s"), ("RESYNC_INTERVAL", "5m")];
        let first = Registry::start(&vault, &db.url, &slow).await;
        let second = Registry::start(&vault, &db.url, &slow).await;
        assert_eq!(
            first.register(&payments, registration("p-1")).await.status,
            201
        );
        let mut taken = registration("p-1");
        taken["name"] = json!("orders");
        let refused = second.register(&orders, taken).await;
        assert_eq!(refused.status, 409, "{:?}", refused.json());

        let fresh = Registry::start(&vault, &db.url, &slow).await;
        let owner = fresh.get("/api/services/payments", &payments).await;
        assert_eq!(owner.status, 200, "{:?}", owner.json());
        assert_eq!(owner.json()["instances"][0]["instance_id"], "p-1");
        assert_eq!(fresh.get("/api/services/orders", &orders).await.status, 404);
    }
);

/// Which offline instances a heartbeat may bring back is in the history, not only in the
/// memory of the registry that expired them: also after a restart (or on another replica).
#[tokio::test]
async fn a_heartbeat_revives_what_missed_heartbeats_also_after_a_restart() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let monitor = vault.token("health-monitor").to_owned();
    let db = TestDb::sqlite();
    let registry = Registry::start(&vault, &db.url, &[("DEREGISTER_AFTER", "60s")]).await;
    // One after the other: two expiring at once would be most of the fleet, which the
    // registry suspects itself of (self-preservation).
    for id in ["p-1", "p-2"] {
        assert_eq!(
            registry.register(&payments, registration(id)).await.status,
            201
        );
        eventually(Duration::from_secs(5), "going offline", || async {
            let service = registry
                .get("/api/services/payments", &payments)
                .await
                .json();
            service["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["instance_id"] == id && i["health"] == "offline")
        })
        .await;
    }
    // The monitor confirms p-2 offline: its verdict, not missing heartbeats, holds it now.
    let set = registry
        .call(
            "PUT",
            "/api/services/payments/instances/p-2/health",
            Some(&monitor),
            Some(json!({"state": "offline", "reason": "connect"})),
        )
        .await;
    assert_eq!(set.status, 204);
    drop(registry);
    let registry = Registry::start(&vault, &db.url, &[("DEREGISTER_AFTER", "60s")]).await;
    for (id, health) in [("p-1", "healthy"), ("p-2", "offline")] {
        let beat = registry
            .call(
                "PUT",
                &format!("/api/services/payments/instances/{id}/heartbeat"),
                Some(&payments),
                None,
            )
            .await;
        assert_eq!(beat.json()["health"], health, "{id}: {:?}", beat.json());
    }
}

/// With several replicas, heartbeats reach the one a client talks to; another must not
/// expire the instance for heartbeats it has not seen yet.
#[tokio::test]
async fn a_replica_never_expires_an_instance_that_heartbeats_to_another() {
    let vault = VaultFixture::start().await;
    let payments = vault.issue("payments").await;
    let db = TestDb::sqlite();
    // A TTL of 3 s and no reload within the test: only the database tells the second
    // replica of the heartbeats.
    let settings = [("HEARTBEAT_INTERVAL", "1s"), ("RESYNC_INTERVAL", "5m")];
    let first = Registry::start(&vault, &db.url, &settings).await;
    assert_eq!(
        first.register(&payments, registration("p-1")).await.status,
        201
    );
    // The second replica reads p-1 at its start, and never again here.
    let second = Registry::start(&vault, &db.url, &settings).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let beat = first
            .call(
                "PUT",
                "/api/services/payments/instances/p-1/heartbeat",
                Some(&payments),
                None,
            )
            .await;
        assert_eq!(beat.json()["health"], "healthy", "{:?}", beat.json());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let seen = second.get("/api/services/payments", &payments).await;
    assert_eq!(
        seen.json()["instances"][0]["health"],
        "healthy",
        "{:?}",
        seen.json()
    );
}

both_backends!(
    a_registration_is_written_whole_or_not_at_all,
    |backend| async move {
        use diesel::RunQueryDsl;
        let vault = VaultFixture::start().await;
        let payments = vault.issue("payments").await;
        let db = TestDb::new(backend);
        let registry = Registry::start(&vault, &db.url, &[("HEARTBEAT_INTERVAL", "30s")]).await;
        // The history's insert fails, as a full disk or a lost connection would make it.
        let (sql, undo) = match backend {
            common::db::Backend::Sqlite => (
                vec![
                    "CREATE TRIGGER no_history BEFORE INSERT ON health_history \
             BEGIN SELECT RAISE(ABORT, 'no history today'); END",
                ],
                "DROP TRIGGER no_history",
            ),
            common::db::Backend::Postgres => (
                vec![
                    "CREATE FUNCTION no_history() RETURNS trigger AS $$ \
             BEGIN RAISE EXCEPTION 'no history today'; END $$ LANGUAGE plpgsql",
                    "CREATE TRIGGER no_history BEFORE INSERT ON health_history \
             FOR EACH ROW EXECUTE FUNCTION no_history()",
                ],
                "DROP TRIGGER no_history ON health_history",
            ),
        };
        let direct = common::db::Db::new(&db.url, 1);
        let count = |direct: &common::db::Db| {
            let direct = direct.clone();
            async move {
                direct
                    .run(|conn| {
                        #[derive(diesel::QueryableByName)]
                        struct Count {
                            #[diesel(sql_type = diesel::sql_types::BigInt)]
                            n: i64,
                        }
                        let rows: Vec<Count> =
                            diesel::sql_query("SELECT COUNT(*) AS n FROM instances").load(conn)?;
                        Ok(rows.first().map_or(0, |c| c.n))
                    })
                    .await
                    .unwrap()
            }
        };
        direct
            .run(move |conn| {
                for statement in sql {
                    diesel::sql_query(statement).execute(conn)?;
                }
                Ok(())
            })
            .await
            .unwrap();

        let refused = registry.register(&payments, registration("p-1")).await;
        assert!(refused.status.is_server_error(), "{:?}", refused.json());
        assert_eq!(
            refused.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(
            count(&direct).await,
            0,
            "an instance row without its history"
        );

        // With the history back, the same registration goes through whole.
        direct
            .run(move |conn| {
                diesel::sql_query(undo).execute(conn)?;
                Ok(())
            })
            .await
            .unwrap();
        let registered = registry.register(&payments, registration("p-1")).await;
        assert_eq!(registered.status, 201, "{:?}", registered.json());
        assert_eq!(count(&direct).await, 1);
    }
);

// An admin removes a whole service: all its instances, in the database too, and no
// other service's; a second removal finds nothing.
both_backends!(
    a_whole_service_is_removed_and_only_it,
    |backend| async move {
        let vault = VaultFixture::start().await;
        let payments = vault.issue("payments").await;
        let orders = vault.issue("orders").await;
        let admin = vault.token("admin").to_owned();
        let db = TestDb::new(backend);
        let slow = [("HEARTBEAT_INTERVAL", "30s")];
        let registry = Registry::start(&vault, &db.url, &slow).await;
        for id in ["p-1", "p-2"] {
            assert_eq!(
                registry.register(&payments, registration(id)).await.status,
                201
            );
        }
        let mut order = registration("o-1");
        order["name"] = json!("orders");
        assert_eq!(registry.register(&orders, order).await.status, 201);

        let remove = || registry.call("DELETE", "/api/services/payments", Some(&admin), None);
        let removed = remove().await;
        assert!(removed.status.is_success(), "{:?}", removed.json());
        assert_eq!(remove().await.status, 404, "nothing left to remove");
        assert_eq!(
            registry
                .call("DELETE", "/api/services/orders", Some(&payments), None)
                .await
                .status,
            403,
            "an admin's alone"
        );

        // A registry that starts from the database sees the same.
        let fresh = Registry::start(&vault, &db.url, &slow).await;
        assert_eq!(
            fresh.get("/api/services/payments", &payments).await.status,
            404
        );
        let kept = fresh.get("/api/services/orders", &orders).await;
        assert_eq!(kept.status, 200, "{:?}", kept.json());
        assert_eq!(kept.json()["instances"][0]["instance_id"], "o-1");
    }
);
