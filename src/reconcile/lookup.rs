//! Which backend an AppConnection uses: its `backendRef` resolved against the backend resources
//! and namespace labels a driver knows (the controller's caches, the CLI's files), by the same
//! rules for both: a ConnectionBackend in the connection's namespace, a
//! ClusterConnectionBackend's `namespaceSelector`, and a backend whose own check failed holding
//! its connections back.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::BackendInfo;
use crate::backend::BackendLookupError;
use crate::crd::{
    AppConnection, BackendKind, BackendProvider, ClusterConnectionBackend, ConnectionBackend,
    ConnectionBackendStatus,
};

/// A backend resource by kind, namespace ("" for the cluster kind) and name.
pub type BackendKey = (BackendKind, String, String);

/// The backend resources and namespaces a driver knows.
pub trait BackendResources {
    fn connection_backend(&self, namespace: &str, name: &str) -> Option<ConnectionBackend>;
    fn cluster_backend(&self, name: &str) -> Option<ClusterConnectionBackend>;
    /// The labels of a namespace; none for a namespace the driver does not know.
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String>;
}

/// The backend resource a connection resolved to.
#[derive(Clone, Debug)]
pub struct ResolvedBackend {
    pub info: BackendInfo,
    pub key: BackendKey,
    pub uid: String,
    pub generation: i64,
    pub provider: BackendProvider,
    /// Where the namespaced kind's auth Secrets live (its own namespace); None for the cluster
    /// kind, whose references name theirs.
    pub secret_namespace: Option<String>,
}

/// The backend resource of `conn`; None for the built-in store (no `backendRef`).
pub fn resolve_backend(
    resources: &dyn BackendResources,
    conn: &AppConnection,
) -> Result<Option<ResolvedBackend>, BackendLookupError> {
    let Some(reference) = &conn.spec.backend_ref else {
        return Ok(None);
    };
    let namespace = conn.metadata.namespace.clone().unwrap_or_default();
    let (meta, provider, status, secret_namespace, scope) = match reference.kind {
        BackendKind::ConnectionBackend => {
            let found = resources
                .connection_backend(&namespace, &reference.name)
                .ok_or_else(|| {
                    BackendLookupError::NotFound(format!(
                        "ConnectionBackend {:?} not found in namespace {namespace:?}",
                        reference.name
                    ))
                })?;
            (
                found.metadata,
                found.spec.provider,
                found.status,
                Some(namespace.clone()),
                namespace.clone(),
            )
        }
        BackendKind::ClusterConnectionBackend => {
            let found = resources.cluster_backend(&reference.name).ok_or_else(|| {
                BackendLookupError::NotFound(format!(
                    "ClusterConnectionBackend {:?} not found",
                    reference.name
                ))
            })?;
            let selector = found
                .spec
                .conditions
                .as_ref()
                .and_then(|c| c.namespace_selector.as_ref());
            if let Some(selector) = selector
                && !super::labels::matches(selector, &resources.namespace_labels(&namespace))
            {
                return Err(BackendLookupError::NotFound(format!(
                    "ClusterConnectionBackend {:?} does not allow namespace {namespace:?} \
                     (conditions.namespaceSelector)",
                    reference.name
                )));
            }
            (
                found.metadata,
                found.spec.provider,
                found.status,
                None,
                String::new(),
            )
        }
    };
    not_ready(status.as_ref(), reference.kind, &reference.name)?;
    ResolvedBackend::new(
        (reference.kind, scope, reference.name.clone()),
        &meta,
        provider,
        secret_namespace,
    )
    .map(Some)
}

impl ResolvedBackend {
    /// A backend resource's identity, version and provider; `InvalidSpec` when its provider
    /// block is not exactly one provider.
    pub fn new(
        key: BackendKey,
        meta: &ObjectMeta,
        provider: BackendProvider,
        secret_namespace: Option<String>,
    ) -> Result<ResolvedBackend, BackendLookupError> {
        let typed = provider
            .provider()
            .map_err(|message| BackendLookupError::InvalidSpec(message.to_string()))?;
        Ok(ResolvedBackend {
            info: BackendInfo {
                kind: key.0.as_str().to_string(),
                name: key.2.clone(),
                provider: typed.type_(),
                default_project: typed.default_project(),
            },
            uid: meta.uid.clone().unwrap_or_default(),
            generation: meta.generation.unwrap_or_default(),
            key,
            provider,
            secret_namespace,
        })
    }
}

/// A backend whose own check failed makes its connections wait with its message.
fn not_ready(
    status: Option<&ConnectionBackendStatus>,
    kind: BackendKind,
    name: &str,
) -> Result<(), BackendLookupError> {
    let failed = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| c.status == "False");
    match failed {
        Some(c) => Err(BackendLookupError::NotReady(format!(
            "{} {name:?} is not ready: {}",
            kind.as_str(),
            c.message
        ))),
        None => Ok(()),
    }
}
