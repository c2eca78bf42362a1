//! What one reconcile did and what the driver should do next.

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{AppConnectionStatus, Reason};

/// What a reconcile did (in dry-run: what it would do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Create,
    /// Took over a same-name object: left by an interrupted create, or by `adoptExisting`.
    Adopt,
    Update,
    /// The object was gone from the backend and was created again.
    Recreate,
    /// The object was changed outside appconn and the declared content pushed again.
    DriftCorrect,
    /// The backend rotated the credentials itself; its new hash was recorded.
    RecordRotation,
    /// The object was read and found as written.
    Verify,
    /// Nothing to do.
    Noop,
    /// The backend object was deleted and the finalizer released.
    Delete,
    /// The finalizer was released without a backend call (`Orphan`, or nothing was created).
    Release,
    Suspend,
    Error,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Adopt => "adopt",
            Verb::Update => "update",
            Verb::Recreate => "recreate",
            Verb::DriftCorrect => "drift-correct",
            Verb::RecordRotation => "record-rotation",
            Verb::Verify => "verify",
            Verb::Noop => "noop",
            Verb::Delete => "delete",
            Verb::Release => "release",
            Verb::Suspend => "suspend",
            Verb::Error => "error",
        }
    }

    /// Whether the backend object was read or written: its drift-check clock restarts.
    pub fn touched_backend(self) -> bool {
        matches!(
            self,
            Verb::Create
                | Verb::Adopt
                | Verb::Update
                | Verb::Recreate
                | Verb::DriftCorrect
                | Verb::Verify
                | Verb::RecordRotation
        )
    }

    /// Whether the resource is gone from the core's care (its finalizer released).
    pub fn released(self) -> bool {
        matches!(self, Verb::Delete | Verb::Release)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Verb {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What to do next with this object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Healthy: look again after the drift-check interval (None: only on change).
    After(Option<Duration>),
    /// Transient failure: back off, at least `retry_after` when the backend said so.
    Backoff { retry_after: Option<Duration> },
    /// The backend asked to come back after `retry_after` (429): then, without a growing
    /// backoff, since throttling says nothing against this object.
    Throttled { retry_after: Duration },
    /// Invalid input: wait for a change to the resource or its Secrets.
    WaitForChange,
}

/// The result of one reconcile of one AppConnection.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What was done; in dry-run the planned verb.
    pub action: Verb,
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    /// The status as written or kept (None once the resource is released).
    pub status: Option<AppConnectionStatus>,
    pub requeue: Requeue,
    /// Backend writes made (create/update/delete calls).
    pub backend_writes: u32,
}

impl Outcome {
    /// The resource is released: nothing more to do for it.
    pub(super) fn released(action: Verb) -> Outcome {
        Outcome {
            action,
            ready: false,
            reason: Reason::Deleting,
            message: "deleted".into(),
            status: None,
            requeue: Requeue::WaitForChange,
            backend_writes: 0,
        }
    }
}

/// Per-call options set by the driver.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Read the backend object to catch drift even if nothing changed here.
    pub verify: bool,
    /// Plan only: no backend call that writes, no resource write.
    pub dry_run: bool,
    pub now: Timestamp,
    /// Drift-check interval to requeue with when healthy.
    pub refresh: Option<Duration>,
}
