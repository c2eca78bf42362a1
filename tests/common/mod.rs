//! The integration-test harness: a Kubernetes API (the test server, or a real cluster when
//! `APPCONN_TEST_KUBECONFIG` names a kubeconfig) with the CRDs from `crds/`, a namespace of the
//! test's own, and the real operator started in-process.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appconn::controller::leader::LeaseConfig;
use appconn::controller::operator::{self, Maintenance, OperatorOptions};
use appconn::crd::{AppConnection, ConnectionBackend, ConnectionBackendStatus};
use appconn::store::StoreLocation;
use appconn::store::tls::TlsFiles;
use appconn_testkit::apiserver::TestApiServer;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::oneshot;

pub struct Cluster {
    /// The test server; None against a real cluster (its write counters are then unknown).
    pub server: Option<TestApiServer>,
    pub client: Client,
    /// How to reach the API: the operator gets a client of its own from it.
    pub config: kube::Config,
    /// A namespace of this test's own.
    pub namespace: String,
}

impl Cluster {
    pub async fn start() -> Cluster {
        if std::env::var_os("RUST_LOG").is_some() {
            appconn::telemetry::init(appconn::telemetry::LogFormat::Plain);
        }
        let (server, config) = match std::env::var("APPCONN_TEST_KUBECONFIG") {
            Ok(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .expect("kubeconfig usable");
                (None, config)
            }
            Err(_) => {
                let server = TestApiServer::start().await;
                let config = server.kube_config();
                (Some(server), config)
            }
        };
        let client = Client::try_from(config.clone()).expect("client");
        appconn_testkit::crds::install(
            &client,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"),
            "appconn-tests",
        )
        .await;
        let namespace = format!("appconn-test-{}", &uuid::Uuid::new_v4().to_string()[..8]);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        Cluster {
            server,
            client,
            config,
            namespace,
        }
    }

    /// Removes what the test left in its namespace and the namespace itself, as on a real
    /// cluster every test must.
    pub async fn cleanup(&self) {
        cleanup_namespace(&self.client, &self.namespace).await;
    }

    pub fn connections(&self) -> Api<AppConnection> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Writes to `resource` counted by the test server (None on a real cluster).
    pub fn writes(&self, resource: &str) -> Option<u64> {
        self.server.as_ref().map(|s| s.writes(resource))
    }

