//! The vault's state and the rules every request goes through: who is calling, what
//! they may do, and the audit record of it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use common::api::Event;
use common::auth::{Claims, VerifiedTokens, now_unix};
use common::db::{Db, DbConnection};
use common::forwarded::TrustedProxies;
use common::secret::Secret;
use events::Publisher;

use crate::SigningKeys;
use crate::audit::{AuditLog, Entry, Outcome};
use crate::crypto::{AuditHasher, Keyring};
use crate::error::ApiError;
use crate::metrics::VaultMetrics;
use crate::store::{self, StoreError};

/// The scope that makes a token an admin token.
pub const ADMIN_SCOPE: &str = "admin";
/// A service token's right to read the credentials it owns or that are shared with it.
pub const CREDENTIALS_READ: &str = "credentials:read";

/// Scopes a service token may carry (DESIGN.md, "Identity and access").
pub const SERVICE_SCOPES: &[&str] = &[
    CREDENTIALS_READ,
    "services:register",
    "services:discover",
    "services:health:write",
    "health:read",
];

/// The scopes a plain service token gets when none are asked for.
pub const DEFAULT_SERVICE_SCOPES: &[&str] = &[
    CREDENTIALS_READ,
    "services:register",
    "services:discover",
    "health:read",
];

/// Names of the sealed keys in the `sealed_keys` table.
pub const AUDIT_KEY_NAME: &str = "audit-hmac";
pub const SIGNING_PURPOSE: &str = "signing";
pub const AUDIT_PURPOSE: &str = "audit-hmac";

/// A token that checked out, and how the audit log names its holder.
#[derive(Debug)]
pub struct Identity {
    pub claims: Claims,
    /// Subject and the token id's HMAC: computed once per token, not per request.
    pub actor: String,
    /// The key that verified the token: once it is retired, the token no longer counts.
    pub kid: String,
}

/// Who is calling, once their token checked out; shared with the verified-token cache.
#[derive(Debug, Clone)]
pub struct Caller(Arc<Identity>);

impl std::ops::Deref for Caller {
    type Target = Identity;

    fn deref(&self) -> &Identity {
        &self.0
    }
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.claims.has_scope(ADMIN_SCOPE)
    }

    /// The service a non-admin token belongs to.
    pub fn service(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.claims.sub.as_str())
    }

    /// Whether the caller may read a credential owned by `owner` and shared with `shared_with`.
    pub fn may_read(&self, owner: &str, shared_with: &[String]) -> bool {
        if self.is_admin() {
            return true;
        }
        self.claims.has_scope(CREDENTIALS_READ)
            && (self.claims.sub == owner || shared_with.contains(&self.claims.sub))
    }
}

/// Why a request had no valid identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Invalid,
    Expired,
    Revoked,
}

/// Where a request came from, for its audit record.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub client_addr: String,
    /// The `Authorization` header's bearer token, `Err` if the header is malformed.
    pub bearer: Option<Result<Secret<String>, ()>>,
}

/// A credential as the hot read path needs it: the row, its current and previous versions.
#[derive(Debug)]
pub struct Snapshot {
    pub row: store::CredentialRow,
    pub current: store::VersionRow,
    pub previous: Option<store::VersionRow>,
}

/// Recently read credentials, so that a read costs no query. Local changes invalidate at
/// once, other vaults' changes through their events; the TTL bounds staleness when an
/// event is lost (pub/sub is at-most-once).
#[derive(Debug)]
pub struct SnapshotCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, (Instant, Arc<Snapshot>)>>,
}

/// Entries kept at most; past that the cache starts over (cheap, and rare).
const CACHE_CAPACITY: usize = 10_000;

impl SnapshotCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Snapshot>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(id)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, snapshot)| snapshot.clone())
    }

    fn put(&self, id: String, snapshot: Arc<Snapshot>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(id, (Instant::now(), snapshot));
    }

    pub fn invalidate(&self, id: &str) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct Vault {
    pub db: Db,
    pub keyring: Keyring,
    /// Replaced whole when a resync finds the keys changed (a rotation, a retirement).
    pub signing: RwLock<Arc<SigningKeys>>,
    /// How long a new signing key is published before it signs.
    pub signing_key_publication: Duration,
    /// Why the last reload of the signing keys failed, while it did: the keys in use may
    /// include one retired since, so the vault is not ready.
    pub signing_keys_stale: RwLock<Option<String>>,
    pub hasher: AuditHasher,
    pub audit: AuditLog,
    pub publisher: Publisher,
    pub metrics: VaultMetrics,
    pub revoked: RwLock<HashSet<String>>,
    pub default_grace: Duration,
    pub max_token_ttl: Duration,
    /// Whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    pub snapshots: SnapshotCache,
    pub verified: VerifiedTokens<Identity>,
}

