//! `appconn keys rotate | status | remove` and `appconn store backup`: the store's keys and
//! copies, against the key file or the key Secret a running operator reads.

use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use secrecy::ExposeSecret;

use super::CliError;
use crate::keys::{InstallationKeys, SECRET_KEY};
use crate::kube_error::describe;
use crate::store::{SqlStore, StoreLocation};

/// Records moved per batch when `keys rotate` re-encrypts a store itself.
pub const DEFAULT_BATCH: usize = 500;

/// Where the installation keys are kept.
#[derive(Clone, Debug)]
pub enum KeyTarget {
    File(PathBuf),
    /// The Secret the operator reads (key `keys.json`).
    Secret {
        kubeconfig: Option<PathBuf>,
        namespace: Option<String>,
        name: String,
    },
}

/// The keys, and the store they encrypt when one is named.
#[derive(Clone, Debug)]
pub struct KeysOptions {
    pub keys: KeyTarget,
    pub store: Option<StoreLocation>,
}

/// Installation keys as read, and how to write them back.
struct Loaded {
    keys: InstallationKeys,
    /// `key file PATH` or `Secret NAMESPACE/NAME`.
    what: String,
    /// The Secret as read, for an update that fails if it changed meanwhile.
    secret: Option<(Api<Secret>, Secret)>,
}

impl KeyTarget {
    async fn load(&self) -> Result<Loaded, CliError> {
        match self {
            KeyTarget::File(path) => Ok(Loaded {
                keys: InstallationKeys::read_file(path)
                    .map_err(|e| CliError::Keys(e.to_string()))?,
                what: format!("key file {}", path.display()),
                secret: None,
            }),
            KeyTarget::Secret {
                kubeconfig,
                namespace,
                name,
            } => {
                let (client, default_namespace) = kube_client(kubeconfig.as_deref()).await?;
                let namespace = namespace.clone().unwrap_or(default_namespace);
                let what = format!("Secret {namespace}/{name}");
                let api: Api<Secret> = Api::namespaced(client, &namespace);
                let secret = api
                    .get_opt(name)
                    .await
                    .map_err(|e| CliError::Keys(format!("{what}: {}", describe(&e))))?
                    .ok_or_else(|| {
                        CliError::Keys(format!(
                            "{what} does not exist: the operator creates it on its first start"
                        ))
                    })?;
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(SECRET_KEY))
                    .ok_or_else(|| CliError::Keys(format!("{what} has no key {SECRET_KEY:?}")))?;
                let keys = InstallationKeys::from_json(&bytes.0)
                    .map_err(|e| CliError::Keys(format!("{what}: {e}")))?;
                Ok(Loaded {
                    keys,
                    what,
                    secret: Some((api, secret)),
                })
            }
        }
    }
}

impl Loaded {
    /// Writes the keys back: the file atomically, the Secret only if nobody changed it since
    /// it was read (a conflict asks to run the command again).
    async fn save(self, target: &KeyTarget) -> Result<InstallationKeys, CliError> {
        match (target, self.secret) {
            (KeyTarget::File(path), _) => {
                self.keys
                    .save_file(path)
                    .map_err(|e| CliError::Keys(e.to_string()))?;
            }
            (KeyTarget::Secret { .. }, Some((api, mut secret))) => {
                let name = secret.metadata.name.clone().unwrap_or_default();
                let what = format!(
                    "Secret {}/{name}",
                    secret.metadata.namespace.clone().unwrap_or_default()
                );
                secret.data.get_or_insert_with(Default::default).insert(
                    SECRET_KEY.to_string(),
                    ByteString(self.keys.to_json().expose_secret().clone()),
                );
                // Only data changes; the resourceVersion read makes this a compare-and-swap.
                secret.string_data = None;
                match api.replace(&name, &PostParams::default(), &secret).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        return Err(CliError::Keys(format!(
                            "{what} changed while this command ran: run it again"
                        )));
                    }
                    Err(e) => return Err(CliError::Keys(format!("{what}: {}", describe(&e)))),
                }
            }
            (KeyTarget::Secret { .. }, None) => unreachable!("a Secret target loads its Secret"),
        }
        Ok(self.keys)
    }
}

/// What `keys rotate` did.
pub struct Rotated {
    pub new_key: String,
    pub previous: String,
    pub target: String,
    /// Records re-encrypted here, when a store was named.
    pub reencrypted: Option<u64>,
}

