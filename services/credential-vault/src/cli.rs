//! The vault's operator subcommands: `generate-master-key`, `init`, `rotate-master-key`,
//! `issue-admin-token`, `rotate-signing-key`.
//!
//! Like `vault operator init`, `init` creates the vault's keys and the first tokens; the
//! tokens go to files of mode 0600 and nowhere else (never a log, never stdout).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use common::api::services;
use common::auth::{Claims, SigningKey, now_unix};
use common::config::{self, Env};
use common::db::Db;
use common::secret::Secret;

use crate::audit::{AuditLog, Entry, Outcome};
use crate::crypto::{AuditHasher, Binding, MasterKey, Sealed};
use crate::store::{self, SealedKeyRow};
use crate::vault::{ADMIN_SCOPE, AUDIT_KEY_NAME, AUDIT_PURPOSE, SIGNING_PURPOSE};
use crate::{Config, MIGRATIONS, NAME};

pub const USAGE: &str = "  generate-master-key --out FILE     write a new random master key (mode 0600)
  init --out DIR                     create the vault's keys and the first tokens as 0600 files in DIR
  rotate-master-key --new-key-file FILE   re-wrap every data key and vault key under FILE's key
  issue-admin-token --out FILE       a new admin token as a 0600 file (the old one expired, leaked or revoked)
  rotate-signing-key                 a new token signing key; it signs once every vault publishes it
  rotate-signing-key --retire-previous --out DIR
                                     the same, the old keys retired at once (leaked), and new
                                     admin and control-plane tokens as 0600 files in DIR";

/// How long the tokens `init` makes live; rotate them with `POST /api/tokens` before then.
const INIT_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The control plane's own tokens and the scopes each needs, no more (DESIGN.md). Each
/// registers itself with the registry; none can read a credential.
const CONTROL_PLANE: &[(&str, &[&str])] = &[
    (services::CREDENTIAL_VAULT, &["services:register"]),
    (
        services::GATEWAY,
        &["services:register", "services:discover", "health:read"],
    ),
    (
        services::SERVICE_REGISTRY,
        &["services:register", "services:discover"],
    ),
    (
        services::HEALTH_MONITOR,
        &[
            "services:register",
            "services:discover",
            "services:health:write",
            "health:read",
        ],
    ),
];

pub fn run(name: &str, args: &[String], env: &Env) -> Option<ExitCode> {
    let result = match name {
        "generate-master-key" => flag(args, "--out").and_then(|out| generate_master_key(&out)),
        "init" => flag(args, "--out").and_then(|out| with_runtime(init(env, out))),
        "rotate-master-key" => {
            flag(args, "--new-key-file").and_then(|file| with_runtime(rotate_master_key(env, file)))
        }
        "issue-admin-token" => {
            flag(args, "--out").and_then(|out| with_runtime(issue_admin_token(env, out)))
        }
        "rotate-signing-key" => match args {
            [] => with_runtime(rotate_signing_key(env, None)),
            [retire, flag_name, dir] if retire == "--retire-previous" && flag_name == "--out" => {
                with_runtime(rotate_signing_key(env, Some(PathBuf::from(dir))))
            }
            _ => Err(anyhow::anyhow!(
                "usage: {NAME} rotate-signing-key [--retire-previous --out DIR]"
            )),
        },
        _ => return None,
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{NAME} {name}: {error:#}");
            ExitCode::FAILURE
        }
    })
}

fn flag(args: &[String], name: &str) -> anyhow::Result<PathBuf> {
    match args {
        [flag, value] if flag == name => Ok(PathBuf::from(value)),
        _ => bail!("usage: {NAME} … {name} PATH"),
    }
}

fn with_runtime(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = common::service::runtime(NAME).context("no async runtime")?;
    runtime.block_on(work)
}

/// Creates `path` with mode 0600, refusing to overwrite anything.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn generate_master_key(out: &Path) -> anyhow::Result<()> {
    let (key, text) = MasterKey::generate().context("cannot generate a key")?;
    write_private(out, format!("{}\n", text.expose()).as_bytes())?;
    println!(
        "wrote master key {} to {} (mode 0600)",
        key.id(),
        out.display()
    );
    Ok(())
}

