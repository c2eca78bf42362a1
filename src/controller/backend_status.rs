//! The status of ConnectionBackends and ClusterConnectionBackends: a real auth and health check
//! of each backend (`Backend::check`: login, then `GET /api/status` for Infisical), written as
//! the `Ready` condition.
//!
//! A backend is checked when it changes, when one of its auth Secrets changes, and every few
//! minutes (jittered); a transient failure is retried with backoff. The status is written only
//! when something other than `lastCheckTime` changed, so a healthy backend costs no API write.
//! The check uses the same client as the backend's connections (one token, one login cool-down),
//! kept until the resource's generation or one of its auth Secrets changes.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{info, instrument, warn};

use super::backends::Clients;
use super::backoff::{Backoff, jitter};
use super::events::Recorder;
use super::written;
use crate::backend;
use crate::crd::{
    BackendKind, BackendProvider, BackendSecretKeySelector, ClusterConnectionBackend,
    ConnectionBackend, ConnectionBackendStatus, FIELD_MANAGER, Provider,
};
use crate::kube_error::describe;
use crate::reconcile::{BackendKey, BackendLookupError, Reason, ResolvedBackend, status};

/// How often a backend is checked again when nothing changed (jittered by ±10%).
const CHECK_EVERY: Duration = Duration::from_secs(5 * 60);
/// The condition type this controller maintains.
const READY: &str = "Ready";

/// What the status controllers need from the two backend kinds.
pub(super) trait BackendResource:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static
{
    const KIND: BackendKind;
    fn provider(&self) -> &BackendProvider;
    fn backend_status(&self) -> Option<&ConnectionBackendStatus>;
    /// The API to write the status through.
    fn api(client: Client, namespace: &str) -> Api<Self>;
    /// Where its auth Secrets are read: its own namespace for the namespaced kind, the
    /// namespace each reference names (None) for the cluster kind.
    fn secret_namespace(&self) -> Option<String>;
}

impl BackendResource for ConnectionBackend {
    const KIND: BackendKind = BackendKind::ConnectionBackend;
    fn provider(&self) -> &BackendProvider {
        &self.spec.provider
    }
    fn backend_status(&self) -> Option<&ConnectionBackendStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, namespace: &str) -> Api<Self> {
        Api::namespaced(client, namespace)
    }
    fn secret_namespace(&self) -> Option<String> {
        Some(self.namespace().unwrap_or_default())
    }
}

impl BackendResource for ClusterConnectionBackend {
    const KIND: BackendKind = BackendKind::ClusterConnectionBackend;
    fn provider(&self) -> &BackendProvider {
        &self.spec.provider
    }
    fn backend_status(&self) -> Option<&ConnectionBackendStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, _namespace: &str) -> Api<Self> {
        Api::all(client)
    }
    fn secret_namespace(&self) -> Option<String> {
        None
    }
}

pub(super) struct StatusContext {
    client: Client,
    recorder: Recorder,
    backoff: Backoff,
    clients: Arc<Clients>,
    /// uid -> transient check failures in a row.
    transient: Mutex<HashMap<String, u32>>,
    /// uid -> resourceVersion of the status this process last wrote: a cached copy with another
    /// version is read again before deciding (the watch can lag behind our own write).
    known: Mutex<HashMap<String, String>>,
}

/// A check that could not finish (the API failed): retried with backoff.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error("reading {0}: {reason}", reason = describe(.1))]
    Read(String, #[source] kube::Error),
    #[error("writing the status of {0}: {reason}", reason = describe(.1))]
    Write(String, #[source] kube::Error),
}

/// Transient failures of a backend's check in a row (throttling not counted) after which it is
/// reported not Ready: one timeout or 5xx says little about its health.
const UNHEALTHY_AFTER: u32 = 3;

/// When to look again.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Next {
    /// Every [`CHECK_EVERY`].
    Periodic,
    /// Transient failure: back off, at least `retry_after`.
    Backoff(Option<Duration>),
    /// Only when the resource or one of its Secrets changes.
    WaitForChange,
}

/// What a check concluded: a verdict to report, or none yet (the backend throttled the check,
/// or failed transiently fewer than [`UNHEALTHY_AFTER`] times in a row): the last verdict
/// stands and the check runs again.
enum Verdict {
    Report(Checked),
    Keep { why: String, next: Next },
}

