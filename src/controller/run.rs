//! Wiring: caches, watches and the controllers, started once the CRDs exist.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{info, warn};

use super::backends::{Clients, Registry};
use super::cached::CachedConnection;
use super::connections::{self, Context};
use super::events::Recorder;
use super::index::RefIndex;
use super::secrets::SecretVersions;
use crate::backend::{Backend, Factory};
use crate::crd::{
    AppConnection, BackendKind, CREATE_PENDING, ClusterConnectionBackend, ConnectionBackend,
};
use crate::keys::HashKey;
use crate::kube_error::{describe, describe_controller, describe_watch};
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;

/// What the controller needs from the process.
pub struct ControllerConfig {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    pub default_refresh: Duration,
    pub hash_key: Arc<HashKey>,
    pub builtin: Arc<dyn Backend>,
    pub metrics: Arc<Metrics>,
    /// Told `true` once the CRDs exist and every watch has listed.
    pub on_ready: Arc<dyn Fn(bool) + Send + Sync>,
}

type Conn = CachedConnection;

/// Waits until the AppConnection CRD is served, checking every few seconds.
pub async fn wait_for_crds(client: &Client) {
    let api: Api<AppConnection> = Api::all(client.clone());
    let mut logged = false;
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                if !logged {
                    warn!("the AppConnection CRD is not installed yet; waiting (install crds/)");
                    logged = true;
                }
            }
            Err(e) => warn!(error = %describe(&e), "cannot list AppConnections yet; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs the controllers until `shutdown` resolves.
pub async fn run_controllers(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    tokio::select! {
        () = wait_for_crds(&client) => {}
        () = shutdown.clone() => return,
    }
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };

    // Caches of the backend resources and namespaces, each fed by its own watch.
    let mut backend_stores = Vec::new();
    let mut cache_tasks = Vec::new();
    let (backend_tx, backend_rx) = mpsc::unbounded_channel::<(BackendKind, String, String)>();
    for scope in &scopes {
        let api: Api<ConnectionBackend> = scoped(&client, scope.as_deref());
        let (store, task) = cache(
            api,
            Some((BackendKind::ConnectionBackend, backend_tx.clone())),
        );
        backend_stores.push(store);
        cache_tasks.push(task);
    }
    let (cluster_store, task) = cache(
        Api::<ClusterConnectionBackend>::all(client.clone()),
        Some((BackendKind::ClusterConnectionBackend, backend_tx.clone())),
    );
    cache_tasks.push(task);
    let (namespace_store, task) = cache(Api::<Namespace>::all(client.clone()), None);
    cache_tasks.push(task);
    drop(backend_tx);
    // Sent once the backend and namespace caches have listed, or a shutdown began.
    let (listed, listed_rx) = watch::channel(false);
    let factory = Factory::new(config.builtin.clone(), config.metrics.clone());
    let clients = Arc::new(Clients::new(client.clone(), factory));
    // Touched Secrets, from the one Secret watch per scope below, for the backend checks.
    let (backend_secrets, backend_secrets_rx) = mpsc::unbounded_channel();
    // The backends' own Ready condition (auth + health check), which the Registry heeds.
    cache_tasks.push(
        super::backend_status::run(
            client.clone(),
            clients.clone(),
            scopes.clone(),
            backend_secrets_rx,
            shutdown.clone(),
        )
        .boxed(),
    );

    let reporter = Reporter {
        controller: "appconn".into(),
        instance: None,
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        reconciler: Reconciler::new(config.hash_key.clone()),
        registry: Registry::new(
            clients,
            backend_stores.clone(),
            cluster_store.clone(),
            namespace_store.clone(),
            listed_rx,
        ),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: config.metrics.clone(),
        index: RefIndex::default(),
        backoff: Default::default(),
        default_refresh: config.default_refresh,
        secrets: SecretVersions::default(),
        tracked: Mutex::new(HashMap::new()),
        gone: Mutex::new(HashMap::new()),
    });

    // Backend and Secret changes reach the connections that use them, in whichever controller
    // runs them.
    let mut triggers = HashMap::new();
    let mut controllers = Vec::new();
    let mut readers: Vec<Store<Conn>> = Vec::new();
    for scope in &scopes {
        let (tx, rx) = mpsc::unbounded_channel::<ObjectRef<Conn>>();
        triggers.insert(scope.clone(), tx.clone());
        let conns: Api<Conn> = scoped(&client, scope.as_deref());
        cache_tasks.push(
            secret_watch(
                scope.clone(),
                scoped(&client, scope.as_deref()),
                ctx.clone(),
                tx,
                backend_secrets.clone(),
                shutdown.clone(),
            )
            .boxed(),
        );
        // The cache keeps every AppConnection, slimmed (see `slim`). The initial list comes in
        // pages of 100, so the whole list is never held at once with all that is dropped still
        // in it (with pages of 500 a restart over 10,000 connections ended 6 MiB larger).
        let (reader, writer) = reflector::store::<Conn>();
        let conn_events = watcher(conns, watcher::Config::default().page_size(100))
            .modify(slim)
            .reflect(writer)
            .applied_objects();
        let controller = Controller::for_stream(conn_events, reader)
            .with_config(controller::Config::default().concurrency(config.concurrency))
            .reconcile_on(UnboundedReceiverStream::new(rx))
            .graceful_shutdown_on(shutdown.clone());
        readers.push(controller.store());
        let ctx = ctx.clone();
        controllers.push(
            controller
                .run(connections::reconcile, connections::error_policy, ctx)
                .for_each(|result| {
                    if let Err(e) = result {
                        warn!(error = %describe_controller(&e), "controller event");
                    }
                    future::ready(())
                })
                .boxed(),
        );
    }
    drop(backend_secrets);

    let route_ctx = ctx.clone();
    let router = UnboundedReceiverStream::new(backend_rx).for_each(move |(kind, ns, name)| {
        for (conn_ns, conn_name) in route_ctx.index.for_backend(kind, &ns, &name) {
            let target = triggers
                .get(&Some(conn_ns.clone()))
                .or_else(|| triggers.get(&None));
            if let Some(tx) = target {
                let _ = tx.send(ObjectRef::new(&conn_name).within(&conn_ns));
            }
        }
        future::ready(())
    });

    // kube-runtime holds a controller's runner until its cache has listed, even once shutdown
    // began; a shutdown that cuts the initial list short would wait for ever. Such a controller
    // has reconciled nothing yet, so it is simply dropped.
    let unsynced = readers.clone();
    let release = listed.clone();
    let cut_short = shutdown.clone().then(move |()| async move {
        // Lookups still waiting for the backend caches go on: nothing will list them now.
        let _ = release.send(true);
        if unsynced
            .iter()
            .all(|store| store.wait_until_ready().now_or_never().is_some())
        {
            future::pending::<()>().await;
        }
        info!("shutdown before the caches synced; stopping at once");
    });

    let on_ready = config.on_ready.clone();
    let readiness = async move {
        for store in &backend_stores {
            let _ = store.wait_until_ready().await;
        }
        let _ = cluster_store.wait_until_ready().await;
        let _ = namespace_store.wait_until_ready().await;
        // Backend lookups wait for this: before it, a backend that exists would look missing.
        let _ = listed.send(true);
        for store in &readers {
            let _ = store.wait_until_ready().await;
        }
        info!("watches synced; ready");
        on_ready(true);
    };

    // The controllers end on shutdown (after their in-flight reconciles); the caches, the
    // router and the readiness report end with them. Readiness is never waited for: it does
    // not come when shutdown cuts the initial list short.
    let caches = future::join_all(cache_tasks);
    tokio::select! {
        _ = future::join_all(controllers) => {}
        _ = caches => {}
        _ = router => {}
        () = cut_short => {}
        () = readiness.then(|()| future::pending::<()>()) => {}
    }
    (config.on_ready)(false);
    info!("controllers stopped");
}