async fn open_database(env: &Env) -> anyhow::Result<(Config, Db)> {
    let config = config::or_exit(NAME, Config::from_env(env));
    let db = Db::new(&config.database.url, 2);
    db.migrate(&MIGRATIONS)
        .await
        .with_context(|| format!("cannot migrate {}", config.database.url.redacted()))?;
    Ok((config, db))
}

fn operator_entry(action: &'static str, resource: &str, outcome: Outcome) -> Entry {
    Entry {
        actor: "operator (cli)".into(),
        action,
        resource: resource.into(),
        outcome,
        request_id: uuid::Uuid::new_v4().to_string(),
        client_addr: "local".into(),
    }
}

/// Creates `dir` (and its parents) with mode 0700: it is to hold tokens, so only its
/// owner may list it. One that exists already keeps its mode.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Signs the admin token and one per control-plane service with `signer`, and writes each
/// to a 0600 file in `out`, never over one that exists; returns the rows to record and
/// the files. The files come first: should recording them fail, the caller removes them;
/// the other way round, a committed vault could be left without its admin token.
fn write_tokens(
    signer: &SigningKey,
    out: &Path,
) -> anyhow::Result<(Vec<store::TokenRow>, Vec<PathBuf>)> {
    let mut tokens = vec![("admin", vec![ADMIN_SCOPE.to_owned()])];
    tokens.extend(
        CONTROL_PLANE
            .iter()
            .map(|(service, scopes)| (*service, scopes.iter().map(|s| (*s).to_owned()).collect())),
    );
    let mut rows = Vec::new();
    let mut written = Vec::new();
    for (subject, scopes) in tokens {
        let iat = now_unix();
        let claims = Claims {
            sub: subject.into(),
            scopes,
            exp: iat + INIT_TOKEN_TTL.as_secs() as i64,
            iat,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let path = out.join(format!("{subject}-token"));
        if let Err(error) = write_private(&path, signer.sign(&claims).expose().as_bytes()) {
            remove_all(&written);
            return Err(error);
        }
        written.push(path);
        rows.push(crate::api::token_row(&claims));
    }
    Ok((rows, written))
}

async fn init(env: &Env, out: PathBuf) -> anyhow::Result<()> {
    let (config, db) = open_database(env).await?;
    if db.run(|conn| Ok(store::is_initialized(conn))).await?? {
        bail!("the vault is already initialized; init runs once per database");
    }
    create_private_dir(&out)?;

    let signer = SigningKey::generate().context("cannot generate the signing key")?;
    let audit_key = AuditHasher::generate_key().context("cannot generate the audit key")?;
    let now = Utc::now().naive_utc();
    let seal = |name: &str, purpose: &str, key: &Secret<Vec<u8>>| -> anyhow::Result<SealedKeyRow> {
        let (sealed, master_key_id) = config.keyring.seal_key(name, key.expose())?;
        Ok(SealedKeyRow {
            name: name.into(),
            purpose: purpose.into(),
            sealed,
            master_key_id,
            created_at: now,
            retired_at: None,
        })
    };
    let keys = vec![
        seal(
            &format!("signing:{}", signer.kid()),
            SIGNING_PURPOSE,
            signer.pkcs8(),
        )?,
        seal(AUDIT_KEY_NAME, AUDIT_PURPOSE, &audit_key)?,
    ];

    let (rows, written) = write_tokens(&signer, &out)?;

    let metrics = crate::metrics::VaultMetrics::new(&prometheus::Registry::new())?;
    let audit = AuditLog::start(db.clone(), metrics, AuditHasher::new(audit_key.expose()))?;
    let committed = audit
        .execute(
            move |conn| {
                if store::is_initialized(conn)? {
                    return Err(store::StoreError::Conflict("already initialized".into()));
                }
                for key in &keys {
                    store::insert_sealed_key(conn, key)?;
                }
                for row in &rows {
                    store::insert_token(conn, row)?;
                }
                Ok(())
            },
            |result| {
                let outcome = if result.is_ok() {
                    Outcome::Success
                } else {
                    Outcome::Error
                };
                operator_entry("vault.init", "vault", outcome)
            },
        )
        .await;
    match committed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            remove_all(&written);
            bail!("cannot initialize: {error}");
        }
        Err(error) => {
            remove_all(&written);
            bail!("cannot initialize: {error}");
        }
    }
    println!(
        "initialized the vault (signing key {}, master key {}); tokens written (mode 0600):",
        signer.kid(),
        config.keyring.current_id()
    );
    for path in &written {
        println!("  {}", path.display());
    }
    Ok(())
}

