//! Installation keys: the key of the credentials hash and the store encryption keys.
//!
//! One JSON document holds them all, in a file or in a Kubernetes Secret (key [`SECRET_KEY`]):
//! `{"hashKey":"<base64>","storeKeys":[{"id":"k1","key":"<base64>"}],"activeStoreKey":"k1"}`.
//! Every key is 32 random bytes. Key material never appears in `Debug` output or in an error:
//! errors name a field or a key id, never a value.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::zeroize::{Zeroize, Zeroizing};
use secrecy::{ExposeSecret, SecretBox};
use serde_json::Value;
use sha2::Sha256;

/// Key of the installation-keys document in the controller's Secret.
pub const SECRET_KEY: &str = "keys.json";

/// Prefix of every credentials hash; names the algorithm so it can change later.
pub const HASH_PREFIX: &str = "hmac-sha256:";

const KEY_LEN: usize = 32;
const MAX_ID_LEN: usize = 32;

/// A failure to read, write or parse installation keys. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot write key file {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("invalid installation keys: {0}")]
    Invalid(String),
}

/// 32 bytes of key material, wiped on drop, never printed.
struct KeyBytes(SecretBox<[u8; KEY_LEN]>);

impl KeyBytes {
    fn random() -> Self {
        Self(SecretBox::init_with_mut(|bytes: &mut [u8; KEY_LEN]| {
            rand::rng().fill_bytes(bytes)
        }))
    }

    fn from_array(mut bytes: [u8; KEY_LEN]) -> Self {
        let key = Self(SecretBox::init_with_mut(|b: &mut [u8; KEY_LEN]| *b = bytes));
        bytes.zeroize();
        key
    }

    /// Decodes standard base64 of exactly 32 bytes; `what` names the field for the error.
    fn from_base64(encoded: &str, what: &str) -> Result<Self, KeyError> {
        let decoded = Zeroizing::new(
            BASE64
                .decode(encoded.trim())
                .map_err(|_| KeyError::Invalid(format!("{what} is not valid base64")))?,
        );
        if decoded.len() != KEY_LEN {
            return Err(KeyError::Invalid(format!(
                "{what} must be {KEY_LEN} bytes, got {}",
                decoded.len()
            )));
        }
        Ok(Self(SecretBox::init_with_mut(|b: &mut [u8; KEY_LEN]| {
            b.copy_from_slice(&decoded)
        })))
    }

    fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(self.expose()))
    }
}

impl Clone for KeyBytes {
    fn clone(&self) -> Self {
        Self(SecretBox::init_with_mut(|b: &mut [u8; KEY_LEN]| {
            b.copy_from_slice(self.expose())
        }))
    }
}

/// The key of the operator's credentials hash (HMAC-SHA256).
#[derive(Clone)]
pub struct HashKey(KeyBytes);

impl HashKey {
    pub fn generate() -> Self {
        Self(KeyBytes::random())
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(KeyBytes::from_array(bytes))
    }

    /// `hmac-sha256:<lowercase hex>` of `canonical`.
    pub fn hash(&self, canonical: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.expose())
            .expect("HMAC takes a key of any length");
        mac.update(canonical);
        format!("{HASH_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey([REDACTED])")
    }
}

#[derive(Clone)]
struct StoreKey {
    id: String,
    key: KeyBytes,
}

/// The store encryption keys (AES-256-GCM): one active key for writes, older ones kept so
/// rows written with them stay readable.
#[derive(Clone)]
pub struct StoreKeys {
    keys: Vec<StoreKey>,
    active: usize,
}

impl StoreKeys {
    /// One fresh key, `k1`, active.
    pub fn generate() -> Self {
        Self {
            keys: vec![StoreKey {
                id: "k1".into(),
                key: KeyBytes::random(),
            }],
            active: 0,
        }
    }

    /// Id of the key new writes use.
    pub fn active_id(&self) -> &str {
        &self.keys[self.active].id
    }

