//! Attacks on the stored data and the audit log, master-key rotation, and the rule that
//! no audit record means no effect, on both backends.

use common::both_backends;
use common::db::{Db, DbConnection};
use credential_vault::schema::{audit_log, credential_versions};
use diesel::prelude::*;
use serde_json::json;

use crate::support::{Fixture, generate_key};

async fn exec(db: &Db, sql: String) {
    db.run(move |conn| Ok(diesel::sql_query(sql).execute(conn)?))
        .await
        .unwrap();
}

both_backends!(
    a_ciphertext_moved_to_another_row_fails_its_integrity_check,
    |backend| async move {
        let fixture = Fixture::new(backend);
        let vault = fixture.start().await;
        let admin = fixture.admin().to_owned();
        let a = vault
            .create(
                &admin,
                json!({"service": "payments", "name": "a", "value": "alpha-s3cret"}),
            )
            .await;
        let b = vault
            .create(
                &admin,
                json!({"service": "payments", "name": "b", "value": "bravo-s3cret"}),
            )
            .await;

        // Swap the two rows' ciphertexts and wrapped keys behind the vault's back.
        let db = fixture.db();
        let (a2, b2) = (a.clone(), b.clone());
        db.run(move |conn: &mut DbConnection| {
            let load = |conn: &mut DbConnection, id: &str| {
                credential_versions::table
                    .filter(credential_versions::credential_id.eq(id))
                    .select((
                        credential_versions::ciphertext,
                        credential_versions::wrapped_key,
                    ))
                    .first::<(Option<Vec<u8>>, Option<Vec<u8>>)>(conn)
            };
            let row_a = load(conn, &a2)?;
            let row_b = load(conn, &b2)?;
            for (id, (ciphertext, wrapped)) in [(&a2, row_b), (&b2, row_a)] {
                diesel::update(
                    credential_versions::table.filter(credential_versions::credential_id.eq(id)),
                )
                .set((
                    credential_versions::ciphertext.eq(ciphertext),
                    credential_versions::wrapped_key.eq(wrapped),
                ))
                .execute(conn)?;
            }
            Ok(())
        })
        .await
        .unwrap();

        for id in [&a, &b] {
            let read = vault.get(&format!("/api/credentials/{id}"), &admin).await;
            assert_eq!(read.status, 500, "{:?}", read.json());
            let problem = read.json();
            assert_eq!(problem["type"], "urn:concierge:problem:integrity");
            let text = String::from_utf8_lossy(&read.body).into_owned();
            assert!(
                !text.contains("s3cret") && !text.contains("alpha") && !text.contains("bravo"),
                "{text}"
            );
            assert!(
                !text.to_lowercase().contains("aead") && !text.contains("ring"),
                "no internals: {text}"
            );
        }
        vault.assert_never_logged(&["alpha-s3cret", "bravo-s3cret"]);
    }
);