/// A new admin token, for when the one `init` wrote has expired, leaked or been revoked:
/// the API never mints one (`POST /api/tokens` refuses the admin scope), so only who
/// holds the master key and reaches the database can, as with `vault operator
/// generate-root`. Recorded like any issue, by `operator (cli)`; the old token stays
/// valid until revoked with the new one.
async fn issue_admin_token(env: &Env, out: PathBuf) -> anyhow::Result<()> {
    let (config, db) = open_database(env).await?;
    let keys = crate::load_keys(&db, &config.keyring, config.signing_key_publication()).await?;
    let iat = now_unix();
    let claims = Claims {
        sub: "admin".into(),
        scopes: vec![ADMIN_SCOPE.to_owned()],
        exp: iat + INIT_TOKEN_TTL.as_secs() as i64,
        iat,
        jti: uuid::Uuid::new_v4().to_string(),
    };
    // The file first, as in `init`: a token recorded but never written would be lost.
    write_private(&out, keys.signing.signer.sign(&claims).expose().as_bytes())?;
    let row = crate::api::token_row(&claims);
    let resource = format!("token:{}", keys.hasher.hash(&claims.jti));
    let metrics = crate::metrics::VaultMetrics::new(&prometheus::Registry::new())?;
    let audit = AuditLog::start(db.clone(), metrics, keys.hasher)?;
    let committed = audit
        .execute(
            move |conn| store::insert_token(conn, &row),
            move |result| {
                let outcome = if result.is_ok() {
                    Outcome::Success
                } else {
                    Outcome::Error
                };
                operator_entry("token.issue", &resource, outcome)
            },
        )
        .await;
    if let Err(error) = committed
        .map_err(anyhow::Error::from)
        .and_then(|inner| inner.map_err(anyhow::Error::from))
    {
        let _ = std::fs::remove_file(&out);
        bail!("cannot record the token: {error}");
    }
    println!(
        "wrote an admin token (id {}, expires in {} days) to {} (mode 0600)",
        claims.jti,
        INIT_TOKEN_TTL.as_secs() / 86_400,
        out.display()
    );
    // Ids are no secret (the API returns them); a leaked token is revoked by its id.
    let new_id = claims.jti;
    let others = db
        .run(|conn| Ok(store::live_tokens_of(conn, "admin", Utc::now().naive_utc())))
        .await??;
    let others: Vec<_> = others.iter().filter(|row| row.id != new_id).collect();
    if !others.is_empty() {
        println!(
            "admin tokens still valid (revoke one with DELETE /api/tokens/ID and the new token):"
        );
        for row in others {
            println!(
                "  {} issued {} expires {}",
                row.id, row.issued_at, row.expires_at
            );
        }
    }
    Ok(())
}

fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

