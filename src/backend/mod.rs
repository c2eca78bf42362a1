//! Connection backends behind one trait: the reconcile core plans, a backend carries out.
//!
//! Identity: every backend here treats "same name in the same project" as the same object, so
//! `find` by name is how a crash between create and status write is recovered.

pub mod builtin;
mod factory;
pub mod http;
pub mod infisical;
pub mod ratelimit;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use serde_json::Value;

pub use factory::{SecretSource, build};

use crate::reconcile::Reason;
use crate::secret::Credentials;

/// Which backend object a connection is: enough to find, read or delete it, no secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Namespace of the AppConnection.
    pub namespace: String,
    /// `metadata.name` of the AppConnection.
    pub resource_name: String,
    /// Name at the backend.
    pub connection_name: String,
    pub app: String,
    pub method: Option<String>,
    /// Project at the backend, after defaulting from the backend resource.
    pub project: Option<String>,
}

/// Lives with the store, the lowest layer that keeps it.
pub use crate::store::RotationSchedule;

/// Everything the operator sends for one connection.
#[derive(Clone, Debug)]
pub struct Desired {
    pub target: Target,
    pub description: Option<String>,
    pub credentials: Credentials,
    /// Non-secret fields passed through as they are.
    pub settings: BTreeMap<String, Value>,
    pub rotation: Option<RotationSchedule>,
    /// `hmac-sha256:<hex>` over the canonical JSON of all of the above.
    pub credentials_hash: String,
}

/// Rotation state as the backend reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteRotation {
    /// `success`, `failed`, `pending` or `overdue`.
    pub status: Option<String>,
    pub last_message: Option<String>,
    pub last_rotation_time: Option<Timestamp>,
    pub next_rotation_at: Option<Timestamp>,
}

/// A backend object as the backend reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Remote {
    /// The backend's identity for the object (a uuid, or a path where there is none).
    pub id: String,
    pub connection_name: String,
    /// The backend's own credentials hash, where it has one. For the built-in store, the
    /// operator hash stored with the record.
    pub credentials_hash: Option<String>,
    pub rotation: Option<RemoteRotation>,
}

/// A failed backend call, classified for the condition reason and the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend refused the request as invalid (4xx validation). Not retried.
    #[error("{message}")]
    Rejected { message: String },
    /// Input the backend would refuse, caught before any call (name rules, unknown app). Not retried.
    #[error("{message}")]
    InvalidSpec { message: String },
    /// A create found the name taken.
    #[error("a connection named {name:?} already exists at the backend")]
    AlreadyExists { name: String },
    /// The object addressed by id does not exist (any more).
    #[error("the connection does not exist at the backend")]
    NotFound,
    /// Login or token refused even after one fresh login.
    #[error("authentication failed: {message}")]
    Auth { message: String },
    /// Timeouts, 5xx, 429, refused connections. Retried with backoff, `retry_after` honoured.
    #[error("backend unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Option<Duration>,
    },
}

impl BackendError {
    pub fn reason(&self) -> Reason {
        match self {
            BackendError::Rejected { .. } | BackendError::NotFound => Reason::BackendRejected,
            BackendError::InvalidSpec { .. } => Reason::InvalidSpec,
            BackendError::AlreadyExists { .. } => Reason::AlreadyExists,
            BackendError::Auth { .. } => Reason::BackendAuthFailed,
            BackendError::Unavailable { .. } => Reason::BackendUnavailable,
        }
    }

    /// Whether waiting and trying again can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Unavailable { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BackendError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A connection backend. Implementations never log or return secret values, including in
/// error messages built from response bodies.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Provider type: `builtin`, `infisical`, `credible`, `matillion`.
    fn provider(&self) -> &'static str;

    /// Checks backend-specific rules (name syntax, app and method) before any write.
    fn validate(&self, desired: &Desired) -> Result<(), BackendError>;

    /// Auth and health check for the backend resource's `Ready` condition.
    async fn check(&self) -> Result<(), BackendError>;

    /// Reads the object by id; `None` when it is gone.
    async fn get(&self, id: &str, target: &Target) -> Result<Option<Remote>, BackendError>;

    /// Looks the object up by name (crash recovery and adoption).
    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError>;

    /// Creates the object; `AlreadyExists` when the name is taken.
    async fn create(&self, desired: &Desired) -> Result<Remote, BackendError>;

    /// Replaces the object's content; `NotFound` when it is gone.
    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError>;

    /// Deletes the object; an object already gone counts as deleted.
    async fn delete(&self, id: &str, target: &Target) -> Result<(), BackendError>;

    /// Whether the backend changes these credentials itself (auto-rotation): then a backend hash
    /// that moved is recorded, never overwritten.
    fn rotates_itself(&self, _desired: &Desired) -> bool {
        false
    }
}
