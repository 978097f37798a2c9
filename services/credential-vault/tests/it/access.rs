//! The access matrix: every endpoint × every kind of caller, as one table, on both backends.
//! Every refusal must be in the audit log.

use common::auth::{Claims, now_unix};
use common::both_backends;
use serde_json::json;

use crate::support::Fixture;

const CALLERS: [&str; 7] = [
    "admin", "owner", "shared", "other", "none", "expired", "revoked",
];

/// Expected status per caller, in the order of [`CALLERS`].
struct Row {
    method: &'static str,
    path: &'static str,
    body: Option<serde_json::Value>,
    expect: [u16; 7],
}

fn rows() -> Vec<Row> {
    let read = [200, 200, 200, 403, 401, 401, 401];
    let admin_only = |ok| [ok, 403, 403, 403, 401, 401, 401];
    let any_token = [200, 200, 200, 200, 401, 401, 401];
    vec![
        Row {
            method: "POST",
            path: "/api/credentials",
            body: Some(json!({"service": "payments", "name": "n-{caller}", "value": "v"})),
            expect: admin_only(201),
        },
        Row {
            method: "GET",
            path: "/api/credentials",
            body: None,
            expect: any_token,
        },
        Row {
            method: "GET",
            path: "/api/credentials/{id}",
            body: None,
            expect: read,
        },
        Row {
            method: "GET",
            path: "/api/credentials/{id}/versions",
            body: None,
            expect: read,
        },
        Row {
            method: "PUT",
            path: "/api/credentials/{id}",
            body: Some(json!({"value": "rotated"})),
            expect: admin_only(200),
        },
        Row {
            method: "GET",
            path: "/api/credentials/service/payments",
            body: None,
            expect: [200, 200, 403, 403, 401, 401, 401],
        },
        Row {
            method: "POST",
            path: "/api/credentials/{id}/destroy",
            body: Some(json!({"versions": [1]})),
            expect: admin_only(200),
        },
        Row {
            method: "DELETE",
            path: "/api/credentials/{id}",
            body: None,
            expect: admin_only(204),
        },
        Row {
            method: "POST",
            path: "/api/credentials/{deleted}/restore",
            body: None,
            expect: admin_only(200),
        },
        Row {
            method: "POST",
            path: "/api/tokens",
            body: Some(json!({"service": "payments"})),
            expect: admin_only(201),
        },
        Row {
            method: "DELETE",
            path: "/api/tokens/{token}",
            body: None,
            expect: admin_only(204),
        },
        Row {
            method: "GET",
            path: "/api/tokens/revoked",
            body: None,
            expect: any_token,
        },
        Row {
            method: "GET",
            path: "/api/auth/jwks",
            body: None,
            expect: [200; 7],
        },
        Row {
            method: "GET",
            path: "/api/audit",
            body: None,
            expect: admin_only(200),
        },
        Row {
            method: "GET",
            path: "/api/audit/verify",
            body: None,
            expect: admin_only(200),
        },
    ]
}

both_backends!(every_endpoint_for_every_caller, |backend| async move {
    let fixture = Fixture::new(backend);
    let vault = fixture.start().await;
    let admin = fixture.admin().to_owned();
    let (_, owner) = vault.issue(&admin, "payments").await;
    let (_, shared) = vault.issue(&admin, "orders").await;
    let (_, other) = vault.issue(&admin, "billing").await;
    let (revoked_id, revoked) = vault.issue(&admin, "payments").await;
    assert_eq!(
        vault
            .call(
                "DELETE",
                &format!("/api/tokens/{revoked_id}"),
                Some(&admin),
                None
            )
            .await
            .status,
        204
    );
    let signer = fixture.signing_key().await;
    let now = now_unix();
    let expired = signer.sign(&Claims {
        sub: "payments".into(),
        scopes: vec!["credentials:read".into()],
        exp: now - 120,
        iat: now - 3600,
        jti: uuid::Uuid::new_v4().to_string(),
    });
    let tokens: [Option<&str>; 7] = [
        Some(&admin),
        Some(&owner),
        Some(&shared),
        Some(&other),
        None,
        Some(expired.expose()),
        Some(&revoked),
    ];

    let mut table = Vec::new();
    let (mut refused_403, mut refused_401) = (0, 0);
    for row in rows() {
        for (i, caller) in CALLERS.iter().enumerate() {
            // A fresh credential (and token) per cell, so that changes do not leak across cells.
            let id = vault
                .create(&admin, json!({"service": "payments", "name": format!("c-{}", uuid::Uuid::new_v4()), "value": {"pw": "s3cret-value"}, "shared_with": ["orders"]}))
                .await;
            let deleted = vault
                .create(&admin, json!({"service": "payments", "name": format!("d-{}", uuid::Uuid::new_v4()), "value": "gone"}))
                .await;
            assert_eq!(
                vault
                    .call(
                        "DELETE",
                        &format!("/api/credentials/{deleted}"),
                        Some(&admin),
                        None
                    )
                    .await
                    .status,
                204
            );
            let (token_id, _) = vault.issue(&admin, "payments").await;
            let path = row
                .path
                .replace("{id}", &id)
                .replace("{deleted}", &deleted)
                .replace("{token}", &token_id);
            let body = row
                .body
                .as_ref()
                .map(|b| serde_json::from_str(&b.to_string().replace("{caller}", caller)).unwrap());
            let answer = vault.call(row.method, &path, tokens[i], body).await;
            let got = answer.status.as_u16();
            if got != row.expect[i] {
                table.push(format!(
                    "{} {} as {caller}: expected {}, got {got} ({})",
                    row.method,
                    row.path,
                    row.expect[i],
                    answer.json()["type"]
                ));
            }
            if got >= 400 {
                assert_eq!(
                    answer.header("content-type"),
                    Some("application/problem+json"),
                    "{} {}",
                    row.method,
                    row.path
                );
            }
            if got == 401 {
                assert!(
                    answer
                        .header("www-authenticate")
                        .is_some_and(|h| h.starts_with("Bearer"))
                );
                refused_401 += 1;
            }
            if got == 403 {
                refused_403 += 1;
            }
        }
    }
    assert!(
        table.is_empty(),
        "access matrix mismatches:\n{}",
        table.join("\n")
    );

    // Every refusal was audited, as denied or unauthenticated.
    let mut outcomes = std::collections::HashMap::<String, usize>::new();
    let mut cursor = 0;
    loop {
        let page = vault
            .get(&format!("/api/audit?limit=1000&cursor={cursor}"), &admin)
            .await
            .json();
        for record in page["records"].as_array().unwrap() {
            *outcomes
                .entry(record["outcome"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(
        outcomes.get("denied").copied().unwrap_or(0),
        refused_403,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.get("unauthenticated").copied().unwrap_or(0),
        refused_401,
        "{outcomes:?}"
    );
    assert_eq!(
        vault.get("/api/audit/verify", &admin).await.json()["ok"],
        true
    );
    vault.assert_never_logged(&["s3cret-value", &admin, &owner, expired.expose()]);
});
