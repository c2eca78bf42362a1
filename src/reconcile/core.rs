//! Apply: carries a plan out through a backend and the resource's environment (the Kubernetes
//! API for the controller, the local state file for the CLI), then writes the status.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;

use super::Reason;
use super::plan::{self, Action, BackendInfo};
use super::resolve::{self, SecretData};
use super::status::{self, Observation};
use crate::backend::{Backend, BackendError, BackendLookupError, Desired, Remote, RemoteRotation};
use crate::crd::{AppConnection, AppConnectionStatus, DeletionPolicy, FINALIZER, ProviderType};
use crate::keys::HashKey;

/// A failure of the environment itself (API server unreachable, conflict): always transient.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EnvError(pub String);

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

/// What to do next with this object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Healthy: look again after the drift-check interval (None: only on change).
    After(Option<Duration>),
    /// Transient failure: back off, at least `retry_after` when the backend said so.
    Backoff { retry_after: Option<Duration> },
    /// Invalid input: wait for a change to the resource or its Secrets.
    WaitForChange,
}

/// The result of one reconcile of one AppConnection.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `create`, `adopt`, `update`, `recreate`, `drift-correct`, `record-rotation`, `verify`,
    /// `noop`, `delete`, `release`, `suspend`, `error`; in dry-run the planned verb.
    pub action: &'static str,
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    /// The status as written or kept (None once the resource is released).
    pub status: Option<AppConnectionStatus>,
    pub requeue: Requeue,
    /// Backend writes made (create/update/delete calls).
    pub backend_writes: u32,
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

/// The one reconcile core, shared by the controller and the CLI.
pub struct Reconciler {
    pub hash_key: Arc<HashKey>,
    /// Writes the backend refused as invalid, by object: (generation, hash) of what was sent.
    /// The same content at the same generation is not sent again: invalid input waits for a
    /// change, even when the operator's own status write triggers another reconcile.
    refused: Mutex<HashMap<String, (Option<i64>, String)>>,
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

/// Why an apply stopped: a failure to report on the resource, or its environment failing,
/// which ends the reconcile as an error (logged, retried with backoff) instead of passing for a
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

/// What a successful apply did.
struct Applied {
    action: &'static str,
    remote: Remote,
    written: bool,
    event: Option<(&'static str, String)>,
}

impl Reconciler {
    pub fn new(hash_key: Arc<HashKey>) -> Self {
        Self {
            hash_key,
            refused: Mutex::new(HashMap::new()),
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
                None => return Ok(released("release")),
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
                    "suspend",
                    Requeue::WaitForChange,
                    0,
                    opts,
                )
                .await;
        }

        let (backend, info) = match env.backend(conn).await {
            Ok(found) => found,
            Err(e) => {
                let requeue = match e {
                    BackendLookupError::Unavailable(_) => Requeue::Backoff { retry_after: None },
                    _ => Requeue::WaitForChange,
                };
                let obs = observation(false, e.reason(), e.to_string());
                return self.failed(env, conn, None, obs, requeue, opts).await;
            }
        };

        let desired = match self.resolve_desired(env, conn, &info).await {
            Ok(desired) => desired,
            Err(Resolution::Env(e)) => return Err(e),
            Err(Resolution::Invalid(reason, message)) => {
                let obs = observation(false, reason, message);
                return self
                    .failed(env, conn, Some(&info), obs, Requeue::WaitForChange, opts)
                    .await;
            }
        };
        let rotation_enabled = desired.rotation.is_some();
        if let Err(e) = backend.validate(&desired) {
            let obs = observation(false, e.reason(), e.to_string());
            return self
                .failed(env, conn, Some(&info), obs, Requeue::WaitForChange, opts)
                .await;
        }