both_backends!(
    a_modified_or_deleted_audit_record_is_named_by_verify,
    |backend| async move {
        let fixture = Fixture::new(backend);
        let vault = fixture.start().await;
        let admin = fixture.admin().to_owned();
        let id = vault
            .create(
                &admin,
                json!({"service": "payments", "name": "k", "value": "v"}),
            )
            .await;
        for _ in 0..4 {
            assert_eq!(
                vault
                    .get(&format!("/api/credentials/{id}"), &admin)
                    .await
                    .status,
                200
            );
        }
        let intact = vault.get("/api/audit/verify", &admin).await.json();
        assert_eq!(intact["ok"], true);
        let records = intact["records"].as_i64().unwrap();
        assert!(records >= 6, "{intact}");

        let db = fixture.db();
        // The database itself refuses to change or remove a record…
        let refused = db
            .run(|conn| {
                Ok(
                    diesel::update(audit_log::table.filter(audit_log::seq.eq(3)))
                        .set(audit_log::actor.eq("someone-else"))
                        .execute(conn)?,
                )
            })
            .await;
        assert!(refused.is_err(), "an UPDATE of the audit log went through");
        let refused = db
            .run(|conn| {
                Ok(diesel::delete(audit_log::table.filter(audit_log::seq.eq(3))).execute(conn)?)
            })
            .await;
        assert!(refused.is_err(), "a DELETE from the audit log went through");
        // …but whoever owns the database can drop the triggers; then the chain tells.
        let drops: &[&str] = match backend {
            common::db::Backend::Postgres => &[
                "DROP TRIGGER audit_append_only ON audit_log",
                "DROP TRIGGER audit_no_truncate ON audit_log",
            ],
            common::db::Backend::Sqlite => &[
                "DROP TRIGGER audit_no_update",
                "DROP TRIGGER audit_no_delete",
            ],
        };
        for sql in drops {
            exec(&db, (*sql).to_owned()).await;
        }
        db.run(|conn| {
            diesel::update(audit_log::table.filter(audit_log::seq.eq(3)))
                .set(audit_log::actor.eq("someone-else"))
                .execute(conn)?;
            Ok(())
        })
        .await
        .unwrap();
        let broken = vault.get("/api/audit/verify", &admin).await.json();
        assert_eq!(broken["ok"], false);
        assert_eq!(broken["first_broken"]["seq"], 3);
        assert_eq!(broken["first_broken"]["reason"], "modified");

        // Rewriting a record and re-linking every record after it needs the audit key, which
        // lives sealed under the master key: a guessed key does not pass.
        let guess = credential_vault::crypto::AuditHasher::new(b"a guessed key");
        db.run(move |conn| {
            let mut records: Vec<credential_vault::audit::Record> = audit_log::table
                .order(audit_log::seq.asc())
                .select(credential_vault::audit::Record::as_select())
                .load(conn)?;
            for i in 2..records.len() {
                records[i].prev_hash = records[i - 1].hash.clone();
                records[i].hash = credential_vault::audit::chain_hash(&guess, &records[i]);
                diesel::update(audit_log::table.filter(audit_log::seq.eq(records[i].seq)))
                    .set((
                        audit_log::prev_hash.eq(&records[i].prev_hash),
                        audit_log::hash.eq(&records[i].hash),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
        .await
        .unwrap();
        let relinked = vault.get("/api/audit/verify", &admin).await.json();
        assert_eq!(relinked["ok"], false);
        assert_eq!(relinked["first_broken"]["seq"], 3);

        // The API shows what the database now says; then a record goes missing altogether.
        let original = vault
            .get("/api/audit?cursor=2&limit=1", &admin)
            .await
            .json();
        assert_eq!(original["records"][0]["actor"], "someone-else");
        exec(&db, "DELETE FROM audit_log WHERE seq = 3".into()).await;
        let gap = vault.get("/api/audit/verify", &admin).await.json();
        assert_eq!(gap["ok"], false);
        assert_eq!(gap["first_broken"]["seq"], 3);
        assert_eq!(gap["first_broken"]["reason"], "missing");
    }
);

both_backends!(
    master_key_rotation_keeps_every_value_readable,
    |backend| async move {
        let fixture = Fixture::new(backend);
        let admin = fixture.admin().to_owned();
        let old_key = fixture.master_key.to_str().unwrap().to_owned();
        let new_key_path = fixture.dir.path().join("new-master-key");
        generate_key(&new_key_path);
        let new_key = new_key_path.to_str().unwrap().to_owned();

        // Before: sealed under the old key.
        let before = fixture.start().await;
        let one = before
            .create(
                &admin,
                json!({"service": "payments", "name": "one", "value": "one-s3cret"}),
            )
            .await;
        let rotated = before
            .call(
                "PUT",
                &format!("/api/credentials/{one}"),
                Some(&admin),
                Some(json!({"value": "one-v2-s3cret"})),
            )
            .await;
        assert_eq!(rotated.status, 200);
        drop(before);

        // During: the vault seals with the new key and still opens with the old one: mixed ids.
        let during = fixture
            .start_with(&[
                ("VAULT_MASTER_KEY_FILE", &new_key),
                ("VAULT_EXTRA_MASTER_KEY_FILES", &old_key),
            ])
            .await;
        let two = during
            .create(
                &admin,
                json!({"service": "payments", "name": "two", "value": "two-s3cret"}),
            )
            .await;
        let db = fixture.db();
        let key_ids = |db: Db| async move {
            db.run(|conn| {
                Ok(credential_versions::table
                    .select(credential_versions::master_key_id)
                    .distinct()
                    .load::<String>(conn)?)
            })
            .await
            .unwrap()
        };
        assert_eq!(
            key_ids(db.clone()).await.len(),
            2,
            "mixed master key ids during the rotation"
        );
        assert_eq!(
            during
                .get(&format!("/api/credentials/{one}"), &admin)
                .await
                .json()["value"],
            "one-v2-s3cret"
        );
        assert_eq!(
            during
                .get(&format!("/api/credentials/{one}?version=1"), &admin)
                .await
                .json()["value"],
            "one-s3cret"
        );

        let env = fixture.env(&[]);
        let out = common::testing::run_binary(
            crate::support::BINARY,
            &["rotate-master-key", "--new-key-file", &new_key],
            &env,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("re-wrapped 2 data keys"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Reads keep working in the vault that holds both keys.
        assert_eq!(
            during
                .get(&format!("/api/credentials/{two}"), &admin)
                .await
                .json()["value"],
            "two-s3cret"
        );
        drop(during);

        // After: only the new key.
        assert_eq!(key_ids(db.clone()).await.len(), 1);
        let after = fixture
            .start_with(&[("VAULT_MASTER_KEY_FILE", &new_key)])
            .await;
        assert_eq!(
            after
                .get(&format!("/api/credentials/{one}"), &admin)
                .await
                .json()["value"],
            "one-v2-s3cret"
        );
        assert_eq!(
            after
                .get(&format!("/api/credentials/{one}?version=1"), &admin)
                .await
                .json()["value"],
            "one-s3cret"
        );
        assert_eq!(
            after
                .get(&format!("/api/credentials/{two}"), &admin)
                .await
                .json()["value"],
            "two-s3cret"
        );
        assert_eq!(
            after.get("/api/audit/verify", &admin).await.json()["ok"],
            true
        );
        after.assert_never_logged(&["one-s3cret", "two-s3cret"]);
    }
);

both_backends!(
    without_an_audit_record_nothing_happens,
    |backend| async move {
        let fixture = Fixture::new(backend);
        let vault = fixture.start().await;
        let admin = fixture.admin().to_owned();
        let id = vault
            .create(
                &admin,
                json!({"service": "payments", "name": "k", "value": "before"}),
            )
            .await;

        let db = fixture.db();
        let block = match backend {
        common::db::Backend::Postgres => vec![
            "CREATE FUNCTION block_audit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit blocked'; END $$ LANGUAGE plpgsql".to_owned(),
            "CREATE TRIGGER block_audit BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION block_audit()".to_owned(),
        ],
        common::db::Backend::Sqlite => vec![
            "CREATE TRIGGER block_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'audit blocked'); END".to_owned(),
        ],
    };
        for sql in block {
            exec(&db, sql).await;
        }

        let read = vault.get(&format!("/api/credentials/{id}"), &admin).await;
        assert_eq!(read.status, 503);
        assert_eq!(
            read.json()["type"],
            "urn:concierge:problem:audit-unavailable"
        );
        assert!(
            !String::from_utf8_lossy(&read.body).contains("before"),
            "no value without a record"
        );
        let rotate = vault
            .call(
                "PUT",
                &format!("/api/credentials/{id}"),
                Some(&admin),
                Some(json!({"value": "after"})),
            )
            .await;
        assert_eq!(rotate.status, 503);
        let create = vault
            .call(
                "POST",
                "/api/credentials",
                Some(&admin),
                Some(json!({"service": "payments", "name": "new", "value": "x"})),
            )
            .await;
        assert_eq!(create.status, 503);

        exec(
            &db,
            "DROP TRIGGER block_audit".to_owned()
                + if backend == common::db::Backend::Postgres {
                    " ON audit_log"
                } else {
                    ""
                },
        )
        .await;
        let read = vault
            .get(&format!("/api/credentials/{id}"), &admin)
            .await
            .json();
        assert_eq!(read["value"], "before", "the rotation did not happen");
        assert_eq!(read["version"], 1);
        let list = vault.get("/api/credentials", &admin).await.json();
        assert_eq!(
            list["credentials"].as_array().unwrap().len(),
            1,
            "the create did not happen"
        );
        assert_eq!(
            vault.get("/api/audit/verify", &admin).await.json()["ok"],
            true
        );
    }
);

both_backends!(
    two_vaults_appending_at_once_keep_one_chain,
    |backend| async move {
        let fixture = Fixture::new(backend);
        let a = std::sync::Arc::new(fixture.start().await);
        let b = std::sync::Arc::new(fixture.start().await);
        let admin = fixture.admin().to_owned();
        let id = a
            .create(
                &admin,
                json!({"service": "payments", "name": "hot", "value": "v"}),
            )
            .await;
        let before = a.get("/api/audit/verify", &admin).await.json()["records"]
            .as_i64()
            .unwrap();

        // Reads through both vaults at once: records race for the same next sequence numbers.
        let mut tasks = Vec::new();
        for i in 0..120 {
            let vault = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (admin, path) = (admin.clone(), format!("/api/credentials/{id}"));
            tasks.push(tokio::spawn(async move {
                vault.get(&path, &admin).await.status
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), 200);
        }
        let verified = a.get("/api/audit/verify", &admin).await.json();
        assert_eq!(verified["ok"], true, "{verified}");
        // The 120 reads, and the second verification's own record.
        assert_eq!(verified["records"].as_i64().unwrap(), before + 121);
    }
);

both_backends!(
    a_change_that_panics_fails_alone_and_the_audit_writer_goes_on,
    |backend| async move {
        use credential_vault::audit::{AuditLog, Entry, Outcome};

        let fixture = Fixture::new(backend);
        let db = fixture.db();
        let env = common::config::Env::from_pairs(fixture.env(&[]));
        let config = credential_vault::Config::from_env(&env).unwrap();
        let hasher = credential_vault::load_keys(&db, &config.keyring, std::time::Duration::ZERO)
            .await
            .unwrap()
            .hasher;
        let metrics =
            credential_vault::metrics::VaultMetrics::new(&prometheus::Registry::new()).unwrap();
        let audit = AuditLog::start(db.clone(), metrics, hasher.clone()).unwrap();
        let entry = |request_id: &str| Entry {
            actor: "test".into(),
            action: "credential.read",
            resource: "credential:none".into(),
            outcome: Outcome::Success,
            request_id: request_id.into(),
            client_addr: "127.0.0.1".into(),
        };

        let described = entry("panics");
        let failed = audit
            .execute(
                |_conn| -> Result<(), credential_vault::store::StoreError> {
                    panic!("a change that panics")
                },
                move |_| described,
            )
            .await;
        assert!(failed.is_err(), "a panicking change must not succeed");
        audit.record(entry("after")).await.unwrap();

        let verified = db
            .run(move |conn| credential_vault::audit::verify(conn, &hasher))
            .await
            .unwrap();
        assert!(verified.ok, "{verified:?}");
        let ids: Vec<String> = db
            .run(|conn| {
                Ok(audit_log::table
                    .select(audit_log::request_id)
                    .order(audit_log::seq.asc())
                    .load(conn)?)
            })
            .await
            .unwrap();
        assert!(ids.contains(&"after".to_owned()), "{ids:?}");
        assert!(!ids.contains(&"panics".to_owned()), "{ids:?}");
    }
);
