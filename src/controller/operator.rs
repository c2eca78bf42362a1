//! `appconn run`: keys, store, admin server, leader election and the controllers, in order.
//!
//! Every replica serves the store read API and re-reads the installation keys and the API's
//! certificate as they change. Only the leader (or the one replica, without leader election)
//! runs the controllers and moves records to a rotated key; a standby writes nothing.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use secrecy::ExposeSecret;
use tracing::info;

use super::leader::{LeaderElector, LeaseConfig};
use super::run::{ControllerConfig, run_controllers};
use crate::backend::builtin::BuiltinBackend;
use crate::http::{AdminState, Readiness};
use crate::keys::{InstallationKeys, SECRET_KEY, StoreKeys};
use crate::kube_error::describe;
use crate::metrics::Metrics;
use crate::store::api::StoreApiState;
use crate::store::tls::{CertReloader, TlsFiles};
use crate::store::{SqlStore, StoreEngine, StoreLocation};

/// Everything `appconn run` is told.
pub struct OperatorOptions {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    pub operator_namespace: String,
    pub concurrency: u16,
    pub store: StoreLocation,
    /// The Secret (in the operator namespace) holding the installation keys.
    pub key_secret: String,
    /// A key file instead of the Secret.
    pub key_file: Option<PathBuf>,
    /// The admin server's listener, already bound.
    pub admin: tokio::net::TcpListener,
    /// The store read API's listener, already bound.
    pub store_api: tokio::net::TcpListener,
    /// HTTPS for the read API; `None` serves plain HTTP, which the command line only allows
    /// when asked for by name.
    pub store_api_tls: Option<TlsFiles>,
    pub maintenance: Maintenance,
    pub leader_elect: bool,
    pub lease: LeaseConfig,
    pub default_refresh: Duration,
}