/// Re-wraps every data key and vault key under the new master key, in batches, so that
/// running vaults that hold both keys read throughout; ciphertexts stay as they are.
async fn rotate_master_key(env: &Env, new_key_file: PathBuf) -> anyhow::Result<()> {
    let (config, db) = open_database(env).await?;
    let text = config::read_secret_file(&new_key_file).map_err(anyhow::Error::msg)?;
    let new_key = MasterKey::from_base64(&text).context("the new key file")?;
    let new_id = new_key.id().to_owned();
    // The configured keys keep opening whatever is not re-wrapped yet.
    let keyring = config.keyring.with_current(new_key);

    let metrics = crate::metrics::VaultMetrics::new(&prometheus::Registry::new())?;
    let audit_key = crate::load_keys(&db, &config.keyring, config.signing_key_publication())
        .await?
        .hasher;
    let audit = AuditLog::start(db.clone(), metrics, audit_key)?;
    let mut rewrapped = 0usize;
    loop {
        let target = new_id.clone();
        let batch = db
            .run(move |conn| Ok(store::versions_not_under(conn, &target, 100)))
            .await??;
        if batch.is_empty() {
            break;
        }
        let mut updates = Vec::with_capacity(batch.len());
        for (version, owner) in &batch {
            let (Some(ciphertext), Some(wrapped_key)) = (&version.ciphertext, &version.wrapped_key)
            else {
                continue;
            };
            let sealed = Sealed {
                ciphertext: ciphertext.clone(),
                wrapped_key: wrapped_key.clone(),
                master_key_id: version.master_key_id.clone(),
            };
            let binding = Binding {
                credential_id: &version.credential_id,
                version: version.version,
                owner,
            };
            let fresh = keyring.rewrap(binding, &sealed).with_context(|| {
                format!(
                    "cannot re-wrap credential {} version {}",
                    version.credential_id, version.version
                )
            })?;
            updates.push((
                version.credential_id.clone(),
                version.version,
                fresh.wrapped_key,
            ));
        }
        let count = updates.len();
        let key_id = new_id.clone();
        audit
            .execute(
                move |conn| {
                    for (id, number, wrapped) in &updates {
                        store::rewrap_version(conn, id, *number, wrapped, &key_id)?;
                    }
                    Ok(())
                },
                |result| {
                    let outcome = if result.is_ok() {
                        Outcome::Success
                    } else {
                        Outcome::Error
                    };
                    operator_entry("master_key.rotate", "credential_versions", outcome)
                },
            )
            .await??;
        rewrapped += count;
    }

    let rows = db.run(|conn| Ok(store::sealed_keys(conn))).await??;
    let mut resealed = Vec::new();
    for row in rows.iter().filter(|row| row.master_key_id != new_id) {
        let key = keyring.open_key(&row.name, &row.sealed, &row.master_key_id)?;
        let (sealed, master_key_id) = keyring.seal_key(&row.name, key.expose())?;
        resealed.push((row.name.clone(), sealed, master_key_id));
    }
    let keys = resealed.len();
    audit
        .execute(
            move |conn| {
                for (name, sealed, master_key_id) in &resealed {
                    store::reseal_key(conn, name, sealed, master_key_id)?;
                }
                Ok(())
            },
            |result| {
                let outcome = if result.is_ok() {
                    Outcome::Success
                } else {
                    Outcome::Error
                };
                operator_entry("master_key.rotate", "sealed_keys", outcome)
            },
        )
        .await??;
    println!(
        "re-wrapped {rewrapped} data keys and {keys} vault keys under master key {new_id}; \
         point VAULT_MASTER_KEY_FILE at {} and restart the vaults",
        new_key_file.display()
    );
    Ok(())
}

