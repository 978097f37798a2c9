//! Signed bearer tokens: JWT with EdDSA (Ed25519, ring), verified locally against the
//! vault's published keys (JWKS).
//!
//! The format is kept narrow on purpose: one algorithm, a `kid` in every header, and
//! no key material taken from the token itself. A key's `kid` is its RFC 7638 thumbprint.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::client::HttpClient;
use crate::secret::Secret;

/// The one algorithm tokens are signed with.
pub const ALGORITHM: &str = "EdDSA";

/// Tokens longer than this are refused before any decoding.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock skew tolerated between the vault that signed and the service that verifies.
const LEEWAY_SECONDS: i64 = 5;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who: `admin`, or the service the token belongs to.
    pub sub: String,
    /// What it may do, e.g. `credentials:read`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// The token's id, which revocation names.
    pub jti: String,
}

impl Claims {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// Why a token was refused. Each kind is distinct so that logs and metrics can tell an
/// expired token from a forged one; clients get the same 401 either way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm {0:?} is not EdDSA")]
    UnsupportedAlgorithm(String),
    #[error("the token names no key id")]
    MissingKid,
    #[error("the token's key id {0:?} is not a known key")]
    UnknownKid(String),
    /// The signature does not match the content under the key the `kid` names: the token
    /// was altered after signing, or signed by another key claiming this `kid`.
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token was issued in the future")]
    IssuedInFuture,
}

/// A public key as published in the JWKS (RFC 8037: OKP / Ed25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
}

/// `GET /api/auth/jwks`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// The RFC 7638 thumbprint of an Ed25519 public key: the key's `kid`.
fn thumbprint(public_key: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public_key)
    );
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// An Ed25519 private key that signs tokens; it lives only in the vault.
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
    pkcs8: Secret<Vec<u8>>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the system random number generator failed")]
    Random,
    #[error("the key is not a valid Ed25519 PKCS#8 document")]
    Rejected,
}

impl SigningKey {
    pub fn generate() -> Result<Self, KeyError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
        Self::from_pkcs8(Secret::new(pkcs8.as_ref().to_vec()))
    }

    pub fn from_pkcs8(pkcs8: Secret<Vec<u8>>) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.expose()).map_err(|_| KeyError::Rejected)?;
        Ok(Self {
            kid: thumbprint(pair.public_key().as_ref()),
            pair,
            pkcs8,
        })
    }

    /// The private key as PKCS#8, for storing it (wrapped) in the vault's database.
    pub fn pkcs8(&self) -> &Secret<Vec<u8>> {
        &self.pkcs8
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: B64.encode(self.pair.public_key().as_ref()),
            kid: self.kid.clone(),
            alg: Some(ALGORITHM.into()),
            use_: Some("sig".into()),
        }
    }

    /// The signed token, `header.payload.signature`.
    pub fn sign(&self, claims: &Claims) -> Secret<String> {
        let header = Header {
            alg: ALGORITHM.into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        // Serializing these two plain structs cannot fail.
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let signature = self.pair.sign(signing_input.as_bytes());
        Secret::new(format!(
            "{signing_input}.{}",
            B64.encode(signature.as_ref())
        ))
    }
}

/// The public keys a verifier trusts, by `kid`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Vec<u8>>,
}

impl KeySet {
    /// The Ed25519 keys of `jwks`; keys of other types are skipped, as RFC 7517 asks.
    pub fn from_jwks(jwks: &Jwks) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter(|k| k.kty == "OKP" && k.crv == "Ed25519")
            .filter_map(|k| Some((k.kid.clone(), B64.decode(&k.x).ok()?)))
            .filter(|(_, x)| x.len() == 32)
            .collect();
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `token` at time `now` (Unix seconds) and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        self.verify_keyed(token, now).map(|(claims, _)| claims)
    }

    /// Whether the key `kid` is among these.
    pub fn trusts(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// [`Self::verify`], and the `kid` of the key that checked out: whoever keeps the
    /// verified token keeps it too, to drop the token once that key is retired.
    pub fn verify_keyed(&self, token: &str, now: i64) -> Result<(Claims, String), TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = decode_json(header_b64)?;
        if header.alg != ALGORITHM {
            return Err(TokenError::UnsupportedAlgorithm(header.alg));
        }
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?;
        let signature = B64
            .decode(signature_b64)
            .map_err(|_| TokenError::Malformed)?;
        let signing_input_len = header_b64.len() + 1 + payload_b64.len();
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&token.as_bytes()[..signing_input_len], &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = decode_json(payload_b64)?;
        if claims.exp + LEEWAY_SECONDS <= now {
            return Err(TokenError::Expired);
        }
        if claims.iat > now + LEEWAY_SECONDS {
            return Err(TokenError::IssuedInFuture);
        }
        Ok((claims, kid))
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Why [`JwksVerifier::verify`] refused: the token, or the keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the signing keys are unavailable: {0}")]
    KeysUnavailable(String),
}