    /// Creates or replaces a Secret with string data.
    pub async fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": self.namespace},
            "stringData": data.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        }))
        .unwrap();
        let params = PatchParams::apply("appconn-tests").force();
        self.secrets()
            .patch(name, &params, &Patch::Apply(&secret))
            .await
            .unwrap();
    }

    /// Creates an AppConnection from a spec.
    pub async fn create_connection(&self, name: &str, spec: serde_json::Value) -> AppConnection {
        let conn: AppConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
            "metadata": {"name": name, "namespace": self.namespace}, "spec": spec,
        }))
        .unwrap();
        self.connections()
            .create(&PostParams::default(), &conn)
            .await
            .unwrap()
    }

    pub fn backends(&self) -> Api<ConnectionBackend> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates a ConnectionBackend from a spec.
    pub async fn create_backend(&self, name: &str, spec: serde_json::Value) {
        let backend: ConnectionBackend = serde_json::from_value(serde_json::json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }))
        .unwrap();
        self.backends()
            .create(&PostParams::default(), &backend)
            .await
            .unwrap();
    }

    /// Polls the backend until `check` holds on its status, failing after `timeout`.
    pub async fn wait_backend(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&ConnectionBackendStatus) -> bool,
    ) -> ConnectionBackend {
        let deadline = Instant::now() + timeout;
        loop {
            let backend = self.backends().get(name).await.unwrap();
            if backend.status.as_ref().is_some_and(&check) {
                return backend;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: timed out waiting for {what}; last seen: {:?}",
                backend.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `get` of the connection until `check` holds, failing after `timeout`.
    pub async fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&AppConnection) -> bool,
    ) -> AppConnection {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(conn) = self.connections().get_opt(name).await.unwrap() {
                if check(&conn) {
                    return conn;
                }
                if Instant::now() > deadline {
                    panic!(
                        "{name}: timed out waiting for {what}; last seen: {:?}",
                        conn.status
                    );
                }
            } else if Instant::now() > deadline {
                panic!("{name}: timed out waiting for {what}; the object is gone");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_gone(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.connections().get_opt(name).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "{name} was not deleted in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Events about object `name` in the test namespace.
    pub async fn events_about(&self, name: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// (reason, note) of the Events about object `name`.
    pub async fn event_notes(&self, name: &str) -> Vec<(String, String)> {
        self.events_about(name)
            .await
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// What a crash after a backend create and before the status write leaves behind: the
    /// connection marked create-pending with an empty status. Returns it as stored then.
    pub async fn forget_status(&self, name: &str) -> AppConnection {
        let api = self.connections();
        let empty = serde_json::json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection", "status": {},
        });
        api.patch_status(
            name,
            &PatchParams::apply(appconn::crd::FIELD_MANAGER).force(),
            &Patch::Apply(empty),
        )
        .await
        .unwrap();
        let conn = api.get(name).await.unwrap();
        assert!(conn.status.as_ref().and_then(|s| s.id.as_ref()).is_none());
        assert!(
            conn.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(appconn::crd::CREATE_PENDING))
        );
        conn
    }

    /// Waits for an Event about object `name` with this reason, and returns its note.
    pub async fn wait_event_note(&self, name: &str, reason: &str, timeout: Duration) -> String {
        let event = self.wait_event(name, reason, timeout).await;
        event.note.unwrap_or_default()
    }

    /// Waits for an Event about object `name` with this reason, and returns it.
    pub async fn wait_event(&self, name: &str, reason: &str, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events_about(name).await;
            if let Some(event) = events
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
            {
                return event;
            }
            assert!(Instant::now() < deadline, "no {reason} Event about {name}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Cluster {
    /// On a real cluster, nothing a test made may outlive it (a finalizer whose operator is gone
    /// would keep its namespace terminating for ever). The test server goes with the test.
    fn drop(&mut self) {
        if self.server.is_some() {
            return;
        }
        let config = self.config.clone();
        let namespace = self.namespace.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: clean up from a
        // thread with a runtime and a client of its own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                let client = Client::try_from(config).expect("client");
                cleanup_namespace(&client, &namespace).await;
            });
        })
        .join();
        if cleaned.is_err() {
            eprintln!("cleaning up namespace {} failed", self.namespace);
        }
    }
}

