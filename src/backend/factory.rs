//! Builds a backend client from a provider block, reading its auth Secrets through whichever
//! source the driver has (the Kubernetes API, or the applied files).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::Backend;
use super::infisical::{InfisicalBackend, InfisicalConfig};
use crate::crd::{BackendProvider, SecretValueSource};
use crate::metrics::Metrics;
use crate::reconcile::BackendLookupError;
use crate::secret::SecretString;

/// Where backend auth Secrets are read from.
#[async_trait]
pub trait SecretSource: Send + Sync {
    /// The Secret's data; `namespace` is what the reference names (None for the namespaced
    /// kind, whose Secrets live beside it). `Err` is a transient read failure.
    async fn get(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String>;
}

async fn read(
    secrets: &dyn SecretSource,
    source: &SecretValueSource,
) -> Result<SecretString, BackendLookupError> {
    let r = &source.secret_key_ref;
    let data = secrets
        .get(r.namespace.as_deref(), &r.name)
        .await
        .map_err(BackendLookupError::Unavailable)?
        .ok_or_else(|| {
            BackendLookupError::NotReady(format!("backend auth Secret {:?} not found", r.name))
        })?;
    let bytes = data.get(&r.key).ok_or_else(|| {
        BackendLookupError::NotReady(format!(
            "backend auth Secret {:?} has no key {:?}",
            r.name, r.key
        ))
    })?;
    let text = String::from_utf8(bytes.clone()).map_err(|_| {
        BackendLookupError::NotReady(format!(
            "backend auth Secret {:?} key {:?} is not UTF-8 text",
            r.name, r.key
        ))
    })?;
    Ok(SecretString::new(text.trim().to_string()))
}

/// A client for a non-builtin provider block.
pub async fn build(
    provider: &BackendProvider,
    secrets: &dyn SecretSource,
    metrics: Arc<Metrics>,
) -> Result<Arc<dyn Backend>, BackendLookupError> {
    if let Some(infisical) = &provider.infisical {
        let auth = &infisical.auth.universal_auth;
        let client_id = read(secrets, &auth.client_id).await?;
        let client_secret = read(secrets, &auth.client_secret).await?;
        let config = InfisicalConfig::from_provider(
            infisical,
            provider.rate_limit,
            client_id,
            client_secret,
        );
        let backend = InfisicalBackend::new(config, metrics).map_err(|e| match e {
            super::BackendError::InvalidSpec { message } => {
                BackendLookupError::InvalidSpec(message)
            }
            other => BackendLookupError::NotReady(other.to_string()),
        })?;
        return Ok(Arc::new(backend));
    }
    let name = provider.type_name().unwrap_or("none");
    Err(BackendLookupError::NotReady(format!(
        "provider {name:?} is not supported by this version of appconn"
    )))
}