/// What a check found.
#[derive(Clone, Debug)]
struct Checked {
    ready: bool,
    reason: Reason,
    /// Built from names and classified backend errors, never from a secret value.
    message: String,
    next: Next,
}

impl Checked {
    fn ok(message: String, next: Next) -> Self {
        Self {
            ready: true,
            reason: Reason::Synced,
            message,
            next,
        }
    }

    fn failed(reason: Reason, message: String, next: Next) -> Self {
        Self {
            ready: false,
            reason,
            message,
            next,
        }
    }
}

/// Runs the status controllers of both backend kinds, the namespaced kind once per scope
/// (`None`: all namespaces), until `shutdown` resolves. `secrets` names each touched Secret
/// (namespace, name), once the clients built from another version of it were dropped.
pub(super) async fn run(
    client: Client,
    clients: Arc<Clients>,
    scopes: Vec<Option<String>>,
    secrets: mpsc::UnboundedReceiver<(String, String)>,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let ctx = Arc::new(StatusContext {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "appconn".into(),
                instance: None,
            },
        ),
        backoff: Backoff::default(),
        clients: clients.clone(),
        transient: Mutex::new(HashMap::new()),
        known: Mutex::new(HashMap::new()),
    });

    let (cluster_tx, cluster_rx) = mpsc::unbounded_channel();
    let cluster = Controller::new(
        Api::<DeserializeGuard<ClusterConnectionBackend>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let cluster_store = cluster.store();
    let mut tasks = vec![drive(cluster, cluster_rx, ctx.clone(), shutdown.clone()).boxed()];
    let mut scoped = Vec::new();
    for scope in scopes {
        let (tx, rx) = mpsc::unbounded_channel();
        let api: Api<DeserializeGuard<ConnectionBackend>> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let controller = Controller::new(api, watcher::Config::default().any_semantic());
        scoped.push((controller.store(), tx));
        tasks.push(drive(controller, rx, ctx.clone(), shutdown.clone()).boxed());
    }
    // A touched Secret triggers the checks of the backends that read it.
    let triggers = UnboundedReceiverStream::new(secrets)
        .take_until(shutdown)
        .for_each(move |(namespace, name)| {
            for (store, tx) in &scoped {
                for backend in users(store, &namespace, &name) {
                    let _ = tx.send(backend);
                }
            }
            for backend in users(&cluster_store, &namespace, &name) {
                let _ = cluster_tx.send(backend);
            }
            future::ready(())
        });
    tasks.push(triggers.boxed());
    future::join_all(tasks).await;
}

/// Runs one status controller, also reconciling what `triggers` names.
async fn drive<K: BackendResource>(
    controller: Controller<DeserializeGuard<K>>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<DeserializeGuard<K>>>,
    ctx: Arc<StatusContext>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        .with_config(controller::Config::default().concurrency(4))
        .reconcile_on(UnboundedReceiverStream::new(triggers))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, ctx.clone())
        .for_each(|result| {
            match result {
                // A deleted backend's periodic check found it gone: drop its client.
                Err(controller::Error::ObjectNotFound(gone)) => {
                    let key = (
                        K::KIND,
                        gone.namespace.clone().unwrap_or_default(),
                        gone.name.clone(),
                    );
                    ctx.clients.remove(&key);
                }
                Err(e) => {
                    warn!(error = %crate::kube_error::describe_controller(&e), kind = K::KIND.as_str(), "backend status controller event")
                }
                Ok(_) => {}
            }
            future::ready(())
        })
        .await;
}

/// The backends in `store` that read Secret `namespace/name`.
fn users<K: BackendResource>(
    store: &Store<DeserializeGuard<K>>,
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<DeserializeGuard<K>>> {
    store
        .state()
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok())
        .filter(|backend| {
            let own = backend.secret_namespace();
            secret_refs(backend.provider()).iter().any(|r| {
                r.name == name && own.as_deref().or(r.namespace.as_deref()) == Some(namespace)
            })
        })
        .map(|backend| {
            let reference = ObjectRef::new(&backend.name_any());
            match backend.namespace() {
                Some(ns) => reference.within(&ns),
                None => reference,
            }
        })
        .collect()
}

