//! The one reconcile core, shared by the controller and the CLI: resolve -> plan -> apply ->
//! status for a live resource (`apply`), the backend object's removal for a deleted one
//! (`finalize`), through the driver's [`Environment`] (`environment`).

mod apply;
mod environment;
mod finalize;
mod outcome;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use environment::{EnvError, Environment, Event, EventType};
pub use outcome::{Options, Outcome, Requeue, Verb};

use super::plan::{self, Action, BackendInfo};
use super::resolve::{self, SecretData};
use super::status::{self, Observation};
use super::verdict::RefusedWrites;
use crate::backend::{BackendError, BackendLookupError, Desired, RemoteRotation};
use crate::crd::{AppConnection, ProviderType, Reason};
use crate::keys::HashKey;

/// The one reconcile core, shared by the controller and the CLI.
pub struct Reconciler {
    pub hash_key: Arc<HashKey>,
    refused: Mutex<RefusedWrites>,
}

/// A failed step, with the reason and whether it is worth retrying.
struct Failure {
    reason: Reason,
    message: String,
    transient: bool,
    retry_after: Option<Duration>,
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Failure {
            reason: e.reason(),
            message: e.to_string(),
            transient: e.is_transient(),
            retry_after: e.retry_after(),
        }
    }
}

impl Failure {
    fn requeue(&self) -> Requeue {
        match (self.transient, self.retry_after) {
            (true, Some(retry_after)) => Requeue::Throttled { retry_after },
            (true, None) => Requeue::Backoff { retry_after: None },
            (false, _) => Requeue::WaitForChange,
        }
    }
}

/// Why a step stopped: a failure to report on the resource, or its environment failing, which
/// ends the reconcile as an error (logged, retried with backoff) instead of passing for a
/// backend problem.
enum Stop {
    Failed(Failure),
    Env(EnvError),
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Self {
        Stop::Failed(failure)
    }
}

impl From<BackendError> for Stop {
    fn from(e: BackendError) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<EnvError> for Stop {
    fn from(e: EnvError) -> Self {
        Stop::Env(e)
    }
}

impl Reconciler {
    pub fn new(hash_key: Arc<HashKey>) -> Self {
        Self {
            hash_key,
            refused: Mutex::new(RefusedWrites::default()),
        }
    }

    /// Reconciles one AppConnection: deletion, suspension, or resolve -> plan -> apply -> status.
    pub async fn reconcile(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        opts: Options,
    ) -> Result<Outcome, EnvError> {
        // Marked create-pending with no recorded id is the one state in which acting on a stale
        // copy is harmful: it may adopt an object a refused create found. Decide on the latest.
        let latest;
        let conn = if plan::awaits_adoption(conn) {
            match env.latest(conn).await? {
                Some(fresh) => {
                    latest = fresh;
                    &latest
                }
                None => return Ok(Outcome::released(Verb::Release)),
            }
        } else {
            conn
        };
        if conn.metadata.deletion_timestamp.is_some() {
            return self.finalize(env, conn, opts).await;
        }
        if conn.suspended() {
            let obs = observation(
                false,
                Reason::Suspended,
                "reconciliation is suspended".into(),
            );
            return self
                .finish(
                    env,
                    conn,
                    None,
                    obs,
                    Verb::Suspend,
                    Requeue::WaitForChange,
                    0,
                    opts,
                )
                .await;
        }
        self.apply(env, conn, opts).await
    }

    /// The credentials from the referenced Secrets and what will be sent, or why not.
    async fn resolve_desired(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        info: &BackendInfo,
    ) -> Result<Desired, Stop> {
        let namespace = conn.metadata.namespace.clone().unwrap_or_default();
        let mut secrets: BTreeMap<String, SecretData> = BTreeMap::new();
        for name in resolve::referenced_secrets(conn) {
            if let Some(data) = env.secret(&namespace, &name).await? {
                secrets.insert(name, data);
            }
        }
        let invalid = |reason: Reason, message: String| Failure {
            reason,
            message,
            transient: false,
            retry_after: None,
        };
        let credentials =
            resolve::resolve(conn, &secrets).map_err(|e| invalid(e.reason(), e.to_string()))?;
        Ok(plan::desired(conn, info, credentials, &self.hash_key)
            .map_err(|e| invalid(e.reason(), e.to_string()))?)
    }