        let action = plan::decide(conn, &desired, opts.verify, opts.now);
        if opts.dry_run {
            let prior_ready =
                status::ready_condition(conn.status.as_ref()).is_some_and(|c| c.status == "True");
            return Ok(Outcome {
                action: action.verb(),
                ready: prior_ready,
                reason: Reason::Synced,
                message: format!("would {}", action.verb()),
                status: conn.status.clone(),
                requeue: Requeue::WaitForChange,
                backend_writes: 0,
            });
        }
        if let Action::Noop { .. } = action {
            let obs = Observation {
                ready: true,
                reason: Reason::Synced,
                message: synced_message(&info),
                remote: None,
                written_hash: None,
                rotation_enabled,
            };
            let requeue = Requeue::After(opts.refresh);
            return self
                .finish(env, conn, Some(&info), obs, "noop", requeue, 0, opts)
                .await;
        }

        let attempt = (conn.metadata.generation, desired.credentials_hash.clone());
        let key = object_key(conn);
        let writes = matches!(action, Action::Create { .. } | Action::Update { .. });
        let refused_before =
            writes && self.refused.lock().expect("refused lock").get(&key) == Some(&attempt);
        if refused_before {
            let prior = status::ready_condition(conn.status.as_ref());
            if let Some(reason) = prior.and_then(|c| Reason::parse(&c.reason)) {
                let message = prior.map(|c| c.message.clone()).unwrap_or_default();
                let obs = observation(false, reason, message);
                return self
                    .failed(env, conn, Some(&info), obs, Requeue::WaitForChange, opts)
                    .await;
            }
        }
        let applied = match self
            .apply(env, conn, backend.as_ref(), &desired, action)
            .await
        {
            Ok(applied) => Ok(applied),
            Err(Stop::Failed(failure)) => Err(failure),
            Err(Stop::Env(e)) => return Err(e),
        };
        {
            let mut refused = self.refused.lock().expect("refused lock");
            match &applied {
                // Only the content itself refused: an auth failure may clear with the backend's
                // credentials, which change without this object changing.
                Err(failure)
                    if writes
                        && matches!(
                            failure.reason,
                            Reason::BackendRejected | Reason::InvalidSpec
                        ) =>
                {
                    refused.insert(key, attempt);
                }
                _ => {
                    refused.remove(&key);
                }
            }
        }
        match applied {
            Ok(applied) => {
                if let Some((reason, note)) = &applied.event {
                    env.event(conn, Event::normal(reason, note.clone())).await;
                }
                let mut message = synced_message(&info);
                if let Some((reason, detail)) = rotation_problem(applied.remote.rotation.as_ref()) {
                    let was = conn.status.as_ref().and_then(|s| s.rotation.as_ref());
                    let now = applied.remote.rotation.as_ref();
                    if was.and_then(|r| r.status.as_deref())
                        != now.and_then(|r| r.status.as_deref())
                    {
                        env.event(conn, Event::warning(reason.as_str(), detail.clone()))
                            .await;
                    }
                    message = format!("{message}; {detail}");
                }
                let obs = Observation {
                    ready: true,
                    reason: Reason::Synced,
                    message,
                    remote: Some(applied.remote),
                    written_hash: applied.written.then(|| desired.credentials_hash.clone()),
                    rotation_enabled,
                };
                let writes = u32::from(applied.written);
                let requeue = Requeue::After(opts.refresh);
                self.finish(
                    env,
                    conn,
                    Some(&info),
                    obs,
                    applied.action,
                    requeue,
                    writes,
                    opts,
                )
                .await
            }
            Err(failure) => {
                let requeue = if failure.transient {
                    Requeue::Backoff {
                        retry_after: failure.retry_after,
                    }
                } else {
                    Requeue::WaitForChange
                };
                let obs = observation(false, failure.reason, failure.message);
                self.failed(env, conn, Some(&info), obs, requeue, opts)
                    .await
            }
        }
    }

    async fn resolve_desired(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        info: &BackendInfo,
    ) -> Result<Desired, Resolution> {
        let namespace = conn.metadata.namespace.clone().unwrap_or_default();
        let mut secrets: BTreeMap<String, SecretData> = BTreeMap::new();
        for name in resolve::referenced_secrets(conn) {
            if let Some(data) = env
                .secret(&namespace, &name)
                .await
                .map_err(Resolution::Env)?
            {
                secrets.insert(name, data);
            }
        }
        let credentials = resolve::resolve(conn, &secrets)
            .map_err(|e| Resolution::Invalid(e.reason(), e.to_string()))?;
        plan::desired(conn, info, credentials, &self.hash_key)
            .map_err(|e| Resolution::Invalid(e.reason(), e.to_string()))
    }

