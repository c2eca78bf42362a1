//! The AppConnection controller: one reconcile through the shared core, the requeue policy,
//! metrics and the reference index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType as KubeEventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, instrument, warn};

use super::backends::Registry;
use super::backoff::{Backoff, jitter};
use super::index::RefIndex;
use super::kube_env::KubeEnv;
use crate::crd::{AppConnection, parse_duration};
use crate::kube_error::describe;
use crate::metrics::{Metrics, ReadinessLabels};
use crate::reconcile::{EnvError, Options, Reason, Reconciler, Requeue, Verb};

/// Shared by every reconcile; built once.
pub struct Context {
    pub client: Client,
    pub reconciler: Reconciler,
    pub registry: Registry,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub index: RefIndex,
    pub backoff: Backoff,
    /// Default drift-check interval when a connection sets none.
    pub default_refresh: Duration,
    /// uid -> when the backend object was last read or written, for drift checks.
    pub verified: Mutex<HashMap<String, Instant>>,
    /// uid -> readiness last counted in the `connections` gauge.
    pub readiness: Mutex<HashMap<String, (bool, Reason)>>,
    /// uid -> resourceVersion of the latest copy this process wrote or read. The watch cache
    /// can lag behind the operator's own writes; a cached copy with another version is checked
    /// against the API before anything is decided on it.
    pub known: Mutex<HashMap<String, String>>,
    /// uid -> when this process saw the object go. The cache may still hold a copy for a
    /// moment; acting on it would repeat the backend delete.
    pub gone: Mutex<HashMap<String, Instant>>,
}

impl Context {
    /// Remembers `conn` as the latest known version of its object.
    pub fn saw(&self, conn: &AppConnection) {
        if let (Some(uid), Some(rv)) = (conn.uid(), conn.resource_version()) {
            self.known.lock().expect("known lock").insert(uid, rv);
        }
    }

    /// The cached copy if it is the latest this process knows of, else the one the API holds.
    pub(super) async fn latest(
        &self,
        cached: &AppConnection,
    ) -> Result<Option<AppConnection>, EnvError> {
        let uid = cached.uid().unwrap_or_default();
        let known = self.known.lock().expect("known lock").get(&uid).cloned();
        let gone = self.gone.lock().expect("gone lock").contains_key(&uid);
        if !gone && (known.is_none() || known == cached.resource_version()) {
            return Ok(Some(cached.clone()));
        }
        let api: kube::Api<AppConnection> =
            kube::Api::namespaced(self.client.clone(), &cached.namespace().unwrap_or_default());
        let latest = api.get_opt(&cached.name_any()).await.map_err(|e| {
            EnvError::new(format!("reading {}", cached.name_any()), describe(&e), e)
        })?;
        match &latest {
            Some(latest) => self.saw(latest),
            None => {
                self.known.lock().expect("known lock").remove(&uid);
            }
        }
        Ok(latest)
    }
}

/// A reconcile that could not finish: retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(#[from] EnvError);

fn refresh_interval(conn: &AppConnection, default: Duration) -> Option<Duration> {
    match conn.spec.refresh_interval.as_deref() {
        None => Some(default),
        Some("0") => None,
        Some(text) => parse_duration(text).or(Some(default)),
    }
}

#[instrument(skip_all, fields(namespace = %obj.namespace().unwrap_or_default(), appconnection = %obj.name_any()))]
pub async fn reconcile(
    obj: Arc<DeserializeGuard<AppConnection>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let Some(conn) = readable(&ctx.recorder, &obj, "AppConnection", "Reconcile").await else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let Some(latest) = ctx.latest(conn).await? else {
        return Ok(Action::await_change());
    };
    let conn = &latest;
    let uid = conn.uid().unwrap_or_default();
    ctx.index.update(conn);
    let refresh = refresh_interval(conn, ctx.default_refresh);
    let verify = refresh.is_some_and(|every| {
        ctx.verified
            .lock()
            .expect("verified lock")
            .get(&uid)
            .is_none_or(|at| at.elapsed() >= every)
    });
    let env = KubeEnv { ctx: ctx.clone() };
    let opts = Options {
        verify,
        dry_run: false,
        now: Timestamp::now(),
        refresh,
    };
    let outcome = match ctx.reconciler.reconcile(&env, conn, opts).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // The Kubernetes API failed, not the backend: its own label.
            ctx.metrics.observe_api_error(started.elapsed());
            return Err(e.into());
        }
    };
    if outcome.action.touched_backend() {
        ctx.verified
            .lock()
            .expect("verified lock")
            .insert(uid.clone(), Instant::now());
    }
    // Condition messages name objects and fields, never values: safe to log.
    if outcome.action != Verb::Noop {
        info!(action = outcome.action.as_str(), reason = %outcome.reason, detail = %outcome.message, "reconciled");
    }
    let result = if outcome.ready {
        if outcome.action == Verb::Noop {
            "noop"
        } else {
            "ok"
        }
    } else {
        "error"
    };
    ctx.metrics
        .observe_reconcile(result, outcome.reason, started.elapsed());
    if outcome.status.is_none() {
        forget(&ctx, conn, &uid);
    } else {
        count_readiness(&ctx, &uid, outcome.ready, outcome.reason);
    }

    let key = uid;
    Ok(match outcome.requeue {
        Requeue::After(every) => {
            ctx.backoff.reset(&key);
            let rotation = next_rotation_in(conn, &outcome);
            match (every.map(jitter), rotation) {
                (Some(a), Some(b)) => Action::requeue(a.min(b)),
                (Some(a), None) | (None, Some(a)) => Action::requeue(a),
                (None, None) => Action::await_change(),
            }
        }
        Requeue::Backoff { retry_after } => Action::requeue(ctx.backoff.next(&key, retry_after)),
        // Spread over a fifth of the pause, so the connections a pause held back do not all
        // come back at its end at once.
        Requeue::Throttled { retry_after } => {
            Action::requeue(retry_after.mul_f64(1.0 + rand::random_range(0.0..0.2)))
        }
        Requeue::WaitForChange => {
            ctx.backoff.reset(&key);
            Action::await_change()
        }
    })
}

