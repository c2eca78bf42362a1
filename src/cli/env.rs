//! The CLI's environment: resources live in the state table of the store file instead of the
//! Kubernetes API, Secrets and backends come from the applied files.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::manifests::Manifests;
use crate::backend::builtin::BuiltinBackend;
use crate::backend::{self, Backend, SecretSource};
use crate::crd::{AppConnection, AppConnectionStatus, BackendKind, CREATE_PENDING, FINALIZER};
use crate::metrics::Metrics;
use crate::reconcile::resolve::SecretData;
use crate::reconcile::{BackendInfo, BackendLookupError, EnvError, Environment, Event};
use crate::store::StoreEngine;

/// What the CLI remembers of an AppConnection between runs: what the API server would.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceState {
    pub generation: i64,
    /// The spec last applied, to bump the generation when it changes.
    pub spec: Value,
    #[serde(default)]
    pub create_pending: bool,
    #[serde(default)]
    pub finalizer: bool,
    #[serde(default)]
    pub status: Option<AppConnectionStatus>,
}

pub const STATE_PREFIX: &str = "AppConnection/";

pub fn state_key(namespace: &str, name: &str) -> String {
    format!("{STATE_PREFIX}{namespace}/{name}")
}

impl ResourceState {
    /// The resource as the API server would hand it to the controller.
    pub fn object(&self, mut conn: AppConnection) -> AppConnection {
        conn.metadata.generation = Some(self.generation);
        if self.create_pending {
            conn.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CREATE_PENDING.into(), "true".into());
        }
        if self.finalizer {
            conn.metadata
                .finalizers
                .get_or_insert_with(Vec::new)
                .push(FINALIZER.into());
        }
        conn.status = self.status.clone();
        conn
    }
}

pub struct CliEnv<'a> {
    pub store: Arc<dyn StoreEngine>,
    pub builtin: Arc<dyn Backend>,
    pub manifests: &'a Manifests,
    /// Clients of the backend resources in the files, built on first use.
    pub backends: Backends,
    /// Key -> state as it will be saved on the next write.
    pub states: Mutex<BTreeMap<String, ResourceState>>,
}

/// Kind, namespace ("" for the cluster kind), name.
type BackendKey = (BackendKind, String, String);

/// Backend clients built during one command, one per backend resource: its connections share
/// one login, and a refused login is not repeated for each of them (three refusals lock an
/// Infisical identity).
#[derive(Default)]
pub struct Backends {
    built: Mutex<HashMap<BackendKey, Arc<dyn Backend>>>,
    metrics: Arc<Metrics>,
}

impl Backends {
    fn get(&self, key: &BackendKey) -> Option<Arc<dyn Backend>> {
        self.built.lock().expect("backends lock").get(key).cloned()
    }

    fn insert(&self, key: BackendKey, backend: Arc<dyn Backend>) {
        self.built
            .lock()
            .expect("backends lock")
            .insert(key, backend);
    }
}

/// Backend auth Secrets from the applied files: a ConnectionBackend's from its own namespace,
/// a ClusterConnectionBackend's from the namespace each reference names.
struct FileSecrets<'a> {
    secrets: &'a BTreeMap<(String, String), SecretData>,
    namespace: Option<String>,
}

#[async_trait]
impl SecretSource for FileSecrets<'_> {
    async fn get(&self, namespace: Option<&str>, name: &str) -> Result<Option<SecretData>, String> {
        let namespace = self
            .namespace
            .as_deref()
            .or(namespace)
            .ok_or_else(|| format!("secretKeyRef {name:?} must name its namespace"))?;
        Ok(self
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }
}

impl<'a> CliEnv<'a> {
    /// An environment over the store file and the applied files.
    pub fn new(store: Arc<dyn StoreEngine>, manifests: &'a Manifests) -> Self {
        CliEnv {
            builtin: Arc::new(BuiltinBackend::new(store.clone())),
            store,
            manifests,
            backends: Default::default(),
            states: Mutex::new(BTreeMap::new()),
        }
    }
}

impl CliEnv<'_> {
    fn key(conn: &AppConnection) -> String {
        state_key(
            conn.metadata.namespace.as_deref().unwrap_or_default(),
            conn.metadata.name.as_deref().unwrap_or_default(),
        )
    }

    async fn update(
        &self,
        conn: &AppConnection,
        change: impl FnOnce(&mut ResourceState),
    ) -> Result<(), EnvError> {
        let key = Self::key(conn);
        let state = {
            let mut states = self.states.lock().expect("state lock");
            let state = states.entry(key.clone()).or_default();
            change(state);
            state.clone()
        };
        let value = serde_json::to_value(&state).expect("state serializes");
        self.store
            .save_state(&key, &value)
            .await
            .map_err(|e| EnvError(e.to_string()))
    }
}

