//! The core's judgements, as pure functions: whether a backend object drifted, and whether a
//! write the backend refused would only be refused again. Tested from fixtures in
//! `tests/fixtures/verdicts`.

use std::collections::HashMap;

use crate::backend::Remote;
use crate::crd::{AppConnectionStatus, Reason};

/// What a drift check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The backend object is as appconn last wrote it.
    InSync,
    /// Someone changed it: push the declared content again.
    ChangedOutside,
    /// The backend rotated the credentials itself: record, never undo.
    RotatedByBackend,
}

/// Compares what the backend holds with what appconn wrote. `recorded` is the backend's hash
/// as recorded at the last write; `content_differs` is the backend's own comparison of the
/// content it read back, for backends without a hash of their own (None: compare hashes).
pub fn drift(
    recorded: Option<&str>,
    remote: &Remote,
    content_differs: Option<bool>,
    rotates_itself: bool,
) -> Drift {
    let changed = match content_differs {
        Some(differs) => differs,
        None => recorded.is_some() && remote.credentials_hash.as_deref() != recorded,
    };
    match (changed, rotates_itself) {
        (false, _) => Drift::InSync,
        (true, true) => Drift::RotatedByBackend,
        (true, false) => Drift::ChangedOutside,
    }
}

/// What was sent in a write: the resource's generation and the hash of the content.
pub type Attempt = (Option<i64>, String);

/// Writes the backend refused as invalid, by object. The same content at the same generation
/// is not sent again: invalid input waits for a change, even when the operator's own status
/// write triggers another reconcile.
#[derive(Debug, Default)]
pub struct RefusedWrites {
    refused: HashMap<String, Attempt>,
}

impl RefusedWrites {
    /// Whether this very write was refused as invalid last time.
    pub fn refused_before(&self, object: &str, attempt: &Attempt) -> bool {
        self.refused.get(object) == Some(attempt)
    }

    /// Notes how a write ended: refused for its content (`BackendRejected`, `InvalidSpec`),
    /// it is remembered; anything else (success, an auth failure that may clear with the
    /// backend's credentials, a transient failure) forgets the object.
    pub fn record(&mut self, object: &str, attempt: Attempt, failed: Option<Reason>) {
        match failed {
            Some(Reason::BackendRejected | Reason::InvalidSpec) => {
                self.refused.insert(object.to_string(), attempt);
            }
            _ => {
                self.refused.remove(object);
            }
        }
    }
}

/// The message of a connection test that failed for the content recorded in `status`: it
/// stands, without testing again, while `hash` (the content declared now) is that content.
pub fn failed_test<'a>(status: Option<&'a AppConnectionStatus>, hash: &str) -> Option<&'a str> {
    let condition = super::status::ready_condition(status)?;
    let tested = status?.credentials_hash.as_deref() == Some(hash);
    (tested && condition.reason == Reason::ConnectionTestFailed.as_str())
        .then_some(condition.message.as_str())
}

/// The last reconcile of this generation was refused because the name is taken by an object
/// appconn did not create: a new create would be refused again.
pub fn refused_as_taken(status: Option<&AppConnectionStatus>, generation: Option<i64>) -> bool {
    super::status::ready_condition(status).is_some_and(|c| {
        c.reason == Reason::AlreadyExists.as_str() && c.observed_generation == generation
    })
}
