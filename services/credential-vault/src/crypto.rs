//! Envelope encryption with AES-256-GCM (ring).
//!
//! Each credential version gets a random data key; the value is sealed under the data
//! key, the data key under the master key. Both seals carry associated data (AAD) that
//! binds them to the credential's id, version and owner, so a ciphertext moved to
//! another row fails to open instead of decrypting as someone else's secret. Master keys
//! carry ids, so that rotating one re-wraps data keys without touching ciphertexts.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::secret::Secret;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("the master key must be {KEY_LEN} random bytes, base64-encoded")]
    BadMasterKey,
    #[error("no master key with id {0:?} is loaded")]
    UnknownMasterKey(String),
    /// The ciphertext was altered, moved to another row, or sealed under another key.
    #[error("integrity check failed: the stored ciphertext does not belong here")]
    Integrity,
    #[error("the system random number generator failed")]
    Random,
}

/// A master key: wraps data keys and the vault's own keys; never stored in the database.
pub struct MasterKey {
    id: String,
    key: LessSafeKey,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// From the file's text: 32 bytes, base64 (surrounding whitespace ignored).
    pub fn from_base64(text: &Secret<String>) -> Result<Self, CryptoError> {
        let bytes = Secret::new(
            B64.decode(text.expose().trim())
                .map_err(|_| CryptoError::BadMasterKey)?,
        );
        Self::from_bytes(bytes.expose())
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::BadMasterKey);
        }
        // The id names the key without revealing it: a hash under a fixed label.
        let mut labelled = b"concierge master key id v1\0".to_vec();
        labelled.extend_from_slice(bytes);
        let digest = ring::digest::digest(&ring::digest::SHA256, &labelled);
        labelled.fill(0);
        let id = hex(&digest.as_ref()[..8]);
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self {
            id,
            key: LessSafeKey::new(key),
        })
    }

    /// A fresh key and its base64 text, for `generate-master-key`.
    pub fn generate() -> Result<(Self, Secret<String>), CryptoError> {
        let bytes = Secret::new(random_bytes::<KEY_LEN>()?.to_vec());
        let key = Self::from_bytes(bytes.expose())?;
        Ok((key, Secret::new(B64.encode(bytes.expose()))))
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CryptoError::Random)?;
    Ok(bytes)
}

/// `nonce ‖ ciphertext ‖ tag` under `key`, bound to `aad`. Nonces are random: a key must
/// be rotated well before 2^32 seals (the vault counts them per key in a metric).
fn seal_with(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce_bytes = random_bytes::<NONCE_LEN>()?;
    let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    sealed.extend_from_slice(&nonce_bytes);
    let mut in_out = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(aad),
        &mut in_out,
    )
    .map_err(|_| CryptoError::Integrity)?;
    sealed.extend_from_slice(&in_out);
    in_out.fill(0);
    Ok(sealed)
}

/// The inverse of [`seal_with`]; lengths are checked before anything is sliced.
fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Secret<Vec<u8>>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Integrity);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Integrity)?;
    let mut in_out = body.to_vec();
    let plain_len = key
        .open_in_place(nonce, Aad::from(aad), &mut in_out)
        .map_err(|_| CryptoError::Integrity)?
        .len();
    in_out.truncate(plain_len);
    Ok(Secret::new(in_out))
}

/// The loaded master keys: the current one seals, any of them opens.
#[derive(Debug, Clone)]
pub struct Keyring {
    current: Arc<MasterKey>,
    by_id: HashMap<String, Arc<MasterKey>>,
}

/// A sealed value as stored: the ciphertext, its wrapped data key, the wrapping key's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub wrapped_key: Vec<u8>,
    pub master_key_id: String,
}

/// What a credential version's seals are bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub credential_id: &'a str,
    pub version: i64,
    pub owner: &'a str,
}

impl Binding<'_> {
    /// Length-prefixed, so that no two bindings share an encoding.
    fn aad(&self, purpose: &str) -> Vec<u8> {
        let mut aad = Vec::new();
        for part in [
            purpose.as_bytes(),
            self.credential_id.as_bytes(),
            &self.version.to_be_bytes(),
            self.owner.as_bytes(),
        ] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad
    }
}

