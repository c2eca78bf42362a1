//! A Kubernetes API server for tests, speaking the real HTTP/JSON protocol closely enough for
//! `kube::Client`, kube-runtime's watchers and controllers, and `kubectl`.
//!
//! No cluster can run where the operator's tests run, and the same tests must also pass on a
//! real cluster, so this server copies the real one's behaviour (resourceVersions, watch
//! semantics, 409/410/422 Status bodies, status subresources, finalizers, server-side apply)
//! rather than offering a friendlier model. Behaviours tests can trip over:
//!
//! - Namespaced objects need their namespace to exist (404 otherwise, 403 while it
//!   terminates); `default`, `kube-system`, `kube-public` and `kube-node-lease` exist.
//! - A created CRD is served only once its controller marks it Established, a moment after
//!   the create returns; wait with `await_condition(.., conditions::is_crd_established())`.
//! - Core kinds (Secret, ConfigMap, ...) have no `metadata.generation`; CRs and CRDs do.
//! - Writes that change nothing keep the resourceVersion and send no watch event, but still
//!   count in [`TestApiServer::writes`], which counts requests.
//! - Custom resources are pruned, defaulted and validated against their schema, including
//!   CEL rules, with validation ratcheting on update.
//! - CRD create and update type-check CEL rules against the CEL type the server derives from
//!   the schema: a rule naming a property without a `type` (only
//!   `x-kubernetes-preserve-unknown-fields`), or `self.namespace` for the escaped
//!   `self.__namespace__`, is refused with cel-go's `undefined field` error.
//! - Server-side apply owns leaf fields per manager; lists are atomic unless the schema says
//!   `x-kubernetes-list-type: set|map` (`metadata.finalizers` is a set). Update-style writes
//!   take ownership of what they change, so a later apply by another manager conflicts.
//! - Removing an owner deletes its dependents (background propagation) unless deleted with
//!   `propagationPolicy: Orphan`.
//! - `GET /metrics` serves `apiserver_request_total` with the real server's labels.
//! - Each write is applied under one lock, one at a time (a real server decodes, patches and
//!   validates in parallel): [`TestApiServer::write_lock_held`] tells how busy that lock is.

mod cel_types;
mod cost;
mod discovery;
mod error;
mod fields;
mod handlers;
mod meta;
mod metrics;
mod ops;
mod patch;
mod protobuf;
mod resource;
mod schema;
mod selector;
mod store;
mod table;
mod view;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use handlers::request_series;
pub use k8s_openapi::api::authentication::v1::UserInfo;
use tokio::sync::{oneshot, watch as tokio_watch};

use store::{AccessRule, Injection, State};

/// One request as the server saw it, named the way RBAC names things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// get, list, watch, create, update, patch, delete or deletecollection.
    pub verb: String,
    /// API group, empty for the core group.
    pub group: String,
    pub version: String,
    /// Resource plural.
    pub resource: String,
    /// Subresource, empty for the main resource.
    pub subresource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The client's User-Agent, which tells one client's requests from another's.
    pub user_agent: Option<String>,
}

/// State shared by the HTTP handlers, the watch streams and the test-facing handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Bumped to end every watch; `u64::MAX` means the server is shutting down.
    cut: tokio_watch::Sender<u64>,
    bookmark_ms: AtomicU64,
    addr: SocketAddr,
    pub(crate) cost: cost::RequestCost,
    /// Nanoseconds the state lock has been held by stored writes.
    pub(crate) write_lock_held_ns: AtomicU64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_ms.load(Ordering::Relaxed))
    }

    /// Runs the CRD controllers shortly after the write, as on a real cluster, where a CRD is
    /// not served until it is Established.
    pub(crate) fn schedule_establish(self: &Arc<Self>, crd: String) {
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            ops::establish(&mut shared.lock(), &crd);
        });
    }
}

/// A running test API server; dropping it shuts the server down.
pub struct TestApiServer {
    shared: Arc<Shared>,
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1 with the built-in resources and the
    /// `default`, `kube-system`, `kube-public` and `kube-node-lease` namespaces.
    pub async fn start() -> TestApiServer {
        TestApiServer::start_at(0).await
    }

