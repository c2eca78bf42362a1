//! The AppConnection controller: one reconcile through the shared core, the requeue policy,
//! metrics and the reference index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType as KubeEventType};
use kube::{Client, ResourceExt};
use tracing::{info, instrument, warn};

use super::backends::Registry;
use super::backoff::{Backoff, jitter};
use super::cached::{CachedConnection, Guarded};
use super::events::Recorder;
use super::index::RefIndex;
use super::kube_env::KubeEnv;
use super::secrets::SecretVersions;
use crate::crd::{AppConnection, AppConnectionStatus, parse_duration};
use crate::kube_error::describe;
use crate::metrics::{Metrics, ReadinessLabels};
use crate::reconcile::{EnvError, Options, Reason, Reconciler, Requeue, Verb, plan, status};

/// Shared by every reconcile; built once.
pub struct Context {
    pub client: Client,
    pub reconciler: Reconciler,
    pub registry: Registry,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub index: RefIndex,
    pub backoff: Backoff,
    /// The resourceVersions of the Secrets of the watched scopes.
    pub secrets: SecretVersions,
    /// Default drift-check interval when a connection sets none.
    pub default_refresh: Duration,
    /// uid -> what this process remembers of the object.
    pub tracked: Mutex<HashMap<String, Tracked>>,
    /// uid -> when this process saw the object go. The cache may still hold a copy for a
    /// moment; acting on it would repeat the backend delete.
    pub gone: Mutex<HashMap<String, Instant>>,
}

/// What this process remembers of one AppConnection.
#[derive(Default)]
pub struct Tracked {
    /// The resourceVersion of the latest copy this process wrote or read. The watch cache can
    /// lag behind the operator's own writes: a cached copy with another version is checked
    /// against the API before anything is decided on it...
    latest: Option<String>,
    /// ...except one of the versions this process wrote before its latest write: that write's
    /// own event follows and brings the next reconcile.
    superseded: Vec<String>,
    /// When the backend object was last read or written, for drift checks.
    verified: Option<Instant>,
    /// Readiness last counted in the `connections` gauge.
    counted: Option<(bool, Reason)>,
    /// What the last reconcile read when it ended Ready: while none of it moved, a reconcile
    /// (its own status write's event, a requeue) has nothing to do.
    settled: Option<Settled>,
}

/// The inputs of a reconcile that ended Ready.
struct Settled {
    generation: Option<i64>,
    /// The status it wrote or kept, hashed.
    status: u64,
    /// The Secrets it read, at the versions it read them (None: missing).
    secrets: Vec<(String, Option<String>)>,
    /// The backend resource's uid and generation (None: the built-in store).
    backend: Option<(String, i64)>,
}

/// How far a cached copy can be trusted.
enum Copy {
    /// The latest this process knows of (or the API's, read again).
    Current(Box<AppConnection>),
    /// A version this process wrote before its latest write: the latest's event follows.
    Superseded,
    /// The object is gone.
    Gone,
}

/// At most this many superseded versions are remembered per object (a reconcile writes two).
const SUPERSEDED: usize = 4;

impl Context {
    /// Remembers `conn` as the latest known version of its object.
    pub fn saw(&self, conn: &AppConnection) {
        if let Some((uid, rv)) = conn.uid().zip(conn.resource_version()) {
            self.wrote(None, uid, rv);
        }
    }

    /// Remembers version `rv` of the object `uid`, which this process wrote over `base`, as
    /// the latest known: `base` and the version known before are superseded by it.
    pub fn wrote(&self, base: Option<&AppConnection>, uid: String, rv: String) {
        let mut tracked = self.tracked.lock().expect("tracked lock");
        let entry = tracked.entry(uid).or_default();
        let previous = entry.latest.replace(rv.clone());
        for old in [previous, base.and_then(|b| b.resource_version())]
            .into_iter()
            .flatten()
        {
            if old != rv && !entry.superseded.contains(&old) {
                if entry.superseded.len() == SUPERSEDED {
                    entry.superseded.remove(0);
                }
                entry.superseded.push(old);
            }
        }
    }