/// Every Secret reference of a provider block.
fn secret_refs(provider: &BackendProvider) -> Vec<&BackendSecretKeySelector> {
    provider
        .provider()
        .map(Provider::secret_keys)
        .unwrap_or_default()
}

#[instrument(skip_all, fields(kind = K::KIND.as_str(), namespace = %obj.namespace().unwrap_or_default(), backend = %obj.name_any()))]
async fn reconcile<K: BackendResource>(
    obj: Arc<DeserializeGuard<K>>,
    ctx: Arc<StatusContext>,
) -> Result<Action, Error> {
    let Some(cached) =
        super::connections::readable(&ctx.recorder, &*obj, K::KIND.as_str(), "Check").await
    else {
        return Ok(Action::await_change());
    };
    let Some(backend) = ctx.latest(cached).await? else {
        return Ok(Action::await_change());
    };
    let uid = backend.uid().unwrap_or_default();
    let checked = match ctx.check(&backend).await {
        Verdict::Report(checked) => checked,
        Verdict::Keep { why, next } => {
            info!(detail = %why, "no verdict yet; the last one stands");
            return Ok(match next {
                Next::Backoff(Some(pause)) => Action::requeue(pause),
                _ => Action::requeue(ctx.backoff.next(&uid, None)),
            });
        }
    };
    let now = Timestamp::now();
    let prior = backend.backend_status();
    let status = next_status(prior, &backend, &checked, now);
    if !same_but_check_time(prior, &status) {
        ctx.write(&backend, &status).await?;
        let before = prior.and_then(ready_condition);
        let moved = before.is_none_or(|c| {
            c.status != ready_str(checked.ready) || c.reason != checked.reason.as_str()
        });
        if moved {
            info!(ready = checked.ready, reason = %checked.reason, detail = %checked.message, "backend checked");
            ctx.event(&backend, &checked).await;
        }
    }
    Ok(match checked.next {
        Next::Periodic => {
            ctx.backoff.reset(&uid);
            Action::requeue(jitter(CHECK_EVERY))
        }
        Next::Backoff(retry_after) => Action::requeue(ctx.backoff.next(&uid, retry_after)),
        Next::WaitForChange => {
            ctx.backoff.reset(&uid);
            Action::await_change()
        }
    })
}

fn error_policy<K: BackendResource>(
    obj: Arc<DeserializeGuard<K>>,
    error: &Error,
    ctx: Arc<StatusContext>,
) -> Action {
    warn!(backend = %obj.name_any(), error = %error, "backend check failed; retrying with backoff");
    Action::requeue(ctx.backoff.next(&obj.uid().unwrap_or_default(), None))
}

impl StatusContext {
    /// The cached copy if it is the latest this process knows of, else the one the API holds.
    async fn latest<K: BackendResource>(&self, cached: &K) -> Result<Option<K>, Error> {
        let uid = cached.uid().unwrap_or_default();
        let known = self.known.lock().expect("known lock").get(&uid).cloned();
        if known.is_none() || known == cached.resource_version() {
            return Ok(Some(cached.clone()));
        }
        let namespace = cached.namespace().unwrap_or_default();
        let latest = K::api(self.client.clone(), &namespace)
            .get_opt(&cached.name_any())
            .await
            .map_err(|e| Error::Read(cached.name_any(), e))?;
        let mut known = self.known.lock().expect("known lock");
        match (&latest, latest.as_ref().and_then(|l| l.resource_version())) {
            (Some(_), Some(rv)) => {
                known.insert(uid, rv);
            }
            _ => {
                known.remove(&uid);
            }
        }
        Ok(latest)
    }

