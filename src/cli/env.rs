//! The CLI's environment: resources live in the state table of the store file instead of the
//! Kubernetes API, Secrets and backends come from the applied files.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::manifests::Manifests;
use crate::backend::builtin::BuiltinBackend;
use crate::backend::{Backend, Factory, SecretSource};
use crate::crd::{
    AppConnection, AppConnectionStatus, CREATE_PENDING, ClusterConnectionBackend,
    ConnectionBackend, FINALIZER,
};
use crate::metrics::Metrics;
use crate::reconcile::resolve::SecretData;
use crate::reconcile::{
    BackendInfo, BackendKey, BackendLookupError, BackendResources, EnvError, Environment, Event,
    resolve_backend,
};
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
    pub manifests: &'a Manifests,
    factory: Factory,
    /// Backend clients built during one command, one per backend resource: its connections
    /// share one login, and a refused login is not repeated for each of them (three refusals
    /// lock an Infisical identity).
    built: Mutex<HashMap<BackendKey, Arc<dyn Backend>>>,
    /// Key -> state as it will be saved on the next write.
    pub states: Mutex<BTreeMap<String, ResourceState>>,
}

/// The backend resources and namespaces of the applied files, for the core's one lookup.
impl BackendResources for Manifests {
    fn connection_backend(&self, namespace: &str, name: &str) -> Option<ConnectionBackend> {
        self.backends
            .iter()
            .find(|b| {
                b.metadata.name.as_deref() == Some(name)
                    && b.metadata.namespace.as_deref() == Some(namespace)
            })
            .cloned()
    }

    fn cluster_backend(&self, name: &str) -> Option<ClusterConnectionBackend> {
        self.cluster_backends
            .iter()
            .find(|b| b.metadata.name.as_deref() == Some(name))
            .cloned()
    }

    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.namespaces.get(namespace).cloned().unwrap_or_default()
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
        let builtin = Arc::new(BuiltinBackend::new(store.clone()));
        CliEnv {
            factory: Factory::new(builtin, Arc::new(Metrics::default())),
            store,
            manifests,
            built: Mutex::new(HashMap::new()),
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
            .map_err(|e| EnvError::from_source(format!("saving {key} in the store"), e))
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
        let Some(resolved) = resolve_backend(self.manifests, conn)? else {
            return Ok((self.factory.builtin(), BackendInfo::builtin()));
        };
        let kept = self
            .built
            .lock()
            .expect("backends lock")
            .get(&resolved.key)
            .cloned();
        if let Some(built) = kept {
            return Ok((built, resolved.info));
        }
        let secrets = FileSecrets {
            secrets: &self.manifests.secrets,
            namespace: resolved.secret_namespace.clone(),
        };
        let backend = self.factory.build(&resolved.provider, &secrets).await?;
        self.built
            .lock()
            .expect("backends lock")
            .insert(resolved.key, backend.clone());
        Ok((backend, resolved.info))
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
            .map_err(|e| EnvError::from_source(format!("removing {key} from the store"), e))
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