impl Vault {
    /// The caller's identity, or why there is none. Cheap: a signature check and a set lookup.
    pub fn authenticate(&self, ctx: &RequestContext) -> Result<Caller, (AuthFailure, String)> {
        let token = match &ctx.bearer {
            None => return Err((AuthFailure::Missing, "anonymous".into())),
            Some(Err(())) => return Err((AuthFailure::Malformed, "anonymous".into())),
            Some(Ok(token)) => token,
        };
        // A refused token is named by its HMAC: repeated attempts correlate, nothing leaks.
        let presented = || format!("unverified token={}", self.hasher.hash(token.expose()));
        // A cached token counts only while the key that verified it is trusted: a key
        // retired since (it leaked) takes its tokens with it, however they were cached.
        let signing = self.signing();
        let cached = self.verified.get(token.expose()).filter(|identity| {
            identity.claims.exp > now_unix() && signing.keys.trusts(&identity.kid)
        });
        let verified = match cached {
            Some(identity) => Ok(identity),
            None => signing
                .keys
                .verify_keyed(token.expose(), now_unix())
                .map(|(claims, kid)| {
                    let actor = format!("{} token={}", claims.sub, self.hasher.hash(&claims.jti));
                    self.verified
                        .put(token.expose(), Identity { claims, actor, kid })
                }),
        };
        let identity = match verified {
            Ok(identity) => identity,
            Err(common::auth::TokenError::Expired) => {
                return Err((AuthFailure::Expired, presented()));
            }
            Err(error) => {
                tracing::info!(%error, "refused a token");
                return Err((AuthFailure::Invalid, presented()));
            }
        };
        if self.is_revoked(&identity.claims.jti) {
            return Err((AuthFailure::Revoked, identity.actor.clone()));
        }
        Ok(Caller(identity))
    }

    pub fn is_revoked(&self, token_id: &str) -> bool {
        match self.revoked.read() {
            Ok(set) => set.contains(token_id),
            Err(poisoned) => poisoned.into_inner().contains(token_id),
        }
    }

    pub fn mark_revoked(&self, token_id: String) {
        match self.revoked.write() {
            Ok(mut set) => {
                set.insert(token_id);
            }
            Err(poisoned) => {
                poisoned.into_inner().insert(token_id);
            }
        }
    }