    /// The cached copy if it is the latest this process knows of, else the one the API holds.
    pub(super) async fn latest(
        &self,
        cached: &AppConnection,
    ) -> Result<Option<AppConnection>, EnvError> {
        match self.current(cached, false).await? {
            Copy::Current(conn) => Ok(Some(*conn)),
            Copy::Superseded | Copy::Gone => Ok(None),
        }
    }

    /// How far `cached` can be trusted; with `skip_superseded`, a superseded copy is not read
    /// again (its newer version's event is on its way).
    async fn current(
        &self,
        cached: &AppConnection,
        skip_superseded: bool,
    ) -> Result<Copy, EnvError> {
        let uid = cached.uid().unwrap_or_default();
        let rv = cached.resource_version();
        let (latest, superseded) = {
            let mut tracked = self.tracked.lock().expect("tracked lock");
            let entry = tracked.get_mut(&uid);
            match entry {
                // The cache has caught up with the latest write: it never goes back to an
                // older version, so the superseded ones need not be remembered any more.
                Some(e) if e.latest.is_some() && e.latest == rv => {
                    e.superseded = Vec::new();
                    (e.latest.clone(), false)
                }
                Some(e) => (
                    e.latest.clone(),
                    rv.as_ref().is_some_and(|rv| e.superseded.contains(rv)),
                ),
                None => (None, false),
            }
        };
        let gone = self.gone.lock().expect("gone lock").contains_key(&uid);
        if !gone && (latest.is_none() || latest == rv) {
            return Ok(Copy::Current(Box::new(cached.clone())));
        }
        if !gone && skip_superseded && superseded {
            return Ok(Copy::Superseded);
        }
        let api: kube::Api<AppConnection> =
            kube::Api::namespaced(self.client.clone(), &cached.namespace().unwrap_or_default());
        let latest = api.get_opt(&cached.name_any()).await.map_err(|e| {
            EnvError::new(format!("reading {}", cached.name_any()), describe(&e), e)
        })?;
        Ok(match latest {
            Some(latest) => {
                self.saw(&latest);
                Copy::Current(Box::new(latest))
            }
            None => {
                if let Some(entry) = self.tracked.lock().expect("tracked lock").get_mut(&uid) {
                    entry.latest = None;
                }
                Copy::Gone
            }
        })
    }

    /// Whether nothing the last Ready reconcile of `conn` read has moved since: the same
    /// generation and status, the same versions of its Secrets and its backend resource.
    fn settled(&self, conn: &AppConnection, uid: &str) -> bool {
        if conn.metadata.deletion_timestamp.is_some() {
            return false;
        }
        let namespace = conn.namespace().unwrap_or_default();
        let tracked = self.tracked.lock().expect("tracked lock");
        let Some(settled) = tracked.get(uid).and_then(|t| t.settled.as_ref()) else {
            return false;
        };
        settled.generation == conn.metadata.generation
            && settled.status == status_hash(conn.status.as_ref())
            && settled.backend == self.registry.backend_version(conn)
            && settled
                .secrets
                .iter()
                .all(|(name, version)| self.secrets.get(&namespace, name) == *version)
    }
}

