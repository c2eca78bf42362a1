//! What the core needs from a driver: where resources live and how Secrets, backends, Events
//! and status writes reach them (the Kubernetes API for the controller, the store's state table
//! and the applied files for the CLI).

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::{Backend, BackendLookupError};
use crate::crd::{AppConnection, AppConnectionStatus};
use crate::reconcile::plan::BackendInfo;
use crate::reconcile::resolve::SecretData;

/// A failure of the environment itself (an API server that does not answer, a conflict, a
/// state file that cannot be written), not of the backend: the reconcile ends as an error and
/// is retried with backoff. Keeps the failure it came from.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct EnvError {
    /// What was being done, e.g. `writing the status of warehouse`.
    pub context: String,
    /// The failure as a person reads it (for Kubernetes, the API's message and code).
    pub message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl EnvError {
    /// A failure with its source, shown as `message`.
    pub fn new(
        context: impl Into<String>,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            context: context.into(),
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A failure described by its source's own text.
    pub fn from_source(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let message = source.to_string();
        Self::new(context, message, source)
    }

    /// A failure with no underlying error value.
    pub fn message(context: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            message: message.into(),
            source: None,
        }
    }
}

/// Kubernetes Event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// An Event about an AppConnection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub type_: EventType,
    /// One of the fixed reasons, or an action word (`Created`, `Updated`, `Recreated`, ...).
    pub reason: &'static str,
    /// What the operator did: `Create`, `Update`, `Delete`, `Reconcile`.
    pub action: &'static str,
    pub note: String,
}

impl Event {
    pub fn normal(reason: &'static str, note: String) -> Self {
        Event {
            type_: EventType::Normal,
            reason,
            action: "Reconcile",
            note,
        }
    }

    pub fn warning(reason: &'static str, note: String) -> Self {
        Event {
            type_: EventType::Warning,
            reason,
            action: "Reconcile",
            note,
        }
    }
}

/// Where a driver keeps resources and reads Secrets and backends.
#[async_trait]
pub trait Environment: Send + Sync {
    /// A Secret of the namespace; `None` when it does not exist.
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, EnvError>;
    /// The backend the connection uses.
    async fn backend(
        &self,
        conn: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError>;
    /// Adds the finalizer and, when `create_pending`, the create-pending annotation, in one
    /// write; nothing when both are already there.
    async fn mark(&self, conn: &AppConnection, create_pending: bool) -> Result<(), EnvError>;
    /// The resource as stored now (not a cached copy); `None` when it is gone.
    async fn latest(&self, conn: &AppConnection) -> Result<Option<AppConnection>, EnvError>;
    /// Removes the create-pending annotation: a create was refused because the name belongs
    /// to an object appconn did not create, which a later reconcile must not adopt.
    async fn clear_pending(&self, conn: &AppConnection) -> Result<(), EnvError>;
    /// Removes the finalizer (the resource may then disappear).
    async fn release(&self, conn: &AppConnection) -> Result<(), EnvError>;
    /// Writes the status (only called when it differs from the recorded one).
    async fn write_status(
        &self,
        conn: &AppConnection,
        status: &AppConnectionStatus,
    ) -> Result<(), EnvError>;
    /// Records an Event; failures to record are not the reconcile's failure.
    async fn event(&self, conn: &AppConnection, event: Event);
}