    /// Checks the backend, and decides whether what it found is a verdict.
    async fn check<K: BackendResource>(&self, resource: &K) -> Verdict {
        let uid = resource.uid().unwrap_or_default();
        let checked = self.check_once(resource).await;
        let mut transient = self.transient.lock().expect("transient lock");
        match checked {
            Err(e) if e.is_throttled() => Verdict::Keep {
                why: e.to_string(),
                next: Next::Backoff(e.retry_after()),
            },
            Err(e) if e.is_transient() => {
                let failures = transient.entry(uid).or_insert(0);
                *failures += 1;
                if *failures < UNHEALTHY_AFTER {
                    Verdict::Keep {
                        why: format!("{e} ({failures} in a row)"),
                        next: Next::Backoff(None),
                    }
                } else {
                    let next = Next::Backoff(e.retry_after());
                    Verdict::Report(Checked::failed(e.reason(), e.to_string(), next))
                }
            }
            Err(e) => {
                transient.remove(&uid);
                // Refused credentials are tried again at the normal pace (the client holds a
                // refused grant back anyway); a Secret change brings a check with a new client.
                Verdict::Report(Checked::failed(
                    check_reason(&e),
                    e.to_string(),
                    Next::Periodic,
                ))
            }
            Ok(checked) => {
                transient.remove(&uid);
                Verdict::Report(checked)
            }
        }
    }

    /// Builds (or reuses) the client and checks the backend once: a verdict on the spec or the
    /// client, or the backend's answer.
    async fn check_once<K: BackendResource>(
        &self,
        resource: &K,
    ) -> Result<Checked, crate::backend::BackendError> {
        let provider = resource.provider();
        match provider.provider() {
            Err(message) => {
                return Ok(Checked::failed(
                    Reason::InvalidSpec,
                    message.into(),
                    Next::WaitForChange,
                ));
            }
            Ok(Provider::Builtin) => {
                return Ok(Checked::ok(
                    "the built-in store is part of the operator".into(),
                    Next::WaitForChange,
                ));
            }
            Ok(_) => {}
        }
        if let Err(e) = backend::check_spec(provider) {
            return Ok(Checked::failed(
                e.reason(),
                e.to_string(),
                Next::WaitForChange,
            ));
        }
        let key: BackendKey = (
            K::KIND,
            resource.namespace().unwrap_or_default(),
            resource.name_any(),
        );
        let version = match ResolvedBackend::new(
            key.clone(),
            resource.meta(),
            provider.clone(),
            resource.secret_namespace(),
        ) {
            Ok(version) => version,
            Err(e) => {
                return Ok(Checked::failed(
                    e.reason(),
                    e.to_string(),
                    Next::WaitForChange,
                ));
            }
        };
        let mut attempts = 0;
        let (backend, checked) = loop {
            attempts += 1;
            let backend = match self.clients.get(&version).await {
                Ok(backend) => backend,
                Err(e) => {
                    let next = match e {
                        BackendLookupError::Unavailable(_) => Next::Backoff(None),
                        // A missing Secret or key: its watch brings the next check.
                        _ => Next::WaitForChange,
                    };
                    return Ok(Checked::failed(e.reason(), e.to_string(), next));
                }
            };
            let checked = backend.check().await;
            // An auth Secret changed while the check ran: its verdict is about the old content,
            // so check again with a client built from the new one instead of reporting it.
            if checked.is_err() && attempts < 2 && !self.clients.is_current(&key, &backend) {
                continue;
            }
            break (backend, checked);
        };
        checked.map(|()| {
            Checked::ok(
                format!(
                    "{} accepted the credentials and is healthy",
                    backend.provider()
                ),
                Next::Periodic,
            )
        })
    }

    async fn write<K: BackendResource>(
        &self,
        resource: &K,
        status: &ConnectionBackendStatus,
    ) -> Result<(), Error> {
        let body = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let written = written::patch(
            &self.client,
            resource,
            Some("status"),
            &params,
            &Patch::Apply(body),
        )
        .await
        .map_err(|e| Error::Write(resource.name_any(), e))?;
        if let Some((uid, rv)) = written {
            self.known.lock().expect("known lock").insert(uid, rv);
        }
        Ok(())
    }

    async fn event<K: BackendResource>(&self, resource: &K, checked: &Checked) {
        let event = KubeEvent {
            type_: if checked.ready {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: checked.reason.as_str().into(),
            note: Some(checked.message.clone()),
            action: "Check".into(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &resource.object_ref(&()))
            .await
        {
            warn!(error = %describe(&e), "cannot record an Event");
        }
    }
}

/// A failed check as the backend resource's reason: refused credentials and outages keep
/// theirs; anything else the server refused (a project that does not exist, a URL with no API
/// behind it) means the backend is not ready for its connections.
fn check_reason(e: &backend::BackendError) -> Reason {
    match e {
        backend::BackendError::Rejected { .. } | backend::BackendError::NotFound => {
            Reason::BackendNotReady
        }
        other => other.reason(),
    }
}

fn ready_str(ready: bool) -> &'static str {
    if ready { "True" } else { "False" }
}

fn ready_condition(status: &ConnectionBackendStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == READY)
}