    /// All key ids, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Adds a fresh key and makes it active; returns its id (`k<n+1>` after the highest `k<n>`).
    pub fn add_key(&mut self) -> &str {
        let highest = self
            .keys
            .iter()
            .filter_map(|k| k.id.strip_prefix('k')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let mut n = highest + 1;
        while self.contains(&format!("k{n}")) {
            n += 1;
        }
        self.keys.push(StoreKey {
            id: format!("k{n}"),
            key: KeyBytes::random(),
        });
        self.active = self.keys.len() - 1;
        self.active_id()
    }

    /// Whether `other` holds the same keys, with the same material, and the same active one.
    pub fn same_as(&self, other: &StoreKeys) -> bool {
        self.active_id() == other.active_id()
            && self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .all(|k| other.key(&k.id) == Some(k.key.expose()))
    }

    /// The same keys with `id` active, if it is one of them.
    pub fn with_active(&self, id: &str) -> Option<StoreKeys> {
        let active = self.keys.iter().position(|k| k.id == id)?;
        Some(StoreKeys {
            keys: self.keys.clone(),
            active,
        })
    }

    /// Drops the key `id`; refused for the active key. Returns whether it was there.
    pub fn remove_key(&mut self, id: &str) -> Result<bool, KeyError> {
        if self.active_id() == id {
            return Err(KeyError::Invalid(format!(
                "key {id} is the current key: rotate to a new key first"
            )));
        }
        let Some(i) = self.keys.iter().position(|k| k.id == id) else {
            return Ok(false);
        };
        let active = self.active_id().to_string();
        self.keys.remove(i);
        self.active = self
            .keys
            .iter()
            .position(|k| k.id == active)
            .expect("the active key was not removed");
        Ok(true)
    }

    /// The key material of `id`, for the store's cipher only.
    pub(crate) fn key(&self, id: &str) -> Option<&[u8; KEY_LEN]> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .map(|k| k.key.expose())
    }
}

impl fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreKeys")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .field("active", &self.active_id())
            .finish_non_exhaustive()
    }
}

/// All keys of one installation.
#[derive(Clone, Debug)]
pub struct InstallationKeys {
    pub hash_key: HashKey,
    pub store_keys: StoreKeys,
}

impl InstallationKeys {
    pub fn generate() -> Self {
        Self {
            hash_key: HashKey::generate(),
            store_keys: StoreKeys::generate(),
        }
    }

    /// Rotates the store key: a fresh active key, the old ones kept for reading. Returns its id.
    pub fn add_store_key(&mut self) -> &str {
        self.store_keys.add_key()
    }