/// Verifies tokens against the vault's JWKS, fetched over HTTP and cached; an unknown
/// `kid` (the vault rotated its key) triggers a refetch, at most once per `min_refetch`.
#[derive(Debug)]
pub struct JwksVerifier {
    url: String,
    client: HttpClient,
    keys: RwLock<KeySet>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
}

impl JwksVerifier {
    pub fn new(jwks_url: impl Into<String>, client: HttpClient, min_refetch: Duration) -> Self {
        Self {
            url: jwks_url.into(),
            client,
            keys: RwLock::new(KeySet::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            min_refetch,
        }
    }

    fn check(&self, token: &str) -> Result<(Claims, String), TokenError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.verify_keyed(token, now_unix())
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        self.verify_keyed(token).await.map(|(claims, _)| claims)
    }

    /// [`Self::verify`], and the `kid` of the key that checked out.
    pub async fn verify_keyed(&self, token: &str) -> Result<(Claims, String), VerifyError> {
        match self.check(token) {
            Err(TokenError::UnknownKid(_)) => {
                self.refresh_if_stale().await?;
                Ok(self.check(token)?)
            }
            other => Ok(other?),
        }
    }

    /// Whether the key `kid` is trusted now (not retired since the last fetch).
    pub fn trusts(&self, kid: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .trusts(kid)
    }

    /// Refetches unless a fetch happened within `min_refetch`; concurrent callers share one fetch.
    async fn refresh_if_stale(&self) -> Result<(), VerifyError> {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return Ok(());
        }
        self.fetch(&mut last).await.map(|_| ())
    }

    /// Refetches whatever the last fetch (reconciliation, so that a retired key stops
    /// being trusted); returns whether a key trusted before is gone.
    pub async fn refresh(&self) -> Result<bool, VerifyError> {
        let mut last = self.last_fetch.lock().await;
        self.fetch(&mut last).await
    }

    async fn fetch(&self, last: &mut Option<Instant>) -> Result<bool, VerifyError> {
        let jwks: Jwks = self
            .client
            .get_json(&self.url)
            .await
            .map_err(|e| VerifyError::KeysUnavailable(e.to_string()))?;
        let keys = KeySet::from_jwks(&jwks);
        let mut current = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let gone = current.keys.keys().any(|kid| !keys.keys.contains_key(kid));
        if gone || current.keys.len() != keys.keys.len() {
            tracing::info!(keys = keys.keys.len(), url = %self.url, "fetched the signing keys");
        }
        *current = keys;
        *last = Some(Instant::now());
        Ok(gone)
    }
}

/// Tokens whose signature checked out, so that a token is verified once, not per request,
/// with what the holder derives from it (the claims, or more). Expiry and revocation are
/// still checked on every request.
pub struct VerifiedTokens<T = Claims> {
    entries: RwLock<HashMap<String, Arc<T>>>,
}

impl<T> Default for VerifiedTokens<T> {
    fn default() -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
        }
    }
}

impl<T> std::fmt::Debug for VerifiedTokens<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are bearer tokens: count them, never print them.
        let count = self.entries.read().map_or(0, |e| e.len());
        f.debug_struct("VerifiedTokens")
            .field("count", &count)
            .finish()
    }
}

impl<T> VerifiedTokens<T> {
    pub fn get(&self, token: &str) -> Option<Arc<T>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.get(token).cloned()
    }

    /// Forgets every token: after a key they may have been verified with was retired.
    pub fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Keeps `value` for `token` and hands it back shared.
    pub fn put(&self, token: &str, value: T) -> Arc<T> {
        let value = Arc::new(value);
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= VERIFIED_CAPACITY {
            entries.clear();
        }
        entries.insert(token.to_owned(), value.clone());
        value
    }
}

/// Tokens kept at most; past that the cache starts over (cheap, and rare).
const VERIFIED_CAPACITY: usize = 10_000;

/// Why a request has no usable identity, as a service other than the vault sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the Authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("{0}")]
    Invalid(TokenError),
    #[error("the token has been revoked")]
    Revoked,
    /// The vault's keys could not be fetched: not the caller's fault (503).
    #[error("the signing keys are unavailable")]
    KeysUnavailable,
}

/// The bearer token of an `Authorization` header's value.
pub fn bearer(header: Option<&[u8]>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let text = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' ') {
        Ok(token)
    } else {
        Err(AuthError::Malformed)
    }
}