/// What the cache keeps of an AppConnection: what [`CachedConnection`] reads, less a
/// create-pending mark beside a recorded id (where it means nothing: a create that needs the
/// mark sets it again, and the API object still has it).
fn slim(conn: &mut Conn) {
    let recorded = conn
        .0
        .as_ref()
        .is_ok_and(|c| c.status.as_ref().is_some_and(|s| s.id.is_some()));
    // Never drop the map: the marking patch relies on it mirroring the server.
    if let Some(annotations) = conn.meta_mut().annotations.as_mut()
        && recorded
    {
        annotations.remove(CREATE_PENDING);
    }
}

/// Watches the metadata of the Secrets in one scope, until `shutdown` (their data is read on
/// demand, never cached). A touched Secret drops the backend clients built from another
/// version of it, then triggers the connections that read it and, through `backends`, the
/// checks of the backends that do.
fn secret_watch(
    scope: Option<String>,
    api: Api<PartialObjectMeta<Secret>>,
    ctx: Arc<Context>,
    connections: mpsc::UnboundedSender<ObjectRef<Conn>>,
    backends: mpsc::UnboundedSender<(String, String)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send {
    // Paged like the AppConnections: a Secret's metadata can be large (kubectl's last-applied
    // copy of a Secret holds its data), so the whole list is never held at once.
    watcher(api, watcher::Config::default().page_size(100))
        .default_backoff()
        .take_until(shutdown)
        .for_each(move |event| {
            let secret = event.map(|event| {
                ctx.secrets.apply(scope.as_deref(), &event);
                match event {
                    watcher::Event::Apply(secret)
                    | watcher::Event::InitApply(secret)
                    | watcher::Event::Delete(secret) => Some(secret),
                    watcher::Event::Init | watcher::Event::InitDone => None,
                }
            });
            match secret {
                Ok(None) => {}
                Ok(Some(secret)) => {
                    let namespace = secret.namespace().unwrap_or_default();
                    let name = secret.name_any();
                    // A client read at this version already (the event came late) is kept.
                    let version = secret.resource_version();
                    ctx.registry
                        .clients
                        .secret_changed(&namespace, &name, version.as_deref());
                    for (ns, n) in ctx.index.for_secret(&namespace, &name) {
                        let _ = connections.send(ObjectRef::new(&n).within(&ns));
                    }
                    let _ = backends.send((namespace, name));
                }
                Err(e) => warn!(error = %describe_watch(&e), "Secret watch error; retrying"),
            }
            future::ready(())
        })
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Where a backend cache reports touched objects: (kind, namespace, name).
type Notify = (
    BackendKind,
    mpsc::UnboundedSender<(BackendKind, String, String)>,
);

/// A reflector cache; with `notify`, every touched object's (kind, namespace, name) is sent.
fn cache<K>(
    api: Api<K>,
    notify: Option<Notify>,
) -> (Store<K>, futures::future::BoxFuture<'static, ()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let task = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(move |event| {
        match (event, &notify) {
            (Ok(object), Some((kind, tx))) => {
                let _ = tx.send((
                    *kind,
                    object.namespace().unwrap_or_default(),
                    object.name_any(),
                ));
            }
            (Err(e), _) => warn!(error = %describe_watch(&e), "cache watch error; retrying"),
            _ => {}
        }
        future::ready(())
    })
    .boxed();
    (reader, task)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn conn(id: Option<&str>) -> Conn {
        let mut object = json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
            "metadata": {
                "name": "c", "namespace": "n",
                "labels": {"team": "data"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "appconn.io/create-pending": "true",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {"app": "mssql"},
        });
        if let Some(id) = id {
            object["status"] = json!({"id": id});
        }
        serde_json::from_value(object).unwrap()
    }

    #[test]
    fn a_recorded_id_drops_the_create_pending_mark_from_the_cache() {
        let mut pending = conn(None);
        slim(&mut pending);
        assert_eq!(
            pending.meta().annotations,
            Some([(CREATE_PENDING.to_string(), "true".to_string())].into()),
            "the mark before an id is recorded"
        );
        let mut recorded = conn(Some("id-1"));
        slim(&mut recorded);
        assert_eq!(
            recorded.meta().annotations,
            Some(Default::default()),
            "the map stays, empty, beside a recorded id"
        );
        assert_eq!(recorded.0.as_ref().unwrap().spec.app, "mssql");
    }
}