    /// Parses the JSON document. Errors name the field at fault, never a value.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeyError> {
        // serde_json's type errors quote the offending value, so only its position is reported.
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| {
            KeyError::Invalid(format!(
                "not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let Value::Object(doc) = doc else {
            return Err(KeyError::Invalid("expected a JSON object".into()));
        };
        let string = |v: Option<&Value>, what: &str| -> Result<String, KeyError> {
            match v {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(KeyError::Invalid(format!("{what} must be a string"))),
                None => Err(KeyError::Invalid(format!("{what} is missing"))),
            }
        };
        let hash_key = HashKey(KeyBytes::from_base64(
            &Zeroizing::new(string(doc.get("hashKey"), "hashKey")?),
            "hashKey",
        )?);
        let Some(Value::Array(entries)) = doc.get("storeKeys") else {
            return Err(KeyError::Invalid("storeKeys must be a list".into()));
        };
        if entries.is_empty() {
            return Err(KeyError::Invalid(
                "storeKeys must hold at least one key".into(),
            ));
        }
        let mut keys: Vec<StoreKey> = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let what = format!("storeKeys[{i}]");
            let id = string(entry.get("id"), &format!("{what}.id"))?;
            check_id(&id, &format!("{what}.id"))?;
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyError::Invalid(format!(
                    "store key id {id} appears twice"
                )));
            }
            let encoded = Zeroizing::new(string(entry.get("key"), &format!("{what}.key"))?);
            let key = KeyBytes::from_base64(&encoded, &format!("{what}.key"))?;
            keys.push(StoreKey { id, key });
        }
        let active_id = string(doc.get("activeStoreKey"), "activeStoreKey")?;
        let active = keys.iter().position(|k| k.id == active_id).ok_or_else(|| {
            KeyError::Invalid(format!(
                "activeStoreKey names {active_id:?}, which is not in storeKeys"
            ))
        })?;
        Ok(Self {
            hash_key,
            store_keys: StoreKeys { keys, active },
        })
    }

    /// The JSON document, built without intermediate copies of the key material.
    pub fn to_json(&self) -> SecretBox<Vec<u8>> {
        // Ids are checked to be `[A-Za-z0-9._-]` and base64 needs no escaping either.
        let mut out = Zeroizing::new(String::with_capacity(128 + 80 * self.store_keys.keys.len()));
        out.push_str("{\"hashKey\":\"");
        out.push_str(&self.hash_key.0.to_base64());
        out.push_str("\",\"storeKeys\":[");
        for (i, k) in self.store_keys.keys.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"id\":\"");
            out.push_str(&k.id);
            out.push_str("\",\"key\":\"");
            out.push_str(&k.key.to_base64());
            out.push_str("\"}");
        }
        out.push_str("],\"activeStoreKey\":\"");
        out.push_str(self.store_keys.active_id());
        out.push_str("\"}");
        SecretBox::new(Box::new(out.as_bytes().to_vec()))
    }

    /// Reads the key file, or creates it with fresh keys (mode 0600) when it does not exist.
    /// Creation is atomic and never replaces a file another process created meanwhile.
    pub fn load_or_create_file(path: &Path) -> Result<Self, KeyError> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let keys = Self::generate();
                match write_file(path, &keys.to_json(), false) {
                    Ok(()) => Ok(keys),
                    // Lost a race with another process: its keys win.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::read_file(path),
                    Err(e) => Err(KeyError::Write {
                        path: path.into(),
                        reason: describe_io(&e),
                    }),
                }
            }
            _ => Self::read_file(path),
        }
    }

    /// Reads and parses an existing key file.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|e| KeyError::Read {
            path: path.into(),
            reason: describe_io(&e),
        })?);
        Self::from_json(&bytes).map_err(|e| match e {
            KeyError::Invalid(msg) => KeyError::Invalid(format!("{msg} (in {})", path.display())),
            other => other,
        })
    }

    /// Writes the key file atomically (mode 0600), replacing it: used after [`Self::add_store_key`].
    pub fn save_file(&self, path: &Path) -> Result<(), KeyError> {
        write_file(path, &self.to_json(), true).map_err(|e| KeyError::Write {
            path: path.into(),
            reason: describe_io(&e),
        })
    }
}

fn check_id(id: &str, what: &str) -> Result<(), KeyError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "{what} must be 1 to {MAX_ID_LEN} characters from A-Z, a-z, 0-9, '.', '_' and '-'"
        )))
    }
}