/// The background work of a running store: re-reading keys and certificate, re-encryption.
#[derive(Clone, Debug)]
pub struct Maintenance {
    /// How often the installation keys and the read API's certificate are read again.
    pub reload_every: Duration,
    /// Records moved to the current key per batch.
    pub reencrypt_batch: usize,
    /// Pause between two batches, so re-encryption never crowds out reconciles.
    pub reencrypt_pause: Duration,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self {
            reload_every: Duration::from_secs(10),
            reencrypt_batch: 100,
            reencrypt_pause: Duration::from_millis(100),
        }
    }
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("installation keys: {0}")]
    Keys(String),
    #[error("{0}")]
    Store(String),
    /// The operator namespace, where the key Secret and the Lease live, does not exist.
    #[error(
        "namespace {0:?} does not exist: create it, or pass --operator-namespace (POD_NAMESPACE) \
         naming the namespace of the operator's key Secret and leader Lease"
    )]
    NoNamespace(String),
    #[error("leader election Lease {name:?} in namespace {namespace:?}: {reason}")]
    Lease {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Runs until `shutdown` resolves.
pub async fn run(
    client: Client,
    opts: OperatorOptions,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), OperatorError> {
    let shutdown = shutdown.shared();
    if opts.leader_elect {
        check_lease_namespace(&client, &opts.lease).await?;
    }
    let key_source = match &opts.key_file {
        Some(path) => KeySource::File(path.clone()),
        None => KeySource::Secret {
            client: client.clone(),
            namespace: opts.operator_namespace.clone(),
            name: opts.key_secret.clone(),
        },
    };
    let keys = match &key_source {
        KeySource::File(path) => InstallationKeys::load_or_create_file(path)
            .map_err(|e| OperatorError::Keys(e.to_string()))?,
        KeySource::Secret {
            client,
            namespace,
            name,
        } => keys_from_secret(client, namespace, name).await?,
    };
    let store = SqlStore::open_location(&opts.store, &keys.store_keys)
        .await
        .map_err(|e| OperatorError::Store(e.to_string()))?;
    info!(store = %opts.store, active_key = %store.active_key(), "store opened");
    let store = Arc::new(store);
    let keys_changed = Arc::new(tokio::sync::Notify::new());
    let key_reload = tokio::spawn(reload_keys(
        key_source,
        store.clone(),
        keys.store_keys.clone(),
        opts.maintenance.reload_every,
        keys_changed.clone(),
        shutdown.clone(),
    ));
    let engine: Arc<dyn StoreEngine> = store.clone();
    let metrics = Arc::new(Metrics::default());
    let builtin = Arc::new(BuiltinBackend::new(engine.clone()).with_metrics(metrics.clone()));
    let api_state = StoreApiState {
        store: engine,
        client: client.clone(),
    };
    let store_api = match opts.store_api_tls.clone() {
        Some(files) => {
            let certs = CertReloader::new(files);
            // The first read is done before the server starts, so no handshake finds it empty.
            certs
                .clone()
                .watch(opts.maintenance.reload_every, shutdown.clone());
            tokio::spawn(crate::store::api::serve_tls(
                opts.store_api,
                api_state,
                certs,
                shutdown.clone(),
            ))
        }
        None => tokio::spawn(crate::store::api::serve(
            opts.store_api,
            api_state,
            shutdown.clone(),
        )),
    };
    let readiness = Readiness::default();
    let admin = tokio::spawn(crate::http::serve(
        opts.admin,
        AdminState {
            metrics: metrics.clone(),
            ready: readiness.clone(),
        },
        shutdown.clone(),
    ));

    let hash_key = Arc::new(keys.hash_key.clone());
    let config = || ControllerConfig {
        namespaces: opts.namespaces.clone(),
        concurrency: opts.concurrency,
        default_refresh: opts.default_refresh,
        hash_key: hash_key.clone(),
        builtin: builtin.clone(),
        metrics: metrics.clone(),
        on_ready: {
            let readiness = readiness.clone();
            Arc::new(move |ready| readiness.set_ready(ready))
        },
    };

    // What the one writer does: reconcile, and move records to the current key.
    let lead = |until: Shared<BoxFuture<'static, ()>>| {
        let reencrypt = reencrypt(
            store.clone(),
            opts.maintenance.clone(),
            keys_changed.clone(),
            until.clone(),
        );
        let controllers = run_controllers(client.clone(), config(), until);
        async move {
            tokio::join!(controllers, reencrypt);
        }
    };

    if !opts.leader_elect {
        lead(shutdown.clone().boxed().shared()).await;
    } else {
        let (stop_election, election_stopped) = tokio::sync::oneshot::channel::<()>();
        let elector = LeaderElector::new(client.clone(), opts.lease.clone());
        let (mut leading, election) = elector.start(async move {
            let _ = election_stopped.await;
        });
        loop {
            // A standby replica is healthy: it must pass readiness, or rolling updates stall.
            readiness.set_ready(true);
            let shut = shutdown.clone();
            // Shutdown first: leadership is still held while the controllers stop.
            tokio::select! {
                biased;
                _ = shut => break,
                changed = leading.wait_for(|l| *l) => if changed.is_err() { break },
            }
            info!(identity = %opts.lease.identity, "leading: starting the controllers");
            readiness.set_ready(false);
            let mut lost = leading.clone();
            let stop = shutdown.clone();
            let until = async move {
                tokio::select! {
                    _ = stop => {}
                    _ = lost.wait_for(|l| !*l) => {}
                }
            };
            lead(until.boxed().shared()).await;
            info!("no longer leading: controllers stopped");
        }
        let _ = stop_election.send(());
        let _ = election.await;
    }
    let _ = admin.await;
    let _ = store_api.await;
    let _ = key_reload.await;
    Ok(())
}

/// Where the installation keys are kept.
enum KeySource {
    File(PathBuf),
    Secret {
        client: Client,
        namespace: String,
        name: String,
    },
}

impl KeySource {
    async fn read(&self) -> Result<InstallationKeys, String> {
        match self {
            KeySource::File(path) => InstallationKeys::read_file(path).map_err(|e| e.to_string()),
            KeySource::Secret {
                client,
                namespace,
                name,
            } => {
                let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                    .get(name)
                    .await
                    .map_err(|e| format!("Secret {namespace}/{name}: {}", describe(&e)))?;
                let data = secret.data.unwrap_or_default();
                let bytes = data.get(SECRET_KEY).ok_or_else(|| {
                    format!("Secret {namespace}/{name} has no key {SECRET_KEY:?}")
                })?;
                InstallationKeys::from_json(&bytes.0)
                    .map_err(|e| format!("Secret {namespace}/{name}: {e}"))
            }
        }
    }
}