#[async_trait]
impl Environment for CliEnv<'_> {
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, EnvError> {
        Ok(self
            .manifests
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }

    async fn backend(
        &self,
        conn: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError> {
        let Some(reference) = &conn.spec.backend_ref else {
            return Ok((self.builtin.clone(), BackendInfo::builtin()));
        };
        let namespace = conn.metadata.namespace.as_deref().unwrap_or_default();
        let provider = match reference.kind {
            BackendKind::ConnectionBackend => self
                .manifests
                .backends
                .iter()
                .find(|b| {
                    b.metadata.name.as_deref() == Some(reference.name.as_str())
                        && b.metadata.namespace.as_deref() == Some(namespace)
                })
                .map(|b| &b.spec.provider),
            BackendKind::ClusterConnectionBackend => self
                .manifests
                .cluster_backends
                .iter()
                .find(|b| b.metadata.name.as_deref() == Some(reference.name.as_str()))
                .map(|b| &b.spec.provider),
        };
        let Some(provider) = provider else {
            return Err(BackendLookupError::NotFound(format!(
                "{} {:?} not found{} in the applied files",
                reference.kind.as_str(),
                reference.name,
                match reference.kind {
                    BackendKind::ConnectionBackend => format!(" in namespace {namespace:?}"),
                    BackendKind::ClusterConnectionBackend => String::new(),
                }
            )));
        };
        let info = BackendInfo {
            kind: reference.kind.as_str().to_string(),
            name: reference.name.clone(),
            provider: provider.type_name().unwrap_or("unknown"),
            default_project: provider.default_project(),
        };
        if info.provider == "builtin" {
            return Ok((self.builtin.clone(), info));
        }
        // A ConnectionBackend reads its Secrets from its own namespace (the connection's); a
        // ClusterConnectionBackend from the namespace each reference names.
        let own_namespace = match reference.kind {
            BackendKind::ConnectionBackend => Some(namespace.to_string()),
            BackendKind::ClusterConnectionBackend => None,
        };
        let key = (
            reference.kind,
            own_namespace.clone().unwrap_or_default(),
            reference.name.clone(),
        );
        if let Some(built) = self.backends.get(&key) {
            return Ok((built, info));
        }
        let secrets = FileSecrets {
            secrets: &self.manifests.secrets,
            namespace: own_namespace,
        };
        let backend = backend::build(provider, &secrets, self.backends.metrics.clone()).await?;
        self.backends.insert(key, backend.clone());
        Ok((backend, info))
    }

    async fn mark(&self, conn: &AppConnection, create_pending: bool) -> Result<(), EnvError> {
        self.update(conn, |s| {
            s.finalizer = true;
            s.create_pending |= create_pending;
        })
        .await
    }

    async fn latest(&self, conn: &AppConnection) -> Result<Option<AppConnection>, EnvError> {
        let states = self.states.lock().expect("state lock");
        let Some(state) = states.get(&Self::key(conn)) else {
            return Ok(None);
        };
        let mut base = conn.clone();
        if let Some(annotations) = base.metadata.annotations.as_mut() {
            annotations.remove(CREATE_PENDING);
        }
        if let Some(finalizers) = base.metadata.finalizers.as_mut() {
            finalizers.retain(|f| f != FINALIZER);
        }
        Ok(Some(state.object(base)))
    }

    async fn clear_pending(&self, conn: &AppConnection) -> Result<(), EnvError> {
        self.update(conn, |s| s.create_pending = false).await
    }

    async fn release(&self, conn: &AppConnection) -> Result<(), EnvError> {
        let key = Self::key(conn);
        self.states.lock().expect("state lock").remove(&key);
        self.store
            .delete_state(&key)
            .await
            .map_err(|e| EnvError(e.to_string()))
    }

    async fn write_status(
        &self,
        conn: &AppConnection,
        status: &AppConnectionStatus,
    ) -> Result<(), EnvError> {
        self.update(conn, |s| s.status = Some(status.clone())).await
    }

    /// The printed status carries each reason and message; there is no Event store to keep.
    async fn event(&self, _conn: &AppConnection, _event: Event) {}
}