    async fn apply(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        backend: &dyn Backend,
        desired: &Desired,
        action: Action,
    ) -> Result<Applied, Stop> {
        let name = &desired.target.connection_name;
        match action {
            Action::Create { find_first } => {
                if find_first && let Some(found) = backend.find(&desired.target).await? {
                    let remote = backend.update(&found.id, desired).await?;
                    let note = format!("adopted {name:?} left by an interrupted create");
                    return Ok(Applied {
                        action: "adopt",
                        remote,
                        written: true,
                        event: Some(("Adopted", note)),
                    });
                }
                // A create refused because the name is taken is not tried again while it still
                // is: marking, creating and clearing the marker would each trigger the next
                // reconcile, a loop of writes. Only a read checks whether the name came free.
                if !find_first
                    && refused_as_taken(conn)
                    && backend.find(&desired.target).await?.is_some()
                {
                    return Err(name_taken(name).into());
                }
                env.mark(conn, true).await?;
                match backend.create(desired).await {
                    Ok(remote) => {
                        let note = format!("created {name:?} at the backend");
                        Ok(Applied {
                            action: "create",
                            remote,
                            written: true,
                            event: Some(("Created", note)),
                        })
                    }
                    Err(BackendError::AlreadyExists { .. })
                        if conn.spec.adopt_existing.unwrap_or(false) =>
                    {
                        let found =
                            backend
                                .find(&desired.target)
                                .await?
                                .ok_or_else(|| Failure {
                                    reason: Reason::BackendUnavailable,
                                    message: format!(
                                        "{name:?} was reported as existing but cannot be found"
                                    ),
                                    transient: true,
                                    retry_after: None,
                                })?;
                        let remote = backend.update(&found.id, desired).await?;
                        let note = format!("adopted existing {name:?} (adoptExisting)");
                        Ok(Applied {
                            action: "adopt",
                            remote,
                            written: true,
                            event: Some(("Adopted", note)),
                        })
                    }
                    Err(BackendError::AlreadyExists { .. }) => {
                        env.clear_pending(conn).await?;
                        Err(name_taken(name).into())
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Action::Update { id } => match backend.update(&id, desired).await {
                Ok(remote) => Ok(Applied {
                    action: "update",
                    remote,
                    written: true,
                    event: Some(("Updated", format!("updated {name:?} at the backend"))),
                }),
                Err(BackendError::NotFound) => self.recreate(env, conn, backend, desired).await,
                Err(e) => Err(e.into()),
            },
            Action::Verify { id } => {
                let Some(remote) = backend.get(&id, &desired.target).await? else {
                    return self.recreate(env, conn, backend, desired).await;
                };
                let recorded = conn
                    .status
                    .as_ref()
                    .and_then(|s| s.backend_credentials_hash.as_deref());
                let drifted = recorded.is_some() && remote.credentials_hash.as_deref() != recorded;
                if !drifted {
                    return Ok(Applied {
                        action: "verify",
                        remote,
                        written: false,
                        event: None,
                    });
                }
                if backend.rotates_itself(desired) {
                    let note = format!(
                        "{name:?} credentials were rotated by the backend; recorded the new hash"
                    );
                    return Ok(Applied {
                        action: "record-rotation",
                        remote,
                        written: false,
                        event: Some(("RotationRecorded", note)),
                    });
                }
                let remote = backend.update(&id, desired).await?;
                let note = format!(
                    "{name:?} was changed outside appconn; pushed the declared content again"
                );
                Ok(Applied {
                    action: "drift-correct",
                    remote,
                    written: true,
                    event: Some(("DriftCorrected", note)),
                })
            }
            Action::Noop { id } => Err(Failure {
                reason: Reason::InvalidSpec,
                message: format!("internal: noop for {id} reached apply"),
                transient: false,
                retry_after: None,
            }
            .into()),
        }
    }

    async fn recreate(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        backend: &dyn Backend,
        desired: &Desired,
    ) -> Result<Applied, Stop> {
        env.mark(conn, true).await?;
        let remote = backend.create(desired).await?;
        let note = format!(
            "{:?} was gone from the backend; created it again",
            desired.target.connection_name
        );
        Ok(Applied {
            action: "recreate",
            remote,
            written: true,
            event: Some(("Recreated", note)),
        })
    }

    /// Deletion: remove the backend object under `Delete`, then the finalizer.
    async fn finalize(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        opts: Options,
    ) -> Result<Outcome, EnvError> {
        let has_finalizer = conn
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
        if !has_finalizer {
            return Ok(released("release"));
        }
        let id = conn.status.as_ref().and_then(|s| s.id.clone());
        let pending = conn
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(crate::crd::CREATE_PENDING));
        let must_delete =
            conn.deletion_policy() == DeletionPolicy::Delete && (id.is_some() || pending);
        if opts.dry_run {
            let verb = if must_delete { "delete" } else { "release" };
            return Ok(Outcome {
                action: verb,
                ..released(verb)
            });
        }
        if !must_delete {
            env.release(conn).await?;
            return Ok(released("release"));
        }
        let (backend, info) = match env.backend(conn).await {
            Ok(found) => found,
            Err(e) => {
                let message = format!(
                    "cannot delete the backend object: {e}; the finalizer stays until it can"
                );
                let obs = observation(false, e.reason(), message);
                return self
                    .failed(
                        env,
                        conn,
                        None,
                        obs,
                        Requeue::Backoff { retry_after: None },
                        opts,
                    )
                    .await;
            }
        };
        let target = plan::target(conn, &info);
        let result = match id {
            Some(id) => backend.delete(&id, &target).await,
            None => match backend.find(&target).await {
                Ok(Some(found)) => backend.delete(&found.id, &target).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                env.release(conn).await?;
                Ok(Outcome {
                    backend_writes: 1,
                    ..released("delete")
                })
            }
            Err(e) => {
                let failure = Failure::from(e);
                let message = format!(
                    "deleting the backend object failed: {}; the finalizer stays until it succeeds",
                    failure.message
                );
                let obs = observation(false, failure.reason, message);
                let requeue = Requeue::Backoff {
                    retry_after: failure.retry_after,
                };
                self.failed(env, conn, Some(&info), obs, requeue, opts)
                    .await
            }
        }
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
        let prior = status::ready_condition(conn.status.as_ref());
        let changed =
            prior.is_none_or(|c| c.reason != obs.reason.as_str() || c.message != obs.message);
        if changed && !opts.dry_run {
            env.event(
                conn,
                Event::warning(obs.reason.as_str(), obs.message.clone()),
            )
            .await;
        }
        self.finish(env, conn, info, obs, "error", requeue, 0, opts)
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
        action: &'static str,
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

enum Resolution {
    Env(EnvError),
    Invalid(Reason, String),
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

/// The refusal of a create whose name belongs to an object appconn did not create.
fn name_taken(name: &str) -> Failure {
    Failure {
        reason: Reason::AlreadyExists,
        message: format!(
            "a connection named {name:?} already exists at the backend and was not created by appconn; set spec.adoptExisting: true to take it over, or choose another connectionName"
        ),
        transient: false,
        retry_after: None,
    }
}

/// The last reconcile of this generation was refused because the name is taken.
fn refused_as_taken(conn: &AppConnection) -> bool {
    status::ready_condition(conn.status.as_ref()).is_some_and(|c| {
        c.reason == Reason::AlreadyExists.as_str()
            && c.observed_generation == conn.metadata.generation
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
    if info.provider == ProviderType::Builtin {
        "connection is in the built-in store".to_string()
    } else {
        format!("connection is synced to {} {}", info.kind, info.name)
    }
}

fn released(action: &'static str) -> Outcome {
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
