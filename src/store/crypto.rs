//! Encryption at rest: AES-256-GCM with a fresh random 96-bit nonce per write. A sealed value is
//! `nonce || ciphertext || tag`; the id of the key that sealed it is stored beside it.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, Key, KeyInit, Nonce};
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use uuid::Uuid;

use crate::keys::StoreKeys;

const NONCE_LEN: usize = 12;
const CHECK_PLAINTEXT: &[u8] = b"appconn store key check v1";

/// Why a sealed value could not be opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// The installation keys hold no key with this id.
    UnknownKey,
    /// Wrong key, or the value was altered.
    Failed,
}

/// The ciphers of every known store key.
pub(crate) struct Vault {
    ciphers: Vec<(String, Aes256Gcm)>,
    active: usize,
}

impl Vault {
    pub(crate) fn new(keys: &StoreKeys) -> Self {
        let ciphers: Vec<_> = keys
            .ids()
            .map(|id| {
                let key = keys.key(id).expect("ids() lists existing keys");
                (
                    id.to_string(),
                    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
                )
            })
            .collect();
        let active = ciphers
            .iter()
            .position(|(id, _)| id == keys.active_id())
            .expect("the active key is one of the keys");
        Self { ciphers, active }
    }

    pub(crate) fn active_id(&self) -> &str {
        &self.ciphers[self.active].0
    }

    /// Seals `plaintext` with the active key, bound to `context`.
    pub(crate) fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self.ciphers[self.active]
            .1
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("AES-GCM encrypts any message below 64 GiB");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value sealed with `key_id` for `context`.
    pub(crate) fn open(
        &self,
        key_id: &str,
        sealed: &[u8],
        context: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let (_, cipher) = self
            .ciphers
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or(OpenError::UnknownKey)?;
        if sealed.len() < NONCE_LEN {
            return Err(OpenError::Failed);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError::Failed)
    }

    /// The check value stored per key id, sealed with the active key (which must be `key_id`).
    pub(crate) fn active_key_check(&self) -> Vec<u8> {
        self.seal(CHECK_PLAINTEXT, &check_context(self.active_id()))
    }

    /// Whether `key_id`'s key is the one that sealed `check`.
    pub(crate) fn verify_key_check(&self, key_id: &str, check: &[u8]) -> Result<(), OpenError> {
        let opened = self.open(key_id, check, &check_context(key_id))?;
        if opened.as_slice() == CHECK_PLAINTEXT {
            Ok(())
        } else {
            Err(OpenError::Failed)
        }
    }
}

/// Binds a record's credentials to its id, so ciphertexts cannot be swapped between rows.
pub(crate) fn record_context(id: Uuid) -> Vec<u8> {
    format!("appconn/record/{id}").into_bytes()
}

fn check_context(key_id: &str) -> Vec<u8> {
    format!("appconn/key-check/{key_id}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_with_fresh_nonces() {
        let vault = Vault::new(&StoreKeys::generate());
        let ctx = record_context(Uuid::nil());
        let a = vault.seal(b"zebra-canary-7781", &ctx);
        let b = vault.seal(b"zebra-canary-7781", &ctx);
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
        assert!(!a.windows(5).any(|w| w == b"zebra"));
        assert_eq!(
            vault.open("k1", &a, &ctx).unwrap().as_slice(),
            b"zebra-canary-7781"
        );
    }

    #[test]
    fn open_fails_on_wrong_key_context_tampering_and_unknown_id() {
        let vault = Vault::new(&StoreKeys::generate());
        let other = Vault::new(&StoreKeys::generate());
        let ctx = record_context(Uuid::nil());
        let sealed = vault.seal(b"secret", &ctx);
        assert_eq!(other.open("k1", &sealed, &ctx), Err(OpenError::Failed));
        assert_eq!(
            vault.open("k1", &sealed, &record_context(Uuid::max())),
            Err(OpenError::Failed)
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(vault.open("k1", &flipped, &ctx), Err(OpenError::Failed));
        assert_eq!(vault.open("k1", &sealed[..5], &ctx), Err(OpenError::Failed));
        assert_eq!(vault.open("k9", &sealed, &ctx), Err(OpenError::UnknownKey));
    }

    #[test]
    fn key_check_tells_the_right_key_from_a_wrong_one() {
        let mut keys = StoreKeys::generate();
        let vault = Vault::new(&keys);
        let check = vault.active_key_check();
        assert_eq!(vault.verify_key_check("k1", &check), Ok(()));
        assert_eq!(
            Vault::new(&StoreKeys::generate()).verify_key_check("k1", &check),
            Err(OpenError::Failed)
        );
        keys.add_key();
        let rotated = Vault::new(&keys);
        assert_eq!(rotated.active_id(), "k2");
        assert_eq!(rotated.verify_key_check("k1", &check), Ok(()));
        // A check sealed for k1 does not pass as k2's.
        assert_eq!(
            rotated.verify_key_check("k2", &check),
            Err(OpenError::Failed)
        );
    }
}