    /// Like [`TestApiServer::start`] on a chosen port (0 for any).
    pub async fn start_at(port: u16) -> TestApiServer {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the test API server");
        let addr = listener.local_addr().expect("listener has an address");
        let mut state = State::new();
        for def in resource::builtins() {
            state.register(def);
        }
        let ns_def = state
            .def("", "v1", "namespaces")
            .expect("namespaces are built in");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let req = ops::WriteReq {
                def: &ns_def,
                namespace: "",
                subresource: "",
                manager: "kube-apiserver",
                dry_run: false,
                strict: false,
            };
            let obj = serde_json::json!({"metadata": {"name": ns}});
            ops::create(&mut state, &req, obj, ops::Ownership::Update)
                .expect("system namespaces are valid");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            cut: tokio_watch::channel(0).0,
            bookmark_ms: AtomicU64::new(1000),
            addr,
            cost: cost::RequestCost::default(),
            write_lock_held_ns: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(handlers::handle)
            .with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(error = %e, "test API server stopped");
            }
        });
        TestApiServer {
            shared,
            url: format!("http://{addr}"),
            shutdown: Some(tx),
        }
    }

    /// Makes each write (create, update, patch, delete) spend `write` and each get or list
    /// spend `read` of CPU work before it is served, to cost what a real server costs; zero,
    /// the default, serves at once. For benchmarks: see the `cost` module.
    pub fn set_request_cost(&self, write: Duration, read: Duration) {
        self.shared.cost.set(write, read);
    }

    /// How long stored writes have held the server's state lock so far. This server applies a
    /// write (decoding, patching, validation, field ownership, storage) under one lock, one
    /// write at a time; a real kube-apiserver does all but the storage in parallel. Benchmarks
    /// read it to tell how much of a write rate is this server's own limit.
    pub fn write_lock_held(&self) -> Duration {
        Duration::from_nanos(self.shared.write_lock_held_ns.load(Ordering::Relaxed))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A plain-HTTP client config for this server, default namespace `default`.
    pub fn kube_config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().expect("server URL is a valid URI"));
        config.default_namespace = "default".into();
        config
    }

    /// Writes `dir/kubeconfig` naming this server, its context's namespace `namespace`, for
    /// processes under test; returns its path.
    pub fn write_kubeconfig(&self, dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
            "current-context": "test",
        });
        std::fs::write(&path, serde_yaml::to_string(&config).expect("YAML"))
            .expect("writing the kubeconfig");
        path
    }

    /// A `kube::Client` for this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("client for the test API server")
    }

    /// Successful, non-dry-run write requests to `plural` or `plural/subresource`, including
    /// writes that changed nothing (the request still costs the real server).
    pub fn writes(&self, resource: &str) -> u64 {
        self.shared
            .lock()
            .writes
            .get(resource)
            .copied()
            .unwrap_or(0)
    }

    pub fn total_writes(&self) -> u64 {
        self.shared.lock().total_writes
    }

    /// Every resource request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Ends every open watch stream now; clients must re-watch.
    pub fn cut_watches(&self) {
        self.shared
            .cut
            .send_modify(|v| *v = v.saturating_add(1).min(u64::MAX - 1));
    }

    /// Forgets all change history: later watches and lists from an older resourceVersion get
    /// 410 Gone, as after an etcd compaction.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// How often idle watches that asked for bookmarks get one.
    pub fn set_bookmark_interval(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared.bookmark_ms.store(ms, Ordering::Relaxed);
    }

    /// Makes TokenReview authenticate `token` as `user`.
    pub fn set_token(&self, token: &str, user: UserInfo) {
        self.shared.lock().tokens.insert(token.to_string(), user);
    }

    /// Grants `user` (or a group of that name) `verb` on `resource` in `group` for
    /// SubjectAccessReview; `namespace` None grants it in every namespace. `resource` may name
    /// a subresource (`appconnections/credentials`); `*` matches any verb, group or resource.
    /// Everything else is denied.
    pub fn allow(
        &self,
        user: &str,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
    ) {
        self.shared.lock().rules.push(AccessRule {
            user: user.to_string(),
            verb: verb.to_string(),
            group: group.to_string(),
            resource: resource.to_string(),
            namespace: namespace.map(str::to_string),
        });
    }

    /// Fails the next `verb` request (`*` for any) on `resource` (`plural` or
    /// `plural/subresource`) with `status` and the Status body the real server would send.
    pub fn fail_next(&self, verb: &str, resource: &str, status: u16) {
        self.shared.lock().injections.push(Injection {
            verb: verb.to_string(),
            resource: resource.to_string(),
            code: status,
        });
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.shared.cut.send_replace(u64::MAX);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