impl Keyring {
    /// `current` seals; `others` (older keys during a rotation) only open.
    pub fn new(current: MasterKey, others: Vec<MasterKey>) -> Self {
        let current = Arc::new(current);
        let mut by_id: HashMap<_, _> = others
            .into_iter()
            .map(|k| (k.id.clone(), Arc::new(k)))
            .collect();
        by_id.insert(current.id.clone(), current.clone());
        Self { current, by_id }
    }

    /// This ring with `current` sealing from now on; the old keys still open.
    pub fn with_current(&self, current: MasterKey) -> Self {
        let current = Arc::new(current);
        let mut by_id = self.by_id.clone();
        by_id.insert(current.id.clone(), current.clone());
        Self { current, by_id }
    }

    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    fn key(&self, id: &str) -> Result<&MasterKey, CryptoError> {
        self.by_id
            .get(id)
            .map(AsRef::as_ref)
            .ok_or_else(|| CryptoError::UnknownMasterKey(id.to_owned()))
    }

    /// Seals a credential version's value under a fresh data key.
    pub fn seal(&self, binding: Binding<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let data_key = Secret::new(random_bytes::<KEY_LEN>()?.to_vec());
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, data_key.expose()).map_err(|_| CryptoError::Random)?,
        );
        Ok(Sealed {
            ciphertext: seal_with(&key, &binding.aad("value"), plaintext)?,
            wrapped_key: seal_with(
                &self.current.key,
                &binding.aad("data-key"),
                data_key.expose(),
            )?,
            master_key_id: self.current.id.clone(),
        })
    }

    pub fn open(
        &self,
        binding: Binding<'_>,
        sealed: &Sealed,
    ) -> Result<Secret<Vec<u8>>, CryptoError> {
        let master = self.key(&sealed.master_key_id)?;
        let data_key = open_with(&master.key, &binding.aad("data-key"), &sealed.wrapped_key)?;
        if data_key.expose().len() != KEY_LEN {
            return Err(CryptoError::Integrity);
        }
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, data_key.expose()).map_err(|_| CryptoError::Integrity)?,
        );
        open_with(&key, &binding.aad("value"), &sealed.ciphertext)
    }

    /// The data key re-wrapped under the current master key; the ciphertext is untouched.
    pub fn rewrap(&self, binding: Binding<'_>, sealed: &Sealed) -> Result<Sealed, CryptoError> {
        let master = self.key(&sealed.master_key_id)?;
        let data_key = open_with(&master.key, &binding.aad("data-key"), &sealed.wrapped_key)?;
        Ok(Sealed {
            ciphertext: sealed.ciphertext.clone(),
            wrapped_key: seal_with(
                &self.current.key,
                &binding.aad("data-key"),
                data_key.expose(),
            )?,
            master_key_id: self.current.id.clone(),
        })
    }

    /// Seals one of the vault's own keys (signing key, audit HMAC key) under the current key.
    pub fn seal_key(&self, name: &str, key: &[u8]) -> Result<(Vec<u8>, String), CryptoError> {
        let aad = key_aad(name);
        Ok((
            seal_with(&self.current.key, &aad, key)?,
            self.current.id.clone(),
        ))
    }

    pub fn open_key(
        &self,
        name: &str,
        sealed: &[u8],
        master_key_id: &str,
    ) -> Result<Secret<Vec<u8>>, CryptoError> {
        open_with(&self.key(master_key_id)?.key, &key_aad(name), sealed)
    }
}

fn key_aad(name: &str) -> Vec<u8> {
    format!("concierge sealed key v1\0{name}").into_bytes()
}

/// An HMAC-SHA256 key for audit records: tokens and ids are recorded as their HMAC.
#[derive(Clone)]
pub struct AuditHasher {
    key: ring::hmac::Key,
}

impl fmt::Debug for AuditHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditHasher")
    }
}