/// The status after a check: the Ready condition replaced (`lastTransitionTime` moves only when
/// its status moves), other conditions kept.
fn next_status<K: BackendResource>(
    prior: Option<&ConnectionBackendStatus>,
    resource: &K,
    checked: &Checked,
    now: Timestamp,
) -> ConnectionBackendStatus {
    let generation = resource.meta().generation;
    let mut conditions = prior.map(|p| p.conditions.clone()).unwrap_or_default();
    status::set_ready(
        &mut conditions,
        checked.ready,
        checked.reason,
        &checked.message,
        generation,
        now,
    );
    ConnectionBackendStatus {
        type_: resource
            .provider()
            .provider()
            .ok()
            .map(|p| p.type_().as_str().to_string()),
        last_check_time: Some(Time(now)),
        observed_generation: generation,
        conditions,
    }
}

/// Whether two statuses differ in nothing but `lastCheckTime`.
fn same_but_check_time(
    prior: Option<&ConnectionBackendStatus>,
    next: &ConnectionBackendStatus,
) -> bool {
    let Some(prior) = prior else {
        return false;
    };
    let strip = |s: &ConnectionBackendStatus| ConnectionBackendStatus {
        last_check_time: None,
        ..s.clone()
    };
    strip(prior) == strip(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(generation: i64) -> ConnectionBackend {
        let mut b: ConnectionBackend = serde_json::from_value(json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
            "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"infisical": {"url": "https://infisical.example", "auth": {"universalAuth": {
                "clientId": {"secretKeyRef": {"name": "mi", "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": "mi", "key": "clientSecret"}}}}}},
        }))
        .unwrap();
        b.metadata.generation = Some(generation);
        b
    }

    #[test]
    fn only_a_real_change_is_a_change() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let ok = Checked::ok("fine".into(), Next::Periodic);
        let first = next_status(None, &backend(1), &ok, t0);
        assert!(!same_but_check_time(None, &first));
        assert_eq!(first.type_.as_deref(), Some("infisical"));
        let again = next_status(Some(&first), &backend(1), &ok, t1);
        assert!(
            same_but_check_time(Some(&first), &again),
            "only the check time moved"
        );
        assert_eq!(again.conditions[0].last_transition_time, Time(t0));

        let newer = next_status(Some(&first), &backend(2), &ok, t1);
        assert!(
            !same_but_check_time(Some(&first), &newer),
            "generation moved"
        );

        let refused = Checked::failed(Reason::BackendAuthFailed, "no".into(), Next::Periodic);
        let failed = next_status(Some(&first), &backend(1), &refused, t1);
        assert!(!same_but_check_time(Some(&first), &failed));
        assert_eq!(failed.conditions.len(), 1);
        assert_eq!(failed.conditions[0].status, "False");
        assert_eq!(failed.conditions[0].reason, "BackendAuthFailed");
        assert_eq!(failed.conditions[0].last_transition_time, Time(t1));
    }

    #[test]
    fn a_refused_check_is_not_ready_unless_it_is_about_credentials_or_an_outage() {
        use backend::BackendError;
        let rejected = BackendError::Rejected {
            message: "no project".into(),
        };
        let auth = BackendError::Auth {
            message: "refused".into(),
        };
        let down = BackendError::Unavailable {
            message: "timed out".into(),
            retry_after: None,
        };
        assert_eq!(check_reason(&rejected), Reason::BackendNotReady);
        assert_eq!(
            check_reason(&BackendError::NotFound),
            Reason::BackendNotReady
        );
        assert_eq!(check_reason(&auth), Reason::BackendAuthFailed);
        assert_eq!(check_reason(&down), Reason::BackendUnavailable);
    }

    #[test]
    fn secret_users_by_kind() {
        let b = backend(1);
        let refs = secret_refs(b.provider());
        assert_eq!(refs.len(), 2);
        assert!(refs.iter().all(|r| r.name == "mi"));
        assert_eq!(b.secret_namespace().as_deref(), Some("ns"));
    }
}
