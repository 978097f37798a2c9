//! Credentials end to end: create, read, rotate with a grace window, check-and-set,
//! delete and restore, destroy, listing, and bad input, on both backends.

use common::both_backends;
use serde_json::json;

use crate::support::Fixture;

both_backends!(
    create_read_rotate_delete_restore_destroy,
    |backend| async move {
        let fixture = Fixture::new(backend);
        let vault = fixture.start().await;
        let admin = fixture.admin().to_owned();
        let (_, payments) = vault.issue(&admin, "payments").await;

        let id = vault
        .create(&admin, json!({"service": "payments", "name": "db/password", "value": "first-s3cret", "description": "primary db"}))
        .await;
        let again = vault
            .call(
                "POST",
                "/api/credentials",
                Some(&admin),
                Some(json!({"service": "payments", "name": "db/password", "value": "x"})),
            )
            .await;
        assert_eq!(again.status, 409);
        assert_eq!(again.json()["type"], "urn:concierge:problem:conflict");

        let read = vault
            .get(&format!("/api/credentials/{id}"), &payments)
            .await;
        assert_eq!(read.status, 200);
        assert_eq!(read.json()["value"], "first-s3cret");
        assert_eq!(read.json()["version"], 1);
        assert!(read.json().get("previous").is_none());

        // Rotation keeps the previous value readable during the grace window.
        let rotated = vault
            .call(
                "PUT",
                &format!("/api/credentials/{id}"),
                Some(&admin),
                Some(json!({"value": {"user": "app", "password": "second-s3cret"}})),
            )
            .await;
        assert_eq!(rotated.status, 200, "{:?}", rotated.json());
        assert_eq!(rotated.json()["version"], 2);
        let read = vault
            .get(&format!("/api/credentials/{id}"), &payments)
            .await
            .json();
        assert_eq!(read["value"]["password"], "second-s3cret");
        assert_eq!(read["previous"]["version"], 1);
        assert_eq!(read["previous"]["value"], "first-s3cret");
        let old = vault
            .get(&format!("/api/credentials/{id}?version=1"), &payments)
            .await
            .json();
        assert_eq!(old["value"], "first-s3cret");

        // Check-and-set: a stale version is a conflict, header or body.
        let stale = vault
            .call(
                "PUT",
                &format!("/api/credentials/{id}"),
                Some(&admin),
                Some(json!({"value": "third", "cas": 1})),
            )
            .await;
        assert_eq!(stale.status, 409);
        let path = format!("/api/credentials/{id}");
        for (if_match, body, status, kind) in [
            ("1", json!({"value": "third"}), 409, "conflict"),
            ("W/\"1\"", json!({"value": "third"}), 409, "conflict"),
            ("one", json!({"value": "third"}), 400, "invalid-if-match"),
            ("2", json!({"value": "third", "cas": 1}), 400, "invalid-cas"),
        ] {
            let answer = vault.put_if_match(&path, &admin, if_match, body).await;
            assert_eq!(answer.status, status, "If-Match: {if_match}");
            assert_eq!(
                answer.json()["type"],
                format!("urn:concierge:problem:{kind}"),
                "If-Match: {if_match}"
            );
        }
        let fresh = vault
            .call(
                "PUT",
                &format!("/api/credentials/{id}"),
                Some(&admin),
                Some(json!({"value": "third-s3cret", "cas": 2})),
            )
            .await;
        assert_eq!(fresh.status, 200);

        let versions = vault
            .get(&format!("/api/credentials/{id}/versions"), &payments)
            .await
            .json();
        assert_eq!(versions["versions"].as_array().unwrap().len(), 3);

        // Destroy: the ciphertext is gone for good, the version's record stays.
        let destroyed = vault
            .call(
                "POST",
                &format!("/api/credentials/{id}/destroy"),
                Some(&admin),
                Some(json!({"versions": [1]})),
            )
            .await;
        assert_eq!(destroyed.status, 200);
        let gone = vault
            .get(&format!("/api/credentials/{id}?version=1"), &payments)
            .await;
        assert_eq!(gone.status, 410);
        assert_eq!(
            gone.json()["type"],
            "urn:concierge:problem:version-destroyed"
        );
        let versions = vault
            .get(&format!("/api/credentials/{id}/versions"), &admin)
            .await
            .json();
        assert_eq!(versions["versions"][0]["destroyed"], true);

        // Soft delete: reads answer 404 until an admin restores it.
        assert_eq!(
            vault
                .call(
                    "DELETE",
                    &format!("/api/credentials/{id}"),
                    Some(&admin),
                    None
                )
                .await
                .status,
            204
        );
        assert_eq!(
            vault
                .get(&format!("/api/credentials/{id}"), &payments)
                .await
                .status,
            404
        );
        assert_eq!(
            vault
                .get(&format!("/api/credentials/{id}"), &admin)
                .await
                .status,
            404
        );
        assert_eq!(
            vault
                .call(
                    "DELETE",
                    &format!("/api/credentials/{id}"),
                    Some(&admin),
                    None
                )
                .await
                .status,
            404
        );
        let restored = vault
            .call(
                "POST",
                &format!("/api/credentials/{id}/restore"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(restored.status, 200);
        assert_eq!(
            vault
                .get(&format!("/api/credentials/{id}"), &payments)
                .await
                .json()["value"],
            "third-s3cret"
        );

        assert_eq!(
            vault.get("/api/audit/verify", &admin).await.json()["ok"],
            true
        );
        vault.assert_never_logged(&["first-s3cret", "second-s3cret", "third-s3cret"]);
    }
);

both_backends!(listing_sharing_and_pagination, |backend| async move {
    let fixture = Fixture::new(backend);
    let vault = fixture.start().await;
    let admin = fixture.admin().to_owned();
    let (_, orders) = vault.issue(&admin, "orders").await;
    for i in 0..5 {
        vault.create(&admin, json!({"service": "payments", "name": format!("key-{i}"), "value": format!("v{i}")})).await;
    }
    vault
        .create(&admin, json!({"service": "payments", "name": "shared-key", "value": "for-orders", "shared_with": ["orders"]}))
        .await;
    vault
        .create(
            &admin,
            json!({"service": "orders", "name": "own", "value": "mine"}),
        )
        .await;

    // Pages of two over the six payments credentials.
    let mut names = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10 {
        let page = vault
            .get(
                &format!("/api/credentials?service=payments&limit=2{cursor}"),
                &admin,
            )
            .await
            .json();
        for credential in page["credentials"].as_array().unwrap() {
            assert!(
                credential.get("value").is_none(),
                "listing never carries values"
            );
            names.push(credential["name"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    names.sort();
    assert_eq!(
        names,
        ["key-0", "key-1", "key-2", "key-3", "key-4", "shared-key"]
    );

    let prefixed = vault
        .get("/api/credentials?name_prefix=key-&limit=100", &admin)
        .await
        .json();
    assert_eq!(prefixed["credentials"].as_array().unwrap().len(), 5);
    let literal = vault
        .get("/api/credentials?name_prefix=key_", &admin)
        .await
        .json();
    assert_eq!(
        literal["credentials"].as_array().unwrap().len(),
        0,
        "_ is not a wildcard"
    );

    // A service lists what it may read: its own and what is shared with it.
    let mine = vault.get("/api/credentials", &orders).await.json();
    let mut names: Vec<_> = mine["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["own", "shared-key"]);
    let available = vault
        .get("/api/credentials/service/orders", &orders)
        .await
        .json();
    let values: Vec<_> = available["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].clone())
        .collect();
    assert_eq!(values.len(), 2);
    assert!(values.contains(&json!("for-orders")) && values.contains(&json!("mine")));
});

both_backends!(bad_input_gets_a_clear_problem, |backend| async move {
    let fixture = Fixture::new(backend);
    let vault = fixture.start().await;
    let admin = fixture.admin().to_owned();
    let gateway = fixture.tokens["gateway"].clone();
    vault
        .create(
            &admin,
            json!({"service": "gateway", "name": "tls-key", "value": "gw-s3cret"}),
        )
        .await;
    let post =
        |body: serde_json::Value| vault.call("POST", "/api/credentials", Some(&admin), Some(body));
    let cases = [
        (post(json!({"service": "Bad Name", "name": "n", "value": "v"})).await, 422),
        (post(json!({"service": "payments", "name": "", "value": "v"})).await, 400),
        (post(json!({"service": "payments", "name": "n", "value": "v", "surprise": 1})).await, 422),
        (post(json!({"service": "payments", "name": "n"})).await, 422),
        (post(json!({"service": "payments", "name": "big", "value": "x".repeat(70 * 1024)})).await, 413),
        (post(json!({"service": "payments", "name": "n", "value": "v", "shared_with": ["NOT OK"]})).await, 422),
        (vault.get("/api/credentials/not-a-uuid", &admin).await, 400),
        (vault.get(&format!("/api/credentials/{}", uuid::Uuid::new_v4()), &admin).await, 404),
        (vault.get("/api/credentials?limit=0", &admin).await, 400),
        (vault.get("/api/credentials?cursor=nope", &admin).await, 400),
        (vault.get("/api/credentials/service/NOPE", &admin).await, 400),
        (vault.call("PATCH", "/api/credentials", Some(&admin), None).await, 405),
        (vault.call("POST", "/api/tokens", Some(&admin), Some(json!({"service": "payments", "scopes": ["root"]}))).await, 400),
        (vault.call("POST", "/api/tokens", Some(&admin), Some(json!({"service": "payments", "ttl_s": 1}))).await, 400),
        (vault.call("DELETE", "/api/tokens/xyz", Some(&admin), None).await, 400),
        (vault.call("GET", "/api/credentials", Some("not.a.token"), None).await, 401),
        (vault.call("GET", "/api/credentials", Some("two words"), None).await, 401),
        // Who is calling comes before what they sent: no token, no opinion on the body.
        (vault.call("POST", "/api/credentials", None, Some(json!("not an object"))).await, 401),
        (vault.call("POST", "/api/tokens", Some(&gateway), Some(json!([1, 2]))).await, 403),
        // A token without credentials:read reads nothing, not even its own service's set.
        (vault.get("/api/credentials/service/gateway", &gateway).await, 403),
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
        assert!(
            answer.json()["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:concierge:problem:"),
            "case {i}"
        );
    }
    let malformed = vault
        .client
        .send(
            http::Request::post(vault.process.url("/api/credentials"))
                .header("authorization", format!("Bearer {admin}"))
                .header("content-type", "application/json")
                .body(bytes::Bytes::from_static(
                    b"{\"service\": \"payments\", \"value\": \"hunter2-typo",
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(malformed.status, 400);
    assert!(!String::from_utf8_lossy(&malformed.body).contains("hunter2"));
    vault.assert_never_logged(&["hunter2"]);
    assert!(!vault.process.output().contains("panicked"));
});