impl AuditHasher {
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        }
    }

    pub fn generate_key() -> Result<Secret<Vec<u8>>, CryptoError> {
        Ok(Secret::new(random_bytes::<KEY_LEN>()?.to_vec()))
    }

    /// An HMAC context for one audit chain link, under a label of its own so that a
    /// link can never pass for a token's hash.
    pub fn chain_context(&self) -> ring::hmac::Context {
        let mut context = ring::hmac::Context::with_key(&self.key);
        context.update(b"concierge audit chain v1\0");
        context
    }

    /// `hmac-sha256:<first 16 bytes, hex>`: stable for correlation, useless for replay.
    pub fn hash(&self, value: &str) -> String {
        let tag = ring::hmac::sign(&self.key, value.as_bytes());
        format!("hmac-sha256:{}", hex(&tag.as_ref()[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::new(MasterKey::generate().unwrap().0, vec![])
    }

    fn binding(id: &str) -> Binding<'_> {
        Binding {
            credential_id: id,
            version: 1,
            owner: "payments",
        }
    }

    #[test]
    fn sealed_values_open_only_under_their_binding() {
        let ring = keyring();
        let sealed = ring.seal(binding("a"), b"s3cret").unwrap();
        assert_eq!(
            ring.open(binding("a"), &sealed).unwrap().expose(),
            b"s3cret"
        );
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"s3cret"));
        for other in [
            Binding {
                credential_id: "b",
                ..binding("a")
            },
            Binding {
                version: 2,
                ..binding("a")
            },
            Binding {
                owner: "orders",
                ..binding("a")
            },
        ] {
            assert_eq!(
                ring.open(other, &sealed).err(),
                Some(CryptoError::Integrity)
            );
        }
    }

    #[test]
    fn short_or_flipped_ciphertexts_are_integrity_errors_not_panics() {
        let ring = keyring();
        let sealed = ring.seal(binding("a"), b"value").unwrap();
        for len in [0, 1, NONCE_LEN, NONCE_LEN + TAG_LEN - 1] {
            let short = Sealed {
                ciphertext: sealed.ciphertext[..len].to_vec(),
                ..sealed.clone()
            };
            assert_eq!(
                ring.open(binding("a"), &short).err(),
                Some(CryptoError::Integrity)
            );
            let short_key = Sealed {
                wrapped_key: sealed.wrapped_key[..len].to_vec(),
                ..sealed.clone()
            };
            assert_eq!(
                ring.open(binding("a"), &short_key).err(),
                Some(CryptoError::Integrity)
            );
        }
        let mut flipped = sealed.clone();
        flipped.ciphertext[NONCE_LEN] ^= 1;
        assert_eq!(
            ring.open(binding("a"), &flipped).err(),
            Some(CryptoError::Integrity)
        );
    }

    #[test]
    fn rewrapping_changes_the_key_not_the_ciphertext() {
        let (old_key, old_text) = MasterKey::generate().unwrap();
        let sealed = Keyring::new(old_key, vec![])
            .seal(binding("a"), b"value")
            .unwrap();
        let (new_key, new_text) = MasterKey::generate().unwrap();
        let during = Keyring::new(new_key, vec![MasterKey::from_base64(&old_text).unwrap()]);
        assert_eq!(
            during.open(binding("a"), &sealed).unwrap().expose(),
            b"value"
        );
        let rewrapped = during.rewrap(binding("a"), &sealed).unwrap();
        assert_eq!(rewrapped.ciphertext, sealed.ciphertext);
        assert_eq!(rewrapped.master_key_id, during.current_id());

        let after = Keyring::new(MasterKey::from_base64(&new_text).unwrap(), vec![]);
        assert_eq!(
            after.open(binding("a"), &sealed).err(),
            Some(CryptoError::UnknownMasterKey(sealed.master_key_id.clone()))
        );
        assert_eq!(
            after.open(binding("a"), &rewrapped).unwrap().expose(),
            b"value"
        );
    }

    #[test]
    fn master_keys_are_validated_and_never_printed() {
        assert_eq!(
            MasterKey::from_base64(&Secret::new("bm9wZQ==".into())).unwrap_err(),
            CryptoError::BadMasterKey
        );
        assert_eq!(
            MasterKey::from_base64(&Secret::new("%%%".into())).unwrap_err(),
            CryptoError::BadMasterKey
        );
        let (key, text) = MasterKey::generate().unwrap();
        let again = MasterKey::from_base64(&Secret::new(format!("  {}\n", text.expose()))).unwrap();
        assert_eq!(key.id(), again.id());
        assert!(!format!("{key:?}").contains(text.expose()));
    }

    #[test]
    fn audit_hashes_are_stable_and_keyed() {
        let a = AuditHasher::new(b"key-a");
        let b = AuditHasher::new(b"key-b");
        assert_eq!(a.hash("tok-1"), a.hash("tok-1"));
        assert_ne!(a.hash("tok-1"), b.hash("tok-1"));
        assert!(!a.hash("tok-1").contains("tok-1"));
    }
}
