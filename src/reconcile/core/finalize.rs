//! A deleted resource: under `Delete` the backend object goes first (404 counts as gone),
//! then the finalizer; under `Orphan`, or when nothing was ever created, only the finalizer.

use super::{
    EnvError, Environment, Failure, Options, Outcome, Reconciler, Requeue, Verb, observation,
};
use crate::crd::{AppConnection, CREATE_PENDING, DeletionPolicy, FINALIZER};
use crate::reconcile::plan;

impl Reconciler {
    pub(super) async fn finalize(
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
            return Ok(Outcome::released(Verb::Release));
        }
        let id = conn.status.as_ref().and_then(|s| s.id.clone());
        let pending = conn
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(CREATE_PENDING));
        let must_delete =
            conn.deletion_policy() == DeletionPolicy::Delete && (id.is_some() || pending);
        if opts.dry_run {
            let verb = if must_delete {
                Verb::Delete
            } else {
                Verb::Release
            };
            return Ok(Outcome::released(verb));
        }
        if !must_delete {
            env.release(conn).await?;
            return Ok(Outcome::released(Verb::Release));
        }
        let (backend, info) = match env.backend(conn).await {
            Ok(found) => found,
            Err(e) => {
                let message = format!(
                    "cannot delete the backend object: {e}; the finalizer stays until it can"
                );
                let obs = observation(false, e.reason(), message);
                let requeue = Requeue::Backoff { retry_after: None };
                return self.failed(env, conn, None, obs, requeue, opts).await;
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
                    ..Outcome::released(Verb::Delete)
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
}