/// The resource a watch delivered, or None for one that does not parse: a Warning Event on
/// it, then nothing until it changes.
pub(super) async fn readable<'a, K>(
    recorder: &Recorder,
    object: &'a DeserializeGuard<K>,
    kind: &str,
    action: &str,
) -> Option<&'a K>
where
    K: Resource<DynamicType = ()>,
{
    let invalid = match &object.0 {
        Ok(readable) => return Some(readable),
        Err(invalid) => invalid,
    };
    warn!(error = %invalid, kind, "resource cannot be read; waiting for a change");
    let event = KubeEvent {
        type_: KubeEventType::Warning,
        reason: Reason::InvalidSpec.as_str().into(),
        note: Some(format!("cannot read the {kind}: {invalid}")),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        warn!(error = %describe(&e), "cannot record an Event");
    }
    None
}

/// Time until the recorded next rotation, so an overdue rotation is noticed when it is due.
fn next_rotation_in(conn: &AppConnection, outcome: &crate::reconcile::Outcome) -> Option<Duration> {
    let status = outcome.status.as_ref().or(conn.status.as_ref())?;
    let at = status.rotation.as_ref()?.next_rotation_at.as_ref()?.0;
    let until = at.duration_since(Timestamp::now());
    Some(
        Duration::try_from(until)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1)),
    )
}

pub fn error_policy(
    obj: Arc<DeserializeGuard<AppConnection>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    warn!(appconnection = %obj.name_any(), error = %error, "reconcile failed; retrying with backoff");
    Action::requeue(ctx.backoff.next(&obj.uid().unwrap_or_default(), None))
}

fn count_readiness(ctx: &Context, uid: &str, ready: bool, reason: Reason) {
    let mut seen = ctx.readiness.lock().expect("readiness lock");
    let previous = seen.insert(uid.to_string(), (ready, reason));
    if previous == Some((ready, reason)) {
        return;
    }
    if let Some((was_ready, was_reason)) = previous {
        ctx.metrics
            .connections
            .get_or_create(&labels(was_ready, was_reason))
            .dec();
    }
    ctx.metrics
        .connections
        .get_or_create(&labels(ready, reason))
        .inc();
}

fn forget(ctx: &Context, conn: &AppConnection, uid: &str) {
    ctx.index
        .remove(&conn.namespace().unwrap_or_default(), &conn.name_any());
    ctx.verified.lock().expect("verified lock").remove(uid);
    ctx.known.lock().expect("known lock").remove(uid);
    let mut gone = ctx.gone.lock().expect("gone lock");
    // A cached copy lingers for moments only: old entries are dropped as new ones come.
    if gone.len() >= 1024 {
        gone.retain(|_, at| at.elapsed() < Duration::from_secs(300));
    }
    gone.insert(uid.to_string(), Instant::now());
    drop(gone);
    ctx.backoff.reset(uid);
    if let Some((ready, reason)) = ctx.readiness.lock().expect("readiness lock").remove(uid) {
        ctx.metrics
            .connections
            .get_or_create(&labels(ready, reason))
            .dec();
    }
}

fn labels(ready: bool, reason: Reason) -> ReadinessLabels {
    ReadinessLabels {
        ready: if ready { "true" } else { "false" },
        reason: reason.as_str(),
    }
}
