//! Resolves an AppConnection's `backendRef` to a backend client: the reconcile core's one
//! lookup over caches of the backend resources and namespaces. Backend clients live in
//! [`Clients`], shared with the backend status checks: one client (so one token and one login)
//! per backend generation and version of its auth Secrets.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::backend::{Backend, BackendLookupError, Factory, SecretSource};
use crate::crd::{AppConnection, ClusterConnectionBackend, ConnectionBackend};
use crate::kube_error::describe;
use crate::reconcile::{
    BackendInfo, BackendKey, BackendResources, ResolvedBackend, resolve_backend,
};

/// A Secret's namespace and name.
type SecretKey = (String, String);

struct Built {
    uid: String,
    generation: i64,
    /// The Secrets the client was built from, to drop it when one changes.
    secrets: Vec<SecretVersion>,
    backend: Arc<dyn Backend>,
}

/// The backend clients, shared by the connections and the backend status checks.
pub struct Clients {
    client: Client,
    factory: Factory,
    built: Mutex<HashMap<BackendKey, Built>>,
    /// One build at a time: callers that need the same client together get one client, so
    /// one login (several refused logins in a row would lock an Infisical identity).
    building: tokio::sync::Mutex<()>,
    /// Every Secret a client was built from: the version named by its latest watch event
    /// since the last build that read it began (None: no event since).
    events: Mutex<HashMap<SecretKey, Option<String>>>,
}