/// A hash of a status as JSON: equal content, equal hash.
fn status_hash(status: Option<&AppConnectionStatus>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&status)
        .expect("a status serializes")
        .hash(&mut hasher);
    hasher.finish()
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
pub async fn reconcile(obj: Arc<CachedConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(conn) = readable(&ctx.recorder, &*obj, "AppConnection", "Reconcile").await else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let conn = match ctx.current(conn, true).await? {
        Copy::Current(conn) => conn,
        // The event of the newer version this process wrote brings the next reconcile.
        Copy::Superseded | Copy::Gone => return Ok(Action::await_change()),
    };
    let conn = &conn;
    let uid = conn.uid().unwrap_or_default();
    ctx.index.update(conn);
    let refresh = refresh_interval(conn, ctx.default_refresh);
    let now = Instant::now();
    let due = |verified: Option<Instant>| {
        refresh.and_then(|every| verified.map(|at| (at + every).saturating_duration_since(now)))
    };
    let verified = {
        let mut tracked = ctx.tracked.lock().expect("tracked lock");
        let entry = tracked.entry(uid.clone()).or_default();
        if entry.verified.is_none()
            && let Some(every) = refresh
            && ready_now(conn)
        {
            // Seen Ready for the first time by this process (a restart): its drift check comes
            // at a random point of the interval, so a restart does not read every backend
            // object at once.
            entry.verified = Some(now - every.mul_f64(rand::random_range(0.0..1.0)));
        }
        entry.verified
    };
    let verify = refresh.is_some() && due(verified).is_none_or(|left| left.is_zero());
    if !verify && !plan::rotation_due(conn, Timestamp::now()) && ctx.settled(conn, &uid) {
        // Nothing it read moved: no API or backend call. Back when the drift check or the
        // rotation is due.
        let wake = [due(verified), next_rotation_in(conn.status.as_ref())]
            .into_iter()
            .flatten()
            .min();
        return Ok(match wake {
            Some(left) => Action::requeue(left.max(Duration::from_millis(10))),
            None => Action::await_change(),
        });
    }
    let env = KubeEnv::new(ctx.clone());
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
    let checked_at = {
        let mut tracked = ctx.tracked.lock().expect("tracked lock");
        let entry = tracked.entry(uid.clone()).or_default();
        if outcome.action.touched_backend() {
            entry.verified = Some(Instant::now());
        }
        // A reconcile that ended Ready (so it resolved the credentials): its inputs, to skip
        // the next one while none of them moves.
        entry.settled = match &outcome.status {
            Some(status) if outcome.ready => Some(Settled {
                generation: conn.metadata.generation,
                status: status_hash(Some(status)),
                secrets: env.secrets_read(),
                backend: ctx.registry.backend_version(conn),
            }),
            _ => None,
        };
        entry.verified
    };
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
            let rotation = next_rotation_in(outcome.status.as_ref().or(conn.status.as_ref()));
            // A pass that did not reach the backend keeps the check already due (after a
            // restart, a random point of the interval); one that did starts a new interval.
            let check = every.map(|every| match checked_at {
                Some(at) if !outcome.action.touched_backend() => (at + every)
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
                _ => jitter(every),
            });
            match (check, rotation) {
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
pub(super) async fn readable<'a, G: Guarded>(
    recorder: &Recorder,
    object: &'a G,
    kind: &str,
    action: &str,
) -> Option<&'a G::Object> {
    let invalid = match object.parsed() {
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
fn next_rotation_in(status: Option<&AppConnectionStatus>) -> Option<Duration> {
    let at = status?.rotation.as_ref()?.next_rotation_at.as_ref()?.0;
    let until = at.duration_since(Timestamp::now());
    Some(
        Duration::try_from(until)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1)),
    )
}

pub fn error_policy(obj: Arc<CachedConnection>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(appconnection = %obj.name_any(), error = %error, "reconcile failed; retrying with backoff");
    Action::requeue(ctx.backoff.next(&obj.uid().unwrap_or_default(), None))
}

/// Ready for its current generation, as the status says.
fn ready_now(conn: &AppConnection) -> bool {
    status::ready_condition(conn.status.as_ref())
        .is_some_and(|c| c.status == "True" && c.observed_generation == conn.metadata.generation)
}

fn count_readiness(ctx: &Context, uid: &str, ready: bool, reason: Reason) {
    let previous = {
        let mut tracked = ctx.tracked.lock().expect("tracked lock");
        let entry = tracked.entry(uid.to_string()).or_default();
        entry.counted.replace((ready, reason))
    };
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
    let tracked = ctx.tracked.lock().expect("tracked lock").remove(uid);
    let mut gone = ctx.gone.lock().expect("gone lock");
    // A cached copy lingers for moments only: old entries are dropped as new ones come.
    if gone.len() >= 1024 {
        gone.retain(|_, at| at.elapsed() < Duration::from_secs(300));
    }
    gone.insert(uid.to_string(), Instant::now());
    drop(gone);
    ctx.backoff.reset(uid);
    if let Some((ready, reason)) = tracked.and_then(|t| t.counted) {
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