/// Checks tokens for the services other than the vault: signatures against the vault's
/// JWKS, revocations learned from the vault (events, plus the full list on every resync).
#[derive(Debug)]
pub struct Authenticator {
    verifier: JwksVerifier,
    revoked: RwLock<std::collections::HashSet<String>>,
    /// Each with the `kid` of the key it was verified with.
    verified: VerifiedTokens<(Claims, String)>,
    vault_url: String,
    client: HttpClient,
    own_token: Option<Secret<String>>,
}

impl Authenticator {
    /// `vault_url` is the vault's base URL; `own_token` (the service's `TOKEN_FILE`) lets
    /// it read the revocation list.
    pub fn new(vault_url: &str, own_token: Option<Secret<String>>) -> Self {
        let vault_url = vault_url.trim_end_matches('/').to_owned();
        let client = HttpClient::new(Duration::from_secs(5));
        Self {
            verifier: JwksVerifier::new(
                format!("{vault_url}/api/auth/jwks"),
                client.clone(),
                Duration::from_secs(5),
            ),
            revoked: RwLock::new(std::collections::HashSet::new()),
            verified: VerifiedTokens::default(),
            vault_url,
            client,
            own_token,
        }
    }

    /// The claims of the `Authorization` header's token.
    pub async fn authenticate(&self, header: Option<&[u8]>) -> Result<Claims, AuthError> {
        let token = bearer(header)?;
        // A cached token counts only while the key that verified it is trusted: a key
        // retired since (it leaked) takes its tokens with it, however they were cached.
        let cached = self
            .verified
            .get(token)
            .filter(|entry| entry.0.exp > now_unix() && self.verifier.trusts(&entry.1));
        let claims = match cached {
            Some(entry) => entry.0.clone(),
            None => {
                let verified = self
                    .verifier
                    .verify_keyed(token)
                    .await
                    .map_err(|e| match e {
                        VerifyError::Token(token) => AuthError::Invalid(token),
                        VerifyError::KeysUnavailable(_) => AuthError::KeysUnavailable,
                    })?;
                self.verified.put(token, verified).0.clone()
            }
        };
        let revoked = match self.revoked.read() {
            Ok(set) => set.contains(&claims.jti),
            Err(poisoned) => poisoned.into_inner().contains(&claims.jti),
        };
        if revoked {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }

    pub fn mark_revoked(&self, id: String) {
        match self.revoked.write() {
            Ok(mut set) => set.insert(id),
            Err(poisoned) => poisoned.into_inner().insert(id),
        };
    }

    /// What the vault announced, applied: a revocation, or signing keys to fetch again.
    /// Other events are not this one's business.
    pub async fn follow(&self, event: &crate::api::Event) {
        match event {
            crate::api::Event::TokenRevoked { id } => self.mark_revoked(id.clone()),
            crate::api::Event::SigningKeysChanged {} => {
                if let Err(error) = self.reload_keys().await {
                    tracing::warn!(%error, "cannot reload the signing keys; will retry");
                }
            }
            _ => {}
        }
    }

    /// Reconciliation, for every resync: the revocation list and the signing keys again,
    /// whatever events were missed. A failure is logged; the next resync tries again.
    pub async fn resync(&self) {
        if let Err(error) = self.reload_revoked().await {
            tracing::warn!(%error, "cannot reload the revoked tokens; will retry");
        }
        if let Err(error) = self.reload_keys().await {
            tracing::warn!(%error, "cannot reload the signing keys; will retry");
        }
    }

    /// Reloads the signing keys from the vault's JWKS (reconciliation). Tokens verified
    /// under a key now gone (retired after a leak) are refused from then on; the cache
    /// lets them go.
    pub async fn reload_keys(&self) -> Result<(), VerifyError> {
        if self.verifier.refresh().await? {
            self.verified.clear();
        }
        Ok(())
    }

    /// Reloads the revocation list from the vault (reconciliation); needs the own token.
    pub async fn reload_revoked(&self) -> Result<usize, crate::client::ClientError> {
        let Some(token) = &self.own_token else {
            return Ok(0);
        };
        let request = http::Request::get(format!("{}/api/tokens/revoked", self.vault_url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.expose()),
            )
            .body(bytes::Bytes::new())
            .map_err(|e| {
                crate::client::ClientError::InvalidUrl(self.vault_url.clone(), e.to_string())
            })?;
        let response = self.client.send(request).await?;
        if !response.status.is_success() {
            return Err(crate::client::ClientError::Status(
                self.vault_url.clone(),
                response.status,
            ));
        }
        #[derive(Deserialize)]
        struct Revoked {
            revoked: Vec<String>,
        }
        let list: Revoked = serde_json::from_slice(&response.body)
            .map_err(|e| crate::client::ClientError::Body(self.vault_url.clone(), e.to_string()))?;
        let count = list.revoked.len();
        let fresh = list.revoked.into_iter().collect();
        match self.revoked.write() {
            Ok(mut set) => *set = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests;