impl Clients {
    pub fn new(client: Client, factory: Factory) -> Self {
        Self {
            client,
            factory,
            built: Mutex::new(HashMap::new()),
            building: tokio::sync::Mutex::new(()),
            events: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the clients built from another version of this Secret (the next use builds one
    /// from the new content); returns whether any was. `version` None: from any version.
    pub fn secret_changed(&self, namespace: &str, name: &str, version: Option<&str>) -> bool {
        if let Some(seen) = self
            .events
            .lock()
            .expect("events lock")
            .get_mut(&(namespace.to_string(), name.to_string()))
        {
            *seen = Some(version.unwrap_or_default().to_string());
        }
        let mut built = self.built.lock().expect("clients lock");
        let before = built.len();
        built.retain(|_, b| {
            !b.secrets.iter().any(|used| {
                used.namespace == namespace
                    && used.name == name
                    && (version.is_none() || used.version.as_deref() != version)
            })
        });
        built.len() != before
    }

    /// Drops the client of a deleted backend.
    pub fn remove(&self, key: &BackendKey) {
        self.built.lock().expect("clients lock").remove(key);
    }

    /// Whether `backend` is still the client kept for `key`: false once one of its Secrets
    /// changed or a newer generation replaced it.
    pub fn is_current(&self, key: &BackendKey, backend: &Arc<dyn Backend>) -> bool {
        self.built
            .lock()
            .expect("clients lock")
            .get(key)
            .is_some_and(|b| Arc::ptr_eq(&b.backend, backend))
    }

    /// The kept client for this backend version, or a new one built from its Secrets. A
    /// caller holding an older copy of the resource (its cache lags) gets the newer client.
    pub(super) async fn get(
        &self,
        version: &ResolvedBackend,
    ) -> Result<Arc<dyn Backend>, BackendLookupError> {
        let kept = |built: &HashMap<BackendKey, Built>| {
            built
                .get(&version.key)
                .filter(|b| b.uid == version.uid && b.generation >= version.generation)
                .map(|b| b.backend.clone())
        };
        if let Some(backend) = kept(&self.built.lock().expect("clients lock")) {
            return Ok(backend);
        }
        let _building = self.building.lock().await;
        if let Some(backend) = kept(&self.built.lock().expect("clients lock")) {
            return Ok(backend);
        }
        let secrets = ApiSecrets {
            client: self.client.clone(),
            namespace: version.secret_namespace.clone(),
            read: Mutex::default(),
            events: &self.events,
        };
        let built = self.factory.build(&version.provider, &secrets).await;
        let backend = match built {
            Ok(backend) => backend,
            Err(e) => {
                self.remove(&version.key);
                return Err(e);
            }
        };
        let read = secrets.read.into_inner().expect("read lock");
        // A watch event that came while the build read is either for a version the build
        // did not see (so no later event would drop this client) or a late one for an older
        // version: used once, not kept, the next use builds again.
        if superseded(&read, &self.events.lock().expect("events lock")) {
            tracing::debug!(backend = %version.key.2, "an auth Secret changed during the build; the client is not kept");
            self.remove(&version.key);
            return Ok(backend);
        }
        self.built.lock().expect("clients lock").insert(
            version.key.clone(),
            Built {
                uid: version.uid.clone(),
                generation: version.generation,
                secrets: read,
                backend: backend.clone(),
            },
        );
        Ok(backend)
    }
}

pub struct Registry {
    /// One cache per watched namespace scope.
    pub backends: Vec<Store<ConnectionBackend>>,
    pub cluster_backends: Store<ClusterConnectionBackend>,
    pub namespaces: Store<Namespace>,
    pub clients: Arc<Clients>,
    /// True once the caches above have listed (or a shutdown began). A store's own
    /// `wait_until_ready` wakes only its last waiter, so lookups wait on this instead.
    listed: watch::Receiver<bool>,
}

impl Registry {
    pub fn new(
        clients: Arc<Clients>,
        backends: Vec<Store<ConnectionBackend>>,
        cluster_backends: Store<ClusterConnectionBackend>,
        namespaces: Store<Namespace>,
        listed: watch::Receiver<bool>,
    ) -> Self {
        Self {
            backends,
            cluster_backends,
            namespaces,
            clients,
            listed,
        }
    }

    /// The backend for a connection. Until the backend caches have listed, a backend that
    /// exists would look missing (a false `BackendNotFound` and two status writes right after
    /// a start): a lookup waits for them, which only ever takes time at start-up.
    pub async fn lookup(
        &self,
        conn: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError> {
        if conn.spec.backend_ref.is_some() {
            // An error means the sender is gone with a shutdown: nothing left to wait for.
            let _ = self.listed.clone().wait_for(|listed| *listed).await;
        }
        match resolve_backend(self, conn)? {
            None => Ok((self.clients.factory.builtin(), BackendInfo::builtin())),
            Some(resolved) => Ok((self.clients.get(&resolved).await?, resolved.info)),
        }
    }
}

impl Registry {
    /// The uid and generation of the backend resource `conn` names (None for the built-in
    /// store, or a resource not in the caches).
    pub fn backend_version(&self, conn: &AppConnection) -> Option<(String, i64)> {
        let reference = conn.spec.backend_ref.as_ref()?;
        let meta = match reference.kind {
            crate::crd::BackendKind::ConnectionBackend => {
                let namespace = conn.namespace().unwrap_or_default();
                self.connection_backend(&namespace, &reference.name)?
                    .metadata
            }
            crate::crd::BackendKind::ClusterConnectionBackend => {
                self.cluster_backend(&reference.name)?.metadata
            }
        };
        Some((
            meta.uid.unwrap_or_default(),
            meta.generation.unwrap_or_default(),
        ))
    }
}

impl BackendResources for Registry {
    fn connection_backend(&self, namespace: &str, name: &str) -> Option<ConnectionBackend> {
        let wanted = ObjectRef::new(name).within(namespace);
        self.backends
            .iter()
            .find_map(|store| store.get(&wanted))
            .map(|found| (*found).clone())
    }

    fn cluster_backend(&self, name: &str) -> Option<ClusterConnectionBackend> {
        self.cluster_backends
            .get(&ObjectRef::new(name))
            .map(|found| (*found).clone())
    }

    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.labels().clone())
            .unwrap_or_default()
    }
}

/// A Secret a client was built from, and the resourceVersion it was read at (None: missing).
struct SecretVersion {
    namespace: String,
    name: String,
    version: Option<String>,
}

/// Whether a watch event since the build began names another version of a Secret it read.
fn superseded(read: &[SecretVersion], events: &HashMap<SecretKey, Option<String>>) -> bool {
    read.iter().any(|used| {
        let key = (used.namespace.clone(), used.name.clone());
        matches!(events.get(&key), Some(Some(seen)) if used.version.as_ref() != Some(seen))
    })
}

/// Reads backend auth Secrets through the API: from the backend's own namespace for the
/// namespaced kind, from the namespace each reference names for the cluster kind. Notes the
/// version of each Secret it read, and clears its [`Clients::events`] entry before the read.
struct ApiSecrets<'a> {
    client: Client,
    namespace: Option<String>,
    read: Mutex<Vec<SecretVersion>>,
    events: &'a Mutex<HashMap<SecretKey, Option<String>>>,
}

#[async_trait::async_trait]
impl SecretSource for ApiSecrets<'_> {
    async fn get(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let namespace = self
            .namespace
            .as_deref()
            .or(namespace)
            .ok_or_else(|| format!("secretKeyRef {name:?} must name its namespace"))?;
        // Before the read: an event processed later may be for a version it did not see.
        self.events
            .lock()
            .expect("events lock")
            .insert((namespace.to_string(), name.to_string()), None);
        let read = super::kube_env::read_secret_version(&self.client, namespace, name)
            .await
            .map_err(|e| format!("reading Secret {namespace}/{name}: {}", describe(&e)))?;
        let (data, version) = read.map_or((None, None), |(data, v)| (Some(data), v));
        self.read.lock().expect("read lock").push(SecretVersion {
            namespace: namespace.to_string(),
            name: name.to_string(),
            version,
        });
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::infisical::{InfisicalBackend, InfisicalConfig};
    use crate::crd::{BackendKind, InfisicalProvider};
    use crate::metrics::Metrics;
    use crate::secret::SecretString;

    fn clients() -> Clients {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let factory = Factory::new(infisical(), Arc::new(Metrics::default()));
        Clients::new(Client::try_from(config).unwrap(), factory)
    }

    fn infisical() -> Arc<dyn Backend> {
        let provider: InfisicalProvider = serde_json::from_value(serde_json::json!({
            "url": "https://infisical.example",
            "auth": {"universalAuth": {
                "clientId": {"secretKeyRef": {"name": "mi", "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": "mi", "key": "clientSecret"}}}},
        }))
        .unwrap();
        let placeholder = || SecretString::new(String::new());
        let config = InfisicalConfig::from_provider(&provider, None, placeholder(), placeholder());
        Arc::new(InfisicalBackend::new(config, Arc::new(Metrics::default())).unwrap())
    }

    fn keep(clients: &Clients, key: &BackendKey, version: &str) -> Arc<dyn Backend> {
        let backend = infisical();
        clients.built.lock().unwrap().insert(
            key.clone(),
            Built {
                uid: "u".into(),
                generation: 1,
                secrets: vec![SecretVersion {
                    namespace: "ns".into(),
                    name: "mi".into(),
                    version: Some(version.into()),
                }],
                backend: backend.clone(),
            },
        );
        backend
    }

    #[test]
    fn a_build_is_superseded_by_an_event_for_another_version_during_it() {
        let read = |version: Option<&str>| {
            vec![SecretVersion {
                namespace: "ns".into(),
                name: "mi".into(),
                version: version.map(str::to_string),
            }]
        };
        let key = ("ns".to_string(), "mi".to_string());
        let mut events = HashMap::new();
        events.insert(key.clone(), None);
        assert!(!superseded(&read(Some("41")), &events), "no event");
        events.insert(key.clone(), Some("41".to_string()));
        assert!(!superseded(&read(Some("41")), &events), "its own version");
        events.insert(key.clone(), Some("42".to_string()));
        assert!(superseded(&read(Some("41")), &events));
        assert!(
            superseded(&read(None), &events),
            "created while read as missing"
        );
        events.clear();
        assert!(!superseded(&read(Some("41")), &events), "not followed");
    }

    #[tokio::test]
    async fn a_lookup_waits_until_the_backend_caches_have_listed() {
        use kube::runtime::{reflector, watcher};
        let (backends, mut backend_writer) = reflector::store::<ConnectionBackend>();
        let (cluster, mut cluster_writer) = reflector::store::<ClusterConnectionBackend>();
        let (namespaces, mut namespace_writer) = reflector::store::<Namespace>();
        let (listed, listed_rx) = watch::channel(false);
        let registry = Registry::new(
            Arc::new(clients()),
            vec![backends],
            cluster,
            namespaces,
            listed_rx,
        );
        let conn: AppConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"app": "postgres",
                     "backendRef": {"kind": "ConnectionBackend", "name": "local"}},
        }))
        .unwrap();
        let backend: ConnectionBackend = serde_json::from_value(serde_json::json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
            "metadata": {"name": "local", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"builtin": {}},
            "status": {"observedGeneration": 1, "conditions": [{"type": "Ready",
                "status": "True", "reason": "Synced", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap();

        backend_writer.apply_watcher_event(&watcher::Event::Init);
        backend_writer.apply_watcher_event(&watcher::Event::InitApply(backend));
        backend_writer.apply_watcher_event(&watcher::Event::InitDone);
        cluster_writer.apply_watcher_event(&watcher::Event::InitDone);
        namespace_writer.apply_watcher_event(&watcher::Event::InitDone);

        let lookup = registry.lookup(&conn);
        tokio::pin!(lookup);
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), &mut lookup).await;
        assert!(
            early.is_err(),
            "no verdict before the caches are said to have listed"
        );
        listed.send(true).unwrap();
        let (_, info) = lookup.await.expect("found once listed");
        assert_eq!(
            (info.kind.as_str(), info.name.as_str()),
            ("ConnectionBackend", "local")
        );
    }

    #[tokio::test]
    async fn a_client_is_dropped_only_for_another_version_of_its_secrets() {
        let clients = clients();
        let key: BackendKey = (BackendKind::ConnectionBackend, "ns".into(), "b".into());
        let backend = keep(&clients, &key, "41");

        // The event of the version it was read at, arriving after the build: kept.
        assert!(!clients.secret_changed("ns", "mi", Some("41")));
        // Another Secret, or the same name elsewhere: kept.
        assert!(!clients.secret_changed("ns", "other", Some("50")));
        assert!(!clients.secret_changed("elsewhere", "mi", Some("50")));
        assert!(clients.is_current(&key, &backend));

        assert!(clients.secret_changed("ns", "mi", Some("42")));
        assert!(!clients.is_current(&key, &backend));

        keep(&clients, &key, "42");
        assert!(clients.secret_changed("ns", "mi", None), "any version");
    }
}