/// Adds a signing key. Every vault publishes it in its JWKS at its next resync and signs
/// with it once it has been published for two resyncs ([`crate::signing_roles`]), so that
/// no service meets its `kid` before it can fetch it; the previous keys keep verifying
/// the tokens they signed. With `retire`, for a key that leaked, the previous keys are
/// retired in the same transaction: every vault stops trusting them within one resync,
/// and so every token they signed, the control plane's included. New ones for the admin
/// and the control plane go to 0600 files in `retire`'s folder.
async fn rotate_signing_key(env: &Env, retire: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, db) = open_database(env).await?;
    let hasher = crate::load_keys(&db, &config.keyring, config.signing_key_publication())
        .await?
        .hasher;
    let signer = SigningKey::generate().context("cannot generate the signing key")?;
    let name = format!("{SIGNING_PURPOSE}:{}", signer.kid());
    let (sealed, master_key_id) = config.keyring.seal_key(&name, signer.pkcs8().expose())?;
    let now = Utc::now().naive_utc();
    let row = SealedKeyRow {
        name: name.clone(),
        purpose: SIGNING_PURPOSE.into(),
        sealed,
        master_key_id,
        created_at: now,
        retired_at: None,
    };
    let (tokens, written) = match &retire {
        Some(out) => {
            // A new folder, so that it is certainly 0700 and holds only these tokens.
            if out.exists() {
                bail!(
                    "{} exists: name a new folder for the new tokens",
                    out.display()
                );
            }
            create_private_dir(out)?;
            write_tokens(&signer, out)?
        }
        None => (Vec::new(), Vec::new()),
    };
    let retiring = retire.is_some();
    let metrics = crate::metrics::VaultMetrics::new(&prometheus::Registry::new())?;
    let audit = AuditLog::start(db.clone(), metrics, hasher)?;
    let resource = name.clone();
    let committed = audit
        .execute(
            move |conn| {
                store::insert_sealed_key(conn, &row)?;
                let retired = if retiring {
                    store::retire_signing_keys_but(conn, &row.name, now)?
                } else {
                    Vec::new()
                };
                for token in &tokens {
                    store::insert_token(conn, token)?;
                }
                Ok(retired)
            },
            move |result| {
                let outcome = if result.is_ok() {
                    Outcome::Success
                } else {
                    Outcome::Error
                };
                let action = if retiring {
                    "signing_key.rotate_retiring_previous"
                } else {
                    "signing_key.rotate"
                };
                operator_entry(action, &resource, outcome)
            },
        )
        .await;
    let retired = match committed
        .map_err(anyhow::Error::from)
        .and_then(|inner| inner.map_err(anyhow::Error::from))
    {
        Ok(retired) => retired,
        Err(error) => {
            remove_all(&written);
            bail!("cannot record the new signing key: {error}");
        }
    };
    // With Redis the vaults reload now, and the other services right after each vault
    // announces its own change; otherwise, or should Redis fail, at their next resyncs.
    let resync = config.common.resync_interval;
    let (vaults_when, services_when) = if announce_signing_keys(&config).await {
        ("now (announced on Redis)".to_owned(), "right after")
    } else {
        (
            format!("within {resync:?} (their next resync)"),
            "within one resync of their own after that",
        )
    };
    if retire.is_none() {
        let signs_from = chrono::Duration::from_std(config.signing_key_publication())
            .ok()
            .and_then(|publication| now.checked_add_signed(publication))
            .map_or_else(
                || "never (RESYNC_INTERVAL is too long)".to_owned(),
                |at| format!("{} UTC", at.format("%Y-%m-%d %H:%M:%S")),
            );
        println!(
            "added signing key {}: every vault publishes it {vaults_when} and signs with it \
             from {signs_from} on; tokens signed before stay valid until they expire",
            signer.kid(),
        );
        return Ok(());
    }
    println!(
        "added signing key {}, which signs at once, and retired {}: the vaults refuse \
         tokens those signed {vaults_when}, the other services {services_when}",
        signer.kid(),
        if retired.is_empty() {
            "none".to_owned()
        } else {
            retired.join(", ")
        }
    );
    println!("new tokens (mode 0600); give each service its own as TOKEN_FILE and restart it:");
    for path in &written {
        println!("  {}", path.display());
    }
    Ok(())
}

/// Publishes `signing_keys_changed` on `concierge:vault` when `REDIS_URL` is set; whether
/// it went out. A failure is only reported: the vaults reload at their next resync anyway.
async fn announce_signing_keys(config: &Config) -> bool {
    let Some(redis_url) = config.common.redis_url.as_ref() else {
        return false;
    };
    let announced = async {
        let metrics = events::EventMetrics::new(&prometheus::Registry::new())?;
        let publisher = events::Publisher::new(Some(redis_url), format!("{NAME} (cli)"), metrics)?;
        publisher
            .publish(common::api::Event::SigningKeysChanged {})
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    match announced.await {
        Ok(()) => true,
        Err(error) => {
            eprintln!(
                "cannot announce the change on Redis ({error:#}); the vaults pick it up at their next resync"
            );
            false
        }
    }
}