    /// A failure: Warning event when the condition changes, status, requeue.
    async fn failed(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        info: Option<&BackendInfo>,
        obs: Observation,
        requeue: Requeue,
        opts: Options,
    ) -> Result<Outcome, EnvError> {
        warn_if_new(env, conn, &obs, opts).await;
        self.finish(env, conn, info, obs, Verb::Error, requeue, 0, opts)
            .await
    }

    /// Writes the status when it changed and builds the outcome.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        info: Option<&BackendInfo>,
        obs: Observation,
        action: Verb,
        requeue: Requeue,
        backend_writes: u32,
        opts: Options,
    ) -> Result<Outcome, EnvError> {
        let status = status::next_status(
            conn.status.as_ref(),
            conn.metadata.generation,
            info,
            &obs,
            opts.now,
        );
        if conn.status.as_ref() != Some(&status) && !opts.dry_run {
            env.write_status(conn, &status).await?;
        }
        Ok(Outcome {
            action,
            ready: obs.ready,
            reason: obs.reason,
            message: obs.message,
            status: Some(status),
            requeue,
            backend_writes,
        })
    }
}

/// A Warning Event for a not-ready observation whose reason or message the Ready condition
/// does not already say.
async fn warn_if_new(
    env: &dyn Environment,
    conn: &AppConnection,
    obs: &Observation,
    opts: Options,
) {
    let prior = status::ready_condition(conn.status.as_ref());
    let changed = prior.is_none_or(|c| c.reason != obs.reason.as_str() || c.message != obs.message);
    if !obs.ready && changed && !opts.dry_run {
        env.event(
            conn,
            Event::warning(obs.reason.as_str(), obs.message.clone()),
        )
        .await;
    }
}

/// A backend lookup that failed: transient ones back off, the others wait for a change.
fn lookup_failure(e: &BackendLookupError) -> (Observation, Requeue) {
    let requeue = match e {
        BackendLookupError::Unavailable(_) => Requeue::Backoff { retry_after: None },
        _ => Requeue::WaitForChange,
    };
    (observation(false, e.reason(), e.to_string()), requeue)
}

fn observation(ready: bool, reason: Reason, message: String) -> Observation {
    Observation {
        ready,
        reason,
        message,
        remote: None,
        written_hash: None,
        rotation_enabled: false,
    }
}

/// Identity of an object across reconciles (uid where there is one).
fn object_key(conn: &AppConnection) -> String {
    conn.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            conn.metadata.namespace.as_deref().unwrap_or_default(),
            conn.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// A rotation the backend reports as overdue or failed: the reason and its message.
fn rotation_problem(rotation: Option<&RemoteRotation>) -> Option<(Reason, String)> {
    let rotation = rotation?;
    let (reason, fallback) = match rotation.status.as_deref() {
        Some("overdue") => (Reason::RotationOverdue, "credentials rotation is overdue"),
        Some("failed") => (Reason::RotationFailed, "credentials rotation failed"),
        _ => return None,
    };
    Some((
        reason,
        rotation
            .last_message
            .clone()
            .unwrap_or_else(|| fallback.to_string()),
    ))
}

fn synced_message(info: &BackendInfo) -> String {
    match info.provider {
        ProviderType::Builtin => "connection is in the built-in store".to_string(),
        _ => format!("connection is synced to {} {}", info.kind, info.name),
    }
}

/// The verb a dry run reports for a planned action.
fn planned(action: &Action) -> Verb {
    match action {
        Action::Create { .. } => Verb::Create,
        Action::Update { .. } => Verb::Update,
        Action::Verify { .. } => Verb::Verify,
        Action::Noop { .. } => Verb::Noop,
    }
}
