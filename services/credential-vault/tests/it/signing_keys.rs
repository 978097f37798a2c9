//! Rotating the token signing key while the vault runs (`rotate-signing-key`): the new key
//! is published before it signs and tokens signed before stay valid; retiring the previous
//! keys (one leaked) refuses every token they signed, and the tokens written then work.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use common::both_backends;
use common::testing::run_binary;

use crate::support::{BINARY, Fixture, Vault, mode};

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&json).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

async fn published(vault: &Vault, admin: &str) -> BTreeSet<String> {
    let jwks = vault.get("/api/auth/jwks", admin).await.json();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits, up to `within`, until `what` holds; returns how long it took.
async fn wait_until<F, Fut>(within: Duration, description: &str, mut what: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !what().await {
        assert!(
            started.elapsed() < within,
            "{description} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// The `kid` the CLI printed after `added signing key `.
fn added_kid(stdout: &[u8]) -> String {
    let stdout = String::from_utf8_lossy(stdout);
    let rest = stdout
        .split("added signing key ")
        .nth(1)
        .unwrap_or_else(|| panic!("{stdout}"));
    rest.split([':', ',']).next().unwrap().to_owned()
}

both_backends!(
    a_new_key_is_published_before_it_signs_and_retired_keys_are_refused,
    |backend| async move {
        // RESYNC_INTERVAL is 1 s: a new key is published within 1 s and signs after 2 s.
        let fixture = Fixture::new(backend);
        let vault = fixture.start().await;
        let old_admin = fixture.admin().to_owned();
        let first = kid_of(&old_admin);
        assert_eq!(
            published(&vault, &old_admin).await,
            BTreeSet::from([first.clone()])
        );

        let out = run_binary(BINARY, &["rotate-signing-key"], &fixture.env(&[]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let second = added_kid(&out.stdout);
        let both = BTreeSet::from([first.clone(), second.clone()]);
        wait_until(Duration::from_secs(3), "the new key published", || async {
            published(&vault, &old_admin).await == both
        })
        .await;
        // Published, but a resync short of signing: tokens issued now still carry the first key.
        let (_, token) = vault.issue(&old_admin, "orders").await;
        assert_eq!(
            kid_of(&token),
            first,
            "signed before it was published long enough"
        );
        wait_until(Duration::from_secs(5), "the new key signing", || async {
            kid_of(&vault.issue(&old_admin, "orders").await.1) == second
        })
        .await;
        assert_eq!(vault.get("/api/audit?limit=1", &token).await.status, 403);
        assert_eq!(
            vault.get("/api/audit?limit=1", &old_admin).await.status,
            200,
            "tokens signed by the previous key stay valid"
        );

        // A usage error changes nothing.
        let out = run_binary(
            BINARY,
            &["rotate-signing-key", "--retire-previous"],
            &fixture.env(&[]),
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));

        let retire_into = |dir: &std::path::Path| {
            let args = [
                "rotate-signing-key",
                "--retire-previous",
                "--out",
                dir.to_str().unwrap(),
            ];
            run_binary(BINARY, &args, &fixture.env(&[]))
        };
        // New tokens go to a new folder only.
        let out = retire_into(&fixture.dir.path().join("tokens"));
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
        assert_eq!(published(&vault, &old_admin).await, both, "nothing changed");

        // A leak: the previous keys retired at once, new tokens written.
        let dir = fixture.dir.path().join("after-leak");
        let out = retire_into(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let third = added_kid(&out.stdout);
        assert_eq!(mode(&dir), 0o700);
        let mut written = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            let token = std::fs::read_to_string(&path).unwrap();
            assert!(!String::from_utf8_lossy(&out.stdout).contains(&token));
            assert_eq!(kid_of(&token), third);
            written.insert(path.file_name().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(
            written,
            BTreeSet::from(
                [
                    "admin-token",
                    "credential-vault-token",
                    "gateway-token",
                    "health-monitor-token",
                    "service-registry-token"
                ]
                .map(str::to_owned)
            )
        );
        let new_admin = std::fs::read_to_string(dir.join("admin-token")).unwrap();
        // Within one resync only the new key is published, and what the others signed
        // is refused, the cached admin token included.
        wait_until(Duration::from_secs(3), "the old keys retired", || async {
            published(&vault, &new_admin).await == BTreeSet::from([third.clone()])
        })
        .await;
        assert_eq!(
            vault.get("/api/audit?limit=1", &old_admin).await.status,
            401
        );
        let audit = vault.get("/api/audit?limit=1000", &new_admin).await;
        assert_eq!(audit.status, 200);
        let rotations: Vec<_> = audit.json()["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"].as_str().unwrap().starts_with("signing_key."))
            .map(|r| {
                (
                    r["action"].as_str().unwrap().to_owned(),
                    r["resource"].as_str().unwrap().to_owned(),
                    r["actor"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            rotations,
            [
                (
                    "signing_key.rotate".to_owned(),
                    format!("signing:{second}"),
                    "operator (cli)".to_owned()
                ),
                (
                    "signing_key.rotate_retiring_previous".to_owned(),
                    format!("signing:{third}"),
                    "operator (cli)".to_owned()
                ),
            ]
        );
    }
);

/// A vault that cannot open a new signing key (sealed under a master key it lacks) might
/// go on trusting one retired meanwhile: it says so on `/ready` until restarted with that
/// master key.
#[tokio::test]
async fn a_vault_that_cannot_open_a_new_key_is_not_ready_until_it_can() {
    let fixture = Fixture::new(common::db::Backend::Sqlite);
    let mut vault = fixture.start().await;
    let admin = fixture.admin().to_owned();
    assert_eq!(vault.get("/ready", &admin).await.status, 200);

    let other = fixture.dir.path().join("other-key");
    crate::support::generate_key(&other);
    let (current, other) = (
        fixture.master_key.to_str().unwrap(),
        other.to_str().unwrap(),
    );
    let cli_env = fixture.env(&[
        ("VAULT_MASTER_KEY_FILE", other),
        ("VAULT_EXTRA_MASTER_KEY_FILES", current),
    ]);
    let out = run_binary(BINARY, &["rotate-signing-key"], &cli_env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // At its next resync (1 s) the reload fails, and /ready says why.
    wait_until(
        Duration::from_secs(3),
        "/ready down for the keys",
        || async { vault.get("/ready", &admin).await.status == 503 },
    )
    .await;
    let problem = vault.get("/ready", &admin).await.json();
    assert_eq!(problem["checks"]["signing_keys"], "down", "{problem}");
    assert_eq!(problem["checks"]["database"], "up", "{problem}");

    // Restarted with both master keys, it opens the new key and is ready.
    assert!(vault.process.terminate().success());
    let vault = fixture
        .start_with(&[("VAULT_EXTRA_MASTER_KEY_FILES", other)])
        .await;
    assert_eq!(vault.get("/ready", &admin).await.status, 200);
    assert_eq!(published(&vault, &admin).await.len(), 2);
}