/// Adds a fresh store key and makes it current, then, when a store is named, re-encrypts its
/// records `batch` at a time. Without one, the running operator re-encrypts once it reads the
/// changed keys. The keys are saved first: a crash afterwards leaves records on either key,
/// both kept.
pub async fn rotate(opts: &KeysOptions, batch: usize) -> Result<Rotated, CliError> {
    let mut loaded = opts.keys.load().await?;
    let previous = loaded.keys.store_keys.active_id().to_string();
    let new_key = loaded.keys.add_store_key().to_string();
    let target = loaded.what.clone();
    let keys = loaded.save(&opts.keys).await?;
    let reencrypted = match &opts.store {
        None => None,
        Some(location) => {
            let store = open(location, &keys).await?;
            let mut moved = 0;
            loop {
                let n = store
                    .reencrypt_batch(batch.max(1))
                    .await
                    .map_err(|e| CliError::Store(e.to_string()))?;
                if n == 0 {
                    break;
                }
                moved += n;
            }
            store.close().await;
            Some(moved)
        }
    };
    Ok(Rotated {
        new_key,
        previous,
        target,
        reencrypted,
    })
}

/// One line of `keys status`.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyStatus {
    pub id: String,
    /// `current`, `old`, or `forgotten` (known to the store, gone from the keys).
    pub state: &'static str,
    /// Records the key encrypts; `None` without a store.
    pub records: Option<u64>,
}

/// Every store key, whether it is current, and how many records it still encrypts.
pub async fn status(opts: &KeysOptions) -> Result<Vec<KeyStatus>, CliError> {
    let keys = opts.keys.load().await?.keys;
    let store_keys = &keys.store_keys;
    let usage = match &opts.store {
        Some(location) => {
            let store = open(location, &keys).await?;
            let usage = store
                .key_usage()
                .await
                .map_err(|e| CliError::Store(e.to_string()))?;
            store.close().await;
            Some(usage)
        }
        None => None,
    };
    let mut ids: Vec<String> = store_keys.ids().map(str::to_string).collect();
    for u in usage.iter().flatten() {
        if !ids.contains(&u.key_id) {
            ids.push(u.key_id.clone());
        }
    }
    Ok(ids
        .into_iter()
        .map(|id| KeyStatus {
            state: if id == store_keys.active_id() {
                "current"
            } else if store_keys.contains(&id) {
                "old"
            } else {
                "forgotten"
            },
            records: usage
                .as_ref()
                .map(|u| u.iter().find(|u| u.key_id == id).map_or(0, |u| u.records)),
            id,
        })
        .collect())
}

/// Removes an old key from the keys, once the store shows no record uses it.
pub async fn remove(opts: &KeysOptions, id: &str) -> Result<(), CliError> {
    let location = opts.store.as_ref().ok_or_else(|| {
        CliError::Store("name the store (--store) whose records must no longer need the key".into())
    })?;
    let mut loaded = opts.keys.load().await?;
    if !loaded.keys.store_keys.contains(id) {
        return Err(CliError::Keys(format!(
            "{} holds no key {id:?}",
            loaded.what
        )));
    }
    let store = open(location, &loaded.keys).await?;
    let forgotten = store.forget_key(id).await;
    store.close().await;
    forgotten.map_err(|e| CliError::Store(e.to_string()))?;
    loaded
        .keys
        .store_keys
        .remove_key(id)
        .map_err(|e| CliError::Keys(e.to_string()))?;
    loaded.save(&opts.keys).await?;
    Ok(())
}

/// `appconn store backup FILE`: a consistent copy of a SQLite store, taken while the operator
/// keeps writing.
pub async fn backup(opts: &KeysOptions, dest: &Path) -> Result<(), CliError> {
    let location = opts
        .store
        .as_ref()
        .ok_or_else(|| CliError::Store("name the store to copy (--store)".into()))?;
    let keys = opts.keys.load().await?.keys;
    let store = open(location, &keys).await?;
    let copied = store.backup(dest).await;
    store.close().await;
    copied.map_err(|e| CliError::Store(e.to_string()))
}

async fn open(location: &StoreLocation, keys: &InstallationKeys) -> Result<SqlStore, CliError> {
    SqlStore::open_location(location, &keys.store_keys)
        .await
        .map_err(|e| CliError::Store(e.to_string()))
}

/// A client from `kubeconfig`, or the usual places (KUBECONFIG, ~/.kube/config, in-cluster),
/// and the namespace its context names.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<(Client, String), CliError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                CliError::Kube(format!("cannot read kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| CliError::Kube(format!("invalid kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            CliError::Kube(format!(
                "no Kubernetes configuration: set --kubeconfig or KUBECONFIG, or run in a cluster ({e})"
            ))
        })?,
    };
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config)
        .map_err(|e| CliError::Kube(format!("cannot build a client: {e}")))?;
    Ok((client, namespace))
}