/// Reads the installation keys every `every` and hands a changed set of store keys (after
/// `appconn keys rotate` or `remove`) to the store, then wakes the re-encryption. A set the
/// store refuses (a key it still needs is gone) is logged and the old one kept.
///
/// Runs on every replica, so that a standby can read what the leader writes.
async fn reload_keys(
    source: KeySource,
    store: Arc<SqlStore>,
    mut current: StoreKeys,
    every: Duration,
    changed: Arc<tokio::sync::Notify>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
        }
        let read = match source.read().await {
            Ok(keys) => keys.store_keys,
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "cannot read the installation keys; keeping the ones in use");
                    last_error = Some(e);
                }
                continue;
            }
        };
        last_error = None;
        if read.same_as(&current) {
            continue;
        }
        // A new current key is first only readable for one interval, while writes keep the key
        // in use: by then every replica has read the new set, so none meets a record sealed
        // with a key it does not know yet.
        if let Some(staged) = read
            .with_active(current.active_id())
            .filter(|_| read.active_id() != current.active_id())
        {
            if let Err(e) = store.use_keys(&staged).await {
                tracing::warn!(error = %e, "the changed installation keys do not fit the store; keeping the ones in use");
                continue;
            }
            info!(next_key = %read.active_id(), "store keys changed: the new key becomes current after one reload interval");
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
        match store.use_keys(&read).await {
            Ok(()) => {
                info!(active_key = %read.active_id(), keys = ?read.ids().collect::<Vec<_>>(), "store keys changed");
                current = read;
                changed.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed installation keys do not fit the store; keeping the ones in use")
            }
        }
    }
}

/// The leader's share of a key rotation: records sealed with an older key move to the current
/// one, `batch` at a time with a pause between batches, until none is left; then it waits for
/// the keys to change again (or a minute, for records another replica wrote with an older key).
async fn reencrypt(
    store: Arc<SqlStore>,
    options: Maintenance,
    keys_changed: Arc<tokio::sync::Notify>,
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    let mut moved = 0u64;
    loop {
        let pause = match store.reencrypt_batch(options.reencrypt_batch.max(1)).await {
            Ok(0) => {
                if moved > 0 {
                    info!(records = moved, active_key = %store.active_key(), "re-encryption done");
                    moved = 0;
                }
                tokio::select! {
                    _ = &mut until => return,
                    _ = keys_changed.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => continue,
                }
            }
            Ok(n) => {
                if moved == 0 {
                    info!(active_key = %store.active_key(), "re-encrypting records sealed with older keys");
                }
                moved += n;
                options.reencrypt_pause
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-encryption failed; trying again");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = &mut until => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Reads the installation keys from their Secret, creating it with fresh keys on first start.
async fn keys_from_secret(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<InstallationKeys, OperatorError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let keys_error = |e: String| OperatorError::Keys(format!("Secret {namespace}/{name}: {e}"));
    for _ in 0..2 {
        if let Some(secret) = api
            .get_opt(name)
            .await
            .map_err(|e| keys_error(describe(&e)))?
        {
            let data = secret.data.unwrap_or_default();
            let bytes = data
                .get(SECRET_KEY)
                .ok_or_else(|| keys_error(format!("has no key {SECRET_KEY:?}")))?;
            return InstallationKeys::from_json(&bytes.0).map_err(|e| keys_error(e.to_string()));
        }
        let keys = InstallationKeys::generate();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(
                    [("app.kubernetes.io/name".to_string(), "appconn".to_string())].into(),
                ),
                ..Default::default()
            },
            data: Some(
                [(
                    SECRET_KEY.to_string(),
                    ByteString(keys.to_json().expose_secret().clone()),
                )]
                .into(),
            ),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = %name, "created the installation keys Secret");
                return Ok(keys);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) if missing_namespace(&e) => {
                return Err(OperatorError::NoNamespace(namespace.to_string()));
            }
            Err(e) => return Err(keys_error(describe(&e))),
        }
    }
    Err(keys_error("could not be read or created".into()))
}

/// Fails with a clear line when the Lease cannot live where it is configured: a missing
/// namespace is otherwise only a warning repeated by the election every few seconds.
async fn check_lease_namespace(client: &Client, lease: &LeaseConfig) -> Result<(), OperatorError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let failed = |e: kube::Error| OperatorError::Lease {
        namespace: lease.namespace.clone(),
        name: lease.name.clone(),
        reason: describe(&e),
    };
    if api.get_opt(&lease.name).await.map_err(failed)?.is_some() {
        return Ok(());
    }
    // A dry run of the create the election would make: refused when the namespace is missing.
    let probe = Lease {
        metadata: ObjectMeta {
            name: Some(lease.name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api.create(&params, &probe).await {
        Ok(_) => Ok(()),
        // Created meanwhile by another replica.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) if missing_namespace(&e) => Err(OperatorError::NoNamespace(lease.namespace.clone())),
        Err(e) => Err(failed(e)),
    }
}

/// A create refused because its namespace does not exist (404 naming a namespace).
fn missing_namespace(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 404
        && s.details.as_ref().is_some_and(|d| d.kind == "namespaces"))
}
