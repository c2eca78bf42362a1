//! `appconn run`: keys, store, admin server, leader election and the controllers, in order.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
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
use crate::keys::{InstallationKeys, SECRET_KEY};
use crate::kube_error::describe;
use crate::metrics::Metrics;
use crate::store::api::StoreApiState;
use crate::store::{SqliteStore, StoreEngine};

/// Everything `appconn run` is told.
pub struct OperatorOptions {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    pub operator_namespace: String,
    pub concurrency: u16,
    pub store: PathBuf,
    /// The Secret (in the operator namespace) holding the installation keys.
    pub key_secret: String,
    /// A key file instead of the Secret.
    pub key_file: Option<PathBuf>,
    /// The admin server's listener, already bound.
    pub admin: tokio::net::TcpListener,
    /// The store read API's listener, already bound.
    pub store_api: tokio::net::TcpListener,
    pub leader_elect: bool,
    pub lease: LeaseConfig,
    pub default_refresh: Duration,
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
    let keys = match &opts.key_file {
        Some(path) => InstallationKeys::load_or_create_file(path)
            .map_err(|e| OperatorError::Keys(e.to_string()))?,
        None => keys_from_secret(&client, &opts.operator_namespace, &opts.key_secret).await?,
    };
    let store = SqliteStore::open(&opts.store, &keys.store_keys)
        .await
        .map_err(|e| OperatorError::Store(e.to_string()))?;
    let store: Arc<dyn StoreEngine> = Arc::new(store);
    let builtin = Arc::new(BuiltinBackend::new(store.clone()));
    let store_api = tokio::spawn(crate::store::api::serve(
        opts.store_api,
        StoreApiState {
            store,
            client: client.clone(),
        },
        shutdown.clone(),
    ));
    let metrics = Arc::new(Metrics::default());
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

    if !opts.leader_elect {
        run_controllers(client, config(), shutdown).await;
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
            run_controllers(client.clone(), config(), until).await;
            info!("no longer leading: controllers stopped");
        }
        let _ = stop_election.send(());
        let _ = election.await;
    }
    let _ = admin.await;
    let _ = store_api.await;
    Ok(())
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