/// Writes `contents` to a temporary file beside `path` (0600), then moves it into place:
/// `replace` renames over any existing file, otherwise a hard link refuses an existing one.
fn write_file(path: &Path, contents: &SecretBox<Vec<u8>>, replace: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut suffix = [0u8; 6];
    rand::rng().fill_bytes(&mut suffix);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(contents.expose_secret())?;
        file.sync_all()?;
        if replace {
            fs::rename(&tmp, path)
        } else {
            fs::hard_link(&tmp, path)
        }
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    // Make the new directory entry durable; not every platform can open a directory.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A one-line, lowercase description of an I/O failure ("permission denied").
pub(crate) fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::Other => e.to_string(),
        kind => kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY_KEY: [u8; 32] = *b"zebra-canary-7781zebra-canary-77";

    #[test]
    fn hmac_known_answer() {
        // Cross-checked with Python's hmac and `openssl dgst -mac HMAC`.
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            HashKey::from_bytes(key).hash(br#"{"app":"mssql"}"#),
            "hmac-sha256:c0f7dc2b72ed1fe4e8058dd31174807160d3da31b44f43d58b5e2f39dcf8dd7c"
        );
        assert_eq!(
            HashKey::from_bytes([0x0b; 32]).hash(b"Hi There"),
            "hmac-sha256:198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn hash_depends_on_key_and_input() {
        let a = HashKey::generate();
        let b = HashKey::generate();
        assert_eq!(a.hash(b"x"), a.clone().hash(b"x"));
        assert_ne!(a.hash(b"x"), b.hash(b"x"));
        assert_ne!(a.hash(b"x"), a.hash(b"y"));
    }

    #[test]
    fn json_round_trip_keeps_every_key() {
        let mut keys = InstallationKeys::generate();
        assert_eq!(keys.add_store_key(), "k2");
        let json = keys.to_json();
        let doc: Value = serde_json::from_slice(json.expose_secret()).unwrap();
        assert_eq!(doc["activeStoreKey"], "k2");
        assert_eq!(doc["storeKeys"][0]["id"], "k1");
        assert_eq!(
            BASE64
                .decode(doc["hashKey"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );

        let back = InstallationKeys::from_json(json.expose_secret()).unwrap();
        assert_eq!(back.hash_key.hash(b"x"), keys.hash_key.hash(b"x"));
        assert_eq!(back.store_keys.ids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert_eq!(back.store_keys.active_id(), "k2");
        for id in ["k1", "k2"] {
            assert_eq!(back.store_keys.key(id), keys.store_keys.key(id));
        }
        assert_ne!(keys.store_keys.key("k1"), keys.store_keys.key("k2"));
    }

    #[test]
    fn keys_compare_by_material_and_the_active_key_stays() {
        let mut keys = StoreKeys::generate();
        assert!(keys.same_as(&keys.clone()));
        assert!(
            !keys.same_as(&StoreKeys::generate()),
            "same ids, other material"
        );
        let before = keys.clone();
        keys.add_key();
        assert!(!keys.same_as(&before));
        let staged = keys.with_active("k1").unwrap();
        assert_eq!(staged.active_id(), "k1");
        assert_eq!(staged.ids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert!(keys.with_active("k9").is_none());
        assert!(keys.remove_key("k2").is_err(), "the active key stays");
        assert!(keys.remove_key("k1").unwrap());
        assert!(!keys.remove_key("k1").unwrap());
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["k2"]);
        assert_eq!(keys.active_id(), "k2");
    }

    #[test]
    fn add_key_picks_the_next_free_id() {
        let mut keys = StoreKeys::generate();
        assert_eq!(keys.add_key(), "k2");
        assert_eq!(keys.add_key(), "k3");
        assert_eq!(keys.ids().collect::<Vec<_>>(), ["k1", "k2", "k3"]);
        assert_eq!(keys.active_id(), "k3");
    }

    fn doc(hash: &str, keys: &str, active: &str) -> String {
        format!(r#"{{"hashKey":{hash},"storeKeys":{keys},"activeStoreKey":{active}}}"#)
    }

    #[test]
    fn invalid_documents_name_the_field_and_never_the_value() {
        let good = format!("\"{}\"", BASE64.encode(CANARY_KEY));
        let short = format!("\"{}\"", BASE64.encode(&CANARY_KEY[..16]));
        let entry = |id: &str, key: &str| format!(r#"{{"id":"{id}","key":{key}}}"#);
        let cases = [
            ("{not json".to_string(), "not valid JSON"),
            ("[]".to_string(), "expected a JSON object"),
            (
                doc("\"zebra-canary-7781!\"", "[]", "\"k1\""),
                "hashKey is not valid base64",
            ),
            (
                doc(&short, "[]", "\"k1\""),
                "hashKey must be 32 bytes, got 16",
            ),
            (doc("17781", "[]", "\"k1\""), "hashKey must be a string"),
            (
                doc(&good, "[]", "\"k1\""),
                "storeKeys must hold at least one key",
            ),
            (doc(&good, "{}", "\"k1\""), "storeKeys must be a list"),
            (
                doc(&good, &format!("[{}]", entry("k1", &short)), "\"k1\""),
                "storeKeys[0].key must be 32 bytes",
            ),
            (
                doc(&good, &format!("[{}]", entry("k 1", &good)), "\"k1\""),
                "storeKeys[0].id must be 1 to 32 characters",
            ),
            (
                doc(
                    &good,
                    &format!("[{},{}]", entry("k1", &good), entry("k1", &good)),
                    "\"k1\"",
                ),
                "store key id k1 appears twice",
            ),
            (
                doc(&good, &format!("[{}]", entry("k1", &good)), "\"k2\""),
                "activeStoreKey names \"k2\", which is not in storeKeys",
            ),
            (r#"{"storeKeys":[]}"#.to_string(), "hashKey is missing"),
        ];
        for (input, expected) in cases {
            let err = InstallationKeys::from_json(input.as_bytes()).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(shown.contains(expected), "{input}: {shown}");
            assert!(!shown.contains("zebra"), "{shown}");
            assert!(!shown.contains(&good[1..20]), "{shown}");
        }
        let ok = doc(&good, &format!("[{}]", entry("k1", &good)), "\"k1\"");
        assert!(InstallationKeys::from_json(ok.as_bytes()).is_ok());
    }

    #[test]
    fn debug_shows_no_key_material() {
        let json = doc(
            &format!("\"{}\"", BASE64.encode(CANARY_KEY)),
            &format!(r#"[{{"id":"k1","key":"{}"}}]"#, BASE64.encode(CANARY_KEY)),
            "\"k1\"",
        );
        let keys = InstallationKeys::from_json(json.as_bytes()).unwrap();
        let shown = format!("{keys:?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(!shown.contains("zebra"), "{shown}");
        assert!(!shown.contains(&BASE64.encode(CANARY_KEY)[..20]), "{shown}");
        assert!(
            !shown.contains(&format!("{:?}", &CANARY_KEY[..4])),
            "{shown}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_created_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let created = InstallationKeys::load_or_create_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let loaded = InstallationKeys::load_or_create_file(&path).unwrap();
        assert_eq!(loaded.hash_key.hash(b"x"), created.hash_key.hash(b"x"));
        assert_eq!(loaded.store_keys.key("k1"), created.store_keys.key("k1"));
        // Only the key file is left behind, no temporary file.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn saved_rotation_is_read_back_and_stays_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let mut keys = InstallationKeys::load_or_create_file(&path).unwrap();
        keys.add_store_key();
        keys.save_file(&path).unwrap();
        let loaded = InstallationKeys::read_file(&path).unwrap();
        assert_eq!(loaded.store_keys.active_id(), "k2");
        assert_eq!(loaded.store_keys.key("k1"), keys.store_keys.key("k1"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }

    #[test]
    fn unusable_key_files_give_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        fs::write(&file, b"{}").unwrap();
        let err = InstallationKeys::load_or_create_file(&file.join("keys.json")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read key file"), "{err}");
        assert!(err.to_string().ends_with("not a directory"), "{err}");

        let err = InstallationKeys::load_or_create_file(&dir.path().join("no/such/keys.json"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot write key file {}: no such file or directory",
                dir.path().join("no/such/keys.json").display()
            )
        );

        let err = InstallationKeys::load_or_create_file(&file).unwrap_err();
        assert!(err.to_string().contains("hashKey is missing"), "{err}");
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }
}
