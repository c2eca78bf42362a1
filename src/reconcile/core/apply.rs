//! A live resource: its backend, what to send, the plan, and carrying it out.

use super::{
    EnvError, Environment, Event, Failure, Options, Outcome, Reconciler, Requeue, Stop, Verb,
    lookup_failure, object_key, observation, planned, rotation_problem, synced_message,
    warn_if_new,
};
use crate::backend::{Backend, BackendError, Desired, Remote};
use crate::crd::{AppConnection, Reason};
use crate::reconcile::plan::{self, Action, BackendInfo};
use crate::reconcile::status::{self, Observation};
use crate::reconcile::verdict::{self, Drift};

/// What a successful step did.
struct Applied {
    action: Verb,
    remote: Remote,
    written: bool,
    event: Option<(&'static str, String)>,
}

impl Reconciler {
    /// Resolve -> plan -> carry out -> status, for a resource that is not being deleted.
    pub(super) async fn apply(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        opts: Options,
    ) -> Result<Outcome, EnvError> {
        let (backend, info) = match env.backend(conn).await {
            Ok(found) => found,
            Err(e) => {
                let (obs, requeue) = lookup_failure(&e);
                return self.failed(env, conn, None, obs, requeue, opts).await;
            }
        };
        let desired = match self.resolve_desired(env, conn, &info).await {
            Ok(desired) => desired,
            Err(Stop::Env(e)) => return Err(e),
            Err(Stop::Failed(failure)) => {
                let requeue = failure.requeue();
                let obs = observation(false, failure.reason, failure.message);
                return self
                    .failed(env, conn, Some(&info), obs, requeue, opts)
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
            let verb = planned(&action);
            return Ok(Outcome {
                action: verb,
                ready: prior_ready,
                reason: Reason::Synced,
                message: format!("would {verb}"),
                status: conn.status.clone(),
                requeue: Requeue::WaitForChange,
                backend_writes: 0,
            });
        }
        if let Action::Noop { .. } = action {
            let mut obs = Observation {
                ready: true,
                reason: Reason::Synced,
                message: synced_message(&info),
                remote: None,
                written_hash: None,
                rotation_enabled,
            };
            keep_failed_test(conn, &desired, &mut obs);
            let requeue = Requeue::After(opts.refresh);
            return self
                .finish(env, conn, Some(&info), obs, Verb::Noop, requeue, 0, opts)
                .await;
        }

        let attempt = (conn.metadata.generation, desired.credentials_hash.clone());
        let key = object_key(conn);
        let writes = matches!(action, Action::Create { .. } | Action::Update { .. });
        let refused_before = writes
            && self
                .refused
                .lock()
                .expect("refused lock")
                .refused_before(&key, &attempt);
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
            .carry_out(env, conn, backend.as_ref(), &desired, action)
            .await
        {
            Ok(applied) => Ok(applied),
            Err(Stop::Failed(failure)) => Err(failure),
            Err(Stop::Env(e)) => return Err(e),
        };
        // Only a write refused for its content is remembered: an auth failure may clear with
        // the backend's credentials, which change without this object changing.
        let refused = match &applied {
            Err(failure) if writes => Some(failure.reason),
            _ => None,
        };
        self.refused
            .lock()
            .expect("refused lock")
            .record(&key, attempt, refused);
        match applied {
            Ok(applied) => {
                self.applied(env, conn, &info, backend.as_ref(), &desired, applied, opts)
                    .await
            }
            Err(failure) => {
                let requeue = failure.requeue();
                let obs = observation(false, failure.reason, failure.message);
                self.failed(env, conn, Some(&info), obs, requeue, opts)
                    .await
            }
        }
    }

    /// A successful step: its Event, a rotation problem the backend reports, the connection
    /// test after a write where one is asked for, the status.
    #[allow(clippy::too_many_arguments)]
    async fn applied(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        info: &BackendInfo,
        backend: &dyn Backend,
        desired: &Desired,
        applied: Applied,
        opts: Options,
    ) -> Result<Outcome, EnvError> {
        if let Some((reason, note)) = &applied.event {
            env.event(conn, Event::normal(reason, note.clone())).await;
        }
        let mut message = synced_message(info);
        if let Some((reason, detail)) = rotation_problem(applied.remote.rotation.as_ref()) {
            let was = conn.status.as_ref().and_then(|s| s.rotation.as_ref());
            let now = applied.remote.rotation.as_ref();
            if was.and_then(|r| r.status.as_deref()) != now.and_then(|r| r.status.as_deref()) {
                env.event(conn, Event::warning(reason.as_str(), detail.clone()))
                    .await;
            }
            message = format!("{message}; {detail}");
        }
        let mut obs = Observation {
            ready: true,
            reason: Reason::Synced,
            message,
            remote: Some(applied.remote),
            written_hash: applied.written.then(|| desired.credentials_hash.clone()),
            rotation_enabled: desired.rotation.is_some(),
        };
        let mut requeue = Requeue::After(opts.refresh);
        if !applied.written {
            keep_failed_test(conn, desired, &mut obs);
        } else if conn.tests_connection() {
            let failed = match backend.test_connection(desired).await {
                Ok(Some(test)) if !test.ok => {
                    Some(format!("the connection test failed: {}", test.message))
                }
                Ok(_) => None,
                // Written but not tested: the write and its test are tried again.
                Err(e) if e.is_transient() => {
                    let failure = Failure::from(e);
                    requeue = failure.requeue();
                    obs.written_hash = None;
                    obs.ready = false;
                    obs.reason = failure.reason;
                    obs.message = format!(
                        "written, but the connection test could not run: {}",
                        failure.message
                    );
                    None
                }
                Err(e) => Some(format!("the connection test could not run: {e}")),
            };
            if let Some(message) = failed {
                obs.ready = false;
                obs.reason = Reason::ConnectionTestFailed;
                obs.message = message;
            }
        }
        warn_if_new(env, conn, &obs, opts).await;
        let writes = u32::from(applied.written);
        self.finish(
            env,
            conn,
            Some(info),
            obs,
            applied.action,
            requeue,
            writes,
            opts,
        )
        .await
    }

    /// Carries out the planned action at the backend.
    async fn carry_out(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        backend: &dyn Backend,
        desired: &Desired,
        action: Action,
    ) -> Result<Applied, Stop> {
        match action {
            Action::Create { find_first } => {
                self.create(env, conn, backend, desired, find_first).await
            }
            Action::Update { id } => match backend.update(&id, desired).await {
                Ok(remote) => Ok(Applied {
                    action: Verb::Update,
                    remote,
                    written: true,
                    event: Some((
                        "Updated",
                        format!(
                            "updated {:?} at the backend",
                            desired.target.connection_name
                        ),
                    )),
                }),
                Err(BackendError::NotFound) => self.recreate(env, conn, backend, desired).await,
                Err(e) => Err(e.into()),
            },
            Action::Verify { id } => self.verify(env, conn, backend, desired, &id).await,
            Action::Noop { id } => Err(Failure {
                reason: Reason::InvalidSpec,
                message: format!("internal: noop for {id} reached apply"),
                transient: false,
                retry_after: None,
            }
            .into()),
        }
    }

    /// No object recorded: adopt one an interrupted create left, else create (marked
    /// create-pending first, so a crash before the status write is recovered by adoption).
    async fn create(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        backend: &dyn Backend,
        desired: &Desired,
        find_first: bool,
    ) -> Result<Applied, Stop> {
        let name = &desired.target.connection_name;
        if find_first && let Some(found) = backend.find(&desired.target).await? {
            let remote = backend.update(&found.id, desired).await?;
            let note = format!("adopted {name:?} left by an interrupted create");
            return Ok(Applied {
                action: Verb::Adopt,
                remote,
                written: true,
                event: Some(("Adopted", note)),
            });
        }
        // A create refused because the name is taken is not tried again while it still is:
        // marking, creating and clearing the marker would each trigger the next reconcile, a
        // loop of writes. Only a read checks whether the name came free.
        if !find_first
            && verdict::refused_as_taken(conn.status.as_ref(), conn.metadata.generation)
            && backend.find(&desired.target).await?.is_some()
        {
            return Err(name_taken(name).into());
        }
        env.mark(conn, true).await?;
        match backend.create(desired).await {
            Ok(remote) => Ok(Applied {
                action: Verb::Create,
                remote,
                written: true,
                event: Some(("Created", format!("created {name:?} at the backend"))),
            }),
            Err(BackendError::AlreadyExists { .. })
                if conn.spec.adopt_existing.unwrap_or(false) =>
            {
                let found = backend
                    .find(&desired.target)
                    .await?
                    .ok_or_else(|| Failure {
                        reason: Reason::BackendUnavailable,
                        message: format!("{name:?} was reported as existing but cannot be found"),
                        transient: true,
                        retry_after: None,
                    })?;
                let remote = backend.update(&found.id, desired).await?;
                let note = format!("adopted existing {name:?} (adoptExisting)");
                Ok(Applied {
                    action: Verb::Adopt,
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

    /// A drift check: gone → created again; changed outside → pushed again; rotated by the
    /// backend → recorded.
    async fn verify(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        backend: &dyn Backend,
        desired: &Desired,
        id: &str,
    ) -> Result<Applied, Stop> {
        let name = &desired.target.connection_name;
        let Some(remote) = backend.get(id, &desired.target).await? else {
            return self.recreate(env, conn, backend, desired).await;
        };
        let recorded = conn
            .status
            .as_ref()
            .and_then(|s| s.backend_credentials_hash.as_deref());
        let drift = verdict::drift(
            recorded,
            &remote,
            backend.content_differs(desired, &remote),
            backend.rotates_itself(desired),
        );
        match drift {
            Drift::InSync => Ok(Applied {
                action: Verb::Verify,
                remote,
                written: false,
                event: None,
            }),
            Drift::RotatedByBackend => Ok(Applied {
                action: Verb::RecordRotation,
                remote,
                written: false,
                event: Some((
                    "RotationRecorded",
                    format!(
                        "{name:?} credentials were rotated by the backend; recorded the new hash"
                    ),
                )),
            }),
            Drift::ChangedOutside => {
                let remote = backend.update(id, desired).await?;
                Ok(Applied {
                    action: Verb::DriftCorrect,
                    remote,
                    written: true,
                    event: Some((
                        "DriftCorrected",
                        format!(
                            "{name:?} was changed outside appconn; pushed the declared content again"
                        ),
                    )),
                })
            }
        }
    }

    /// The recorded object is gone: created again, through `create`, so a name someone else
    /// took meanwhile is refused (or adopted with `adoptExisting`) as on a first create.
    async fn recreate(
        &self,
        env: &dyn Environment,
        conn: &AppConnection,
        backend: &dyn Backend,
        desired: &Desired,
    ) -> Result<Applied, Stop> {
        let applied = self.create(env, conn, backend, desired, false).await?;
        if applied.action != Verb::Create {
            return Ok(applied);
        }
        let note = format!(
            "{:?} was gone from the backend; created it again",
            desired.target.connection_name
        );
        Ok(Applied {
            action: Verb::Recreate,
            event: Some(("Recreated", note)),
            ..applied
        })
    }
}

/// A connection test that failed for the content written stands, without a new test, until
/// that content changes.
fn keep_failed_test(conn: &AppConnection, desired: &Desired, obs: &mut Observation) {
    if let Some(message) = verdict::failed_test(conn.status.as_ref(), &desired.credentials_hash) {
        obs.ready = false;
        obs.reason = Reason::ConnectionTestFailed;
        obs.message = message.to_string();
    }
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