/// Drops the finalizers that no running operator will release in `namespace` (the backend
/// objects are orphaned), deletes the namespace and waits until it is gone.
async fn cleanup_namespace(client: &Client, namespace: &str) {
    let strip = PatchParams::default();
    let no_finalizers = Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}));
    let connections: Api<AppConnection> = Api::namespaced(client.clone(), namespace);
    for conn in connections
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        if !conn
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .is_empty()
        {
            let name = conn.metadata.name.clone().unwrap_or_default();
            let _ = connections.patch(&name, &strip, &no_finalizers).await;
        }
    }
    let backends: Api<ConnectionBackend> = Api::namespaced(client.clone(), namespace);
    for backend in backends.list(&ListParams::default()).await.unwrap().items {
        if !backend
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .is_empty()
        {
            let name = backend.metadata.name.clone().unwrap_or_default();
            let _ = backends.patch(&name, &strip, &no_finalizers).await;
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(namespace, &Default::default()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while namespaces.get_opt(namespace).await.ok().flatten().is_some() {
        if Instant::now() > deadline {
            eprintln!("namespace {namespace} still terminating after 60 s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ready=True with this reason.
/// A Databricks service-principal connection on the Infisical ConnectionBackend `backend`,
/// its client secret in the Secret `sp`.
pub fn databricks_spec(backend: &str) -> serde_json::Value {
    serde_json::json!({
        "backendRef": {"kind": "ConnectionBackend", "name": backend},
        "app": "databricks", "method": "service-principal",
        "credentials": {
            "clientId": {"value": "6c2ab7d4-1f0e-4b8a-9d57-0c3f2e1a9b10"},
            "workspaceUrl": {"value": "https://adb-1.azuredatabricks.net"},
            "clientSecret": {"secretKeyRef": {"name": "sp", "key": "clientSecret"}},
        },
    })
}

pub fn ready(conn: &AppConnection) -> bool {
    condition(conn).is_some_and(|(status, _, _)| status == "True")
}

/// (status, reason, message) of the Ready condition.
pub fn condition(conn: &AppConnection) -> Option<(String, String, String)> {
    let c = conn
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn reason_is(conn: &AppConnection, reason: &str) -> bool {
    condition(conn).is_some_and(|(_, r, _)| r == reason)
}

pub fn backend_ready(status: &ConnectionBackendStatus) -> bool {
    backend_condition(status).is_some_and(|(s, _, _)| s == "True")
}

pub fn backend_reason(status: &ConnectionBackendStatus, reason: &str) -> bool {
    backend_condition(status).is_some_and(|(_, r, _)| r == reason)
}

/// (status, reason, message) of a backend's Ready condition.
pub fn backend_condition(status: &ConnectionBackendStatus) -> Option<(String, String, String)> {
    let c = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A running operator; stopped (gracefully) by `stop` or when dropped.
pub struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub admin: String,
    /// Base URL of the store read API.
    pub store_api: String,
}

/// Where an operator keeps its store and key file: a temporary directory, removed when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Paths {
    dir: Arc<tempfile::TempDir>,
}

impl Paths {
    pub fn temporary() -> Paths {
        Paths {
            dir: Arc::new(tempfile::tempdir().unwrap()),
        }
    }
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("appconn.db")
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("appconn.key")
    }
}

pub struct OperatorSettings {
    pub refresh: Duration,
    pub leader_elect: Option<String>,
    /// Keep the installation keys in a Secret (as in a cluster) instead of the key file.
    pub keys_in_secret: bool,
    /// A PostgreSQL URL instead of the SQLite file in [`Paths`].
    pub postgres: Option<String>,
    /// HTTPS for the store read API; plain HTTP without.
    pub store_api_tls: Option<TlsFiles>,
    pub maintenance: Maintenance,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        OperatorSettings {
            refresh: Duration::from_secs(600),
            leader_elect: None,
            keys_in_secret: false,
            postgres: None,
            store_api_tls: None,
            maintenance: Maintenance::default(),
        }
    }
}

/// The User-Agent of the operator's client, to tell its requests from the test's.
pub const OPERATOR_AGENT: &str = "appconn-operator";

impl Operator {
    pub async fn start(cluster: &Cluster, paths: &Paths, settings: OperatorSettings) -> Operator {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let store_api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if settings.store_api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let store_api_url = format!("{scheme}://{}", store_api.local_addr().unwrap());
        let mut lease = LeaseConfig::new(
            &cluster.namespace,
            "appconn-leader",
            settings
                .leader_elect
                .clone()
                .unwrap_or_else(|| "solo".into()),
        );
        lease.lease_duration = Duration::from_secs(2);
        lease.renew_every = Duration::from_millis(500);
        let opts = OperatorOptions {
            namespaces: vec![cluster.namespace.clone()],
            operator_namespace: cluster.namespace.clone(),
            concurrency: 16,
            store: match &settings.postgres {
                Some(url) => StoreLocation::parse(url).unwrap(),
                None => StoreLocation::Sqlite(paths.store()),
            },
            key_secret: "appconn-store-key".into(),
            key_file: (!settings.keys_in_secret).then(|| paths.key_file()),
            admin,
            store_api,
            store_api_tls: settings.store_api_tls.clone(),
            maintenance: settings.maintenance.clone(),
            leader_elect: settings.leader_elect.is_some(),
            lease,
            default_refresh: settings.refresh,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let mut config = cluster.config.clone();
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(OPERATOR_AGENT),
        ));
        let client = Client::try_from(config).expect("operator client");
        let task = tokio::spawn(async move {
            operator::run(client, opts, async move {
                let _ = rx.await;
            })
            .await
            .expect("operator runs");
        });
        Operator {
            stop: Some(tx),
            task: Some(task),
            admin: admin_url,
            store_api: store_api_url,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs `f` repeatedly until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
