//! Builds a backend client from a provider block, reading its auth Secrets through whichever
//! source the driver has (the Kubernetes API, or the applied files).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::credible::{CredibleBackend, CredibleConfig};
use super::infisical::{InfisicalBackend, InfisicalConfig};
use super::matillion::{MatillionBackend, MatillionConfig};
use super::{Backend, BackendLookupError};
use crate::crd::{BackendProvider, Provider, SecretValueSource};
use crate::metrics::Metrics;
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

/// Builds the backend of a provider block: the one place that knows every provider.
pub struct Factory {
    builtin: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

impl Factory {
    pub fn new(builtin: Arc<dyn Backend>, metrics: Arc<Metrics>) -> Self {
        Self { builtin, metrics }
    }

    /// The built-in store.
    pub fn builtin(&self) -> Arc<dyn Backend> {
        self.builtin.clone()
    }

    /// The backend of `provider`, its auth Secrets read through `secrets`; the built-in store
    /// is the one shared instance.
    pub async fn build(
        &self,
        provider: &BackendProvider,
        secrets: &dyn SecretSource,
    ) -> Result<Arc<dyn Backend>, BackendLookupError> {
        let typed = provider
            .provider()
            .map_err(|message| BackendLookupError::InvalidSpec(message.into()))?;
        match typed {
            Provider::Builtin => Ok(self.builtin.clone()),
            Provider::Infisical(infisical) => {
                let auth = &infisical.auth.universal_auth;
                let client_id = read(secrets, &auth.client_id).await?;
                let client_secret = read(secrets, &auth.client_secret).await?;
                let config = InfisicalConfig::from_provider(
                    infisical,
                    provider.rate_limit,
                    client_id,
                    client_secret,
                );
                let backend =
                    InfisicalBackend::new(config, self.metrics.clone()).map_err(spec_error)?;
                Ok(Arc::new(backend))
            }
            Provider::Credible(credible) => {
                let token = match &credible.token {
                    Some(token) => Some(read(secrets, token).await?),
                    None => None,
                };
                let config = CredibleConfig::from_provider(credible, provider.rate_limit, token);
                let backend =
                    CredibleBackend::new(config, self.metrics.clone()).map_err(spec_error)?;
                Ok(Arc::new(backend))
            }
            Provider::Matillion(matillion) => {
                let client_id = read(secrets, &matillion.auth.client_id).await?;
                let client_secret = read(secrets, &matillion.auth.client_secret).await?;
                let config = MatillionConfig::from_provider(
                    matillion,
                    provider.rate_limit,
                    client_id,
                    client_secret,
                );
                let backend =
                    MatillionBackend::new(config, self.metrics.clone()).map_err(spec_error)?;
                Ok(Arc::new(backend))
            }
        }
    }
}

/// The rules of a provider block that need no Secret (URLs, CA bundles), for the backend
/// resource's own check.
pub fn check_spec(provider: &BackendProvider) -> Result<(), BackendLookupError> {
    let typed = provider
        .provider()
        .map_err(|message| BackendLookupError::InvalidSpec(message.into()))?;
    match typed {
        Provider::Builtin => Ok(()),
        Provider::Infisical(infisical) => {
            InfisicalBackend::check_spec(infisical).map_err(spec_error)
        }
        Provider::Credible(credible) => CredibleBackend::check_spec(credible).map_err(spec_error),
        Provider::Matillion(matillion) => {
            MatillionBackend::check_spec(matillion).map_err(spec_error)
        }
    }
}

fn spec_error(err: super::BackendError) -> BackendLookupError {
    match err {
        super::BackendError::InvalidSpec { message } => BackendLookupError::InvalidSpec(message),
        other => BackendLookupError::NotReady(other.to_string()),
    }
}