    /// The signing keys in use now.
    pub fn signing(&self) -> Arc<SigningKeys> {
        match self.signing.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Opens the signing keys again (reconciliation): a key another vault or the CLI
    /// added is published, one published long enough signs, a retired one no longer
    /// verifies, and the tokens it verified are refused from then on.
    /// Returns whether anything changed.
    pub async fn reload_signing_keys(&self) -> anyhow::Result<bool> {
        let fresh = crate::load_keys(&self.db, &self.keyring, self.signing_key_publication)
            .await?
            .signing;
        let current = self.signing();
        if fresh.signer.kid() == current.signer.kid() && fresh.kids() == current.kids() {
            return Ok(false);
        }
        let retired = current.kids().difference(&fresh.kids()).count();
        tracing::info!(
            signs = fresh.signer.kid(),
            verify = ?fresh.kids(),
            retired,
            "signing keys changed"
        );
        let fresh = Arc::new(fresh);
        match self.signing.write() {
            Ok(mut keys) => *keys = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        // Not needed for safety (a cached token counts only while its key is trusted),
        // but the retired keys' tokens need not stay in memory.
        if retired > 0 {
            self.verified.clear();
        }
        Ok(true)
    }

    /// Reloads the signing keys; when they changed, says so on `concierge:vault`, so that
    /// the other services fetch this vault's JWKS now, after it has changed.
    pub async fn follow_signing_keys(&self) {
        let reloaded = self.reload_signing_keys().await;
        *self
            .signing_keys_stale
            .write()
            .unwrap_or_else(PoisonError::into_inner) = reloaded
            .as_ref()
            .err()
            .map(|error| format!("cannot reload the signing keys: {error:#}"));
        match reloaded {
            Ok(false) => {}
            Ok(true) => {
                if let Err(error) = self.publisher.publish(Event::SigningKeysChanged {}).await {
                    tracing::warn!(%error, "cannot announce the new signing keys; the services reload them at their next resync");
                }
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot reload the signing keys; will retry");
            }
        }
    }

    /// For `/ready`: down while the signing keys could not be reloaded, say because a new
    /// one is sealed under a master key this vault lacks (it would go on trusting a key
    /// retired meanwhile). Each check tries the reload again, so that a database that
    /// was briefly away costs no more than its own check does.
    pub async fn check_signing_keys(&self) -> Result<(), String> {
        let stale = || {
            self.signing_keys_stale
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        if stale().is_some() {
            self.follow_signing_keys().await;
        }
        stale().map_or(Ok(()), Err)
    }

    /// Reloads the revoked set from the database (reconciliation).
    pub async fn reload_revoked(&self) -> Result<usize, StoreError> {
        let now = chrono::Utc::now().naive_utc();
        let ids = self
            .read(move |conn| store::revoked_tokens(conn, now))
            .await?;
        let count = ids.len();
        let fresh: HashSet<String> = ids.into_iter().collect();
        match self.revoked.write() {
            Ok(mut set) => *set = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(count)
    }

    /// Counts the versions sealed under each master key again, from the database.
    pub async fn refresh_key_wear(&self) -> Result<(), StoreError> {
        let counts = self.read(store::versions_per_master_key).await?;
        let gauge = &self.metrics.master_key_sealed_versions;
        gauge.reset();
        // The key in use has a series from the start, at 0 until it seals something.
        gauge.with_label_values(&[self.keyring.current_id()]).set(0);
        for (master_key_id, versions) in counts {
            gauge.with_label_values(&[&master_key_id]).set(versions);
        }
        Ok(())
    }

    /// A credential with its current and previous versions, from the cache when fresh.
    pub async fn snapshot(&self, id: &str) -> Result<Arc<Snapshot>, StoreError> {
        if let Some(snapshot) = self.snapshots.get(id) {
            return Ok(snapshot);
        }
        let lookup = id.to_owned();
        let snapshot = Arc::new(
            self.read(move |conn| {
                let row = store::credential(conn, &lookup)?;
                let current = store::version(conn, &lookup, row.current_version)?;
                let previous = if row.current_version > 1 {
                    Some(store::version(conn, &lookup, row.current_version - 1)?)
                } else {
                    None
                };
                Ok(Snapshot {
                    row,
                    current,
                    previous,
                })
            })
            .await?,
        );
        self.snapshots.put(id.to_owned(), snapshot.clone());
        Ok(snapshot)
    }

    /// Runs store reads on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.db
            .run(move |conn| Ok(f(conn)))
            .await
            .map_err(StoreError::Db)?
    }

    /// An audit record for this request.
    pub fn entry(
        &self,
        ctx: &RequestContext,
        actor: &str,
        action: &'static str,
        resource: &str,
        outcome: Outcome,
    ) -> Entry {
        self.metrics.operation(action, outcome);
        Self::draft_entry(ctx, actor, action, resource, outcome)
    }

    /// An entry not counted yet: for an operation whose outcome is known only later.
    pub fn draft_entry(
        ctx: &RequestContext,
        actor: &str,
        action: &'static str,
        resource: &str,
        outcome: Outcome,
    ) -> Entry {
        Entry {
            actor: actor.to_owned(),
            action,
            resource: resource.to_owned(),
            outcome,
            request_id: ctx.request_id.clone(),
            client_addr: ctx.client_addr.clone(),
        }
    }

    /// Appends a record; a failure to do so is the request's failure (503).
    pub async fn record(
        &self,
        ctx: &RequestContext,
        actor: &str,
        action: &'static str,
        resource: &str,
        outcome: Outcome,
    ) -> Result<(), ApiError> {
        let entry = self.entry(ctx, actor, action, resource, outcome);
        self.audit
            .record(entry)
            .await
            .map_err(ApiError::AuditUnavailable)
    }

    /// The caller, or the recorded 401.
    pub async fn authorize(
        &self,
        ctx: &RequestContext,
        action: &'static str,
        resource: &str,
    ) -> Result<Caller, ApiError> {
        match self.authenticate(ctx) {
            Ok(caller) => Ok(caller),
            Err((failure, actor)) => {
                self.record(ctx, &actor, action, resource, Outcome::Unauthenticated)
                    .await?;
                Err(ApiError::Unauthenticated(failure))
            }
        }
    }

    /// The caller if an admin, or the recorded 403.
    pub async fn authorize_admin(
        &self,
        ctx: &RequestContext,
        action: &'static str,
        resource: &str,
    ) -> Result<Caller, ApiError> {
        let caller = self.authorize(ctx, action, resource).await?;
        if caller.is_admin() {
            Ok(caller)
        } else {
            Err(self.deny(ctx, &caller, action, resource).await)
        }
    }

    /// Records a request refused under `outcome` and hands back `error`, or the 503 if
    /// even the record cannot be written.
    pub async fn refuse(
        &self,
        ctx: &RequestContext,
        caller: &Caller,
        action: &'static str,
        resource: &str,
        outcome: Outcome,
        error: ApiError,
    ) -> ApiError {
        match self
            .record(ctx, &caller.actor, action, resource, outcome)
            .await
        {
            Ok(()) => error,
            Err(unrecorded) => unrecorded,
        }
    }

    /// Records a refusal and returns the 403 (or the 503 if even that cannot be recorded).
    pub async fn deny(
        &self,
        ctx: &RequestContext,
        caller: &Caller,
        action: &'static str,
        resource: &str,
    ) -> ApiError {
        match self
            .record(ctx, &caller.actor, action, resource, Outcome::Denied)
            .await
        {
            Ok(()) => ApiError::Forbidden,
            Err(error) => error,
        }
    }

    /// Signs a token for `subject` and returns it with its claims.
    pub fn sign(
        &self,
        subject: &str,
        scopes: Vec<String>,
        ttl: Duration,
    ) -> (Secret<String>, Claims) {
        let now = now_unix();
        let claims = Claims {
            sub: subject.to_owned(),
            scopes,
            exp: now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        (self.signing().signer.sign(&claims), claims)
    }
}

/// Shared state as handlers receive it.
pub type SharedVault = Arc<Vault>;
