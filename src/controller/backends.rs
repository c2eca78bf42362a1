//! Resolves an AppConnection's `backendRef` to a backend client, from caches of the backend
//! resources and namespaces. Backend clients live in [`Clients`], shared with the backend
//! status checks: one client (so one token and one login) per backend generation and version
//! of its auth Secrets.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use crate::backend::{self, Backend, SecretSource};
use crate::crd::{
    AppConnection, BackendKind, BackendProvider, ClusterConnectionBackend, ConnectionBackend,
};
use crate::metrics::Metrics;
use crate::reconcile::{BackendInfo, BackendLookupError};

/// Cache key: kind, namespace ("" for the cluster kind), name.
pub(super) type BackendKey = (BackendKind, String, String);

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
    metrics: Arc<Metrics>,
    built: Mutex<HashMap<BackendKey, Built>>,
    /// One build at a time: callers that need the same client together get one client, so
    /// one login (several refused logins in a row would lock an Infisical identity).
    building: tokio::sync::Mutex<()>,
    /// Every Secret a client was built from: the version named by its latest watch event
    /// since the last build that read it began (None: no event since).
    events: Mutex<HashMap<SecretKey, Option<String>>>,
}

/// What a client is built for: which backend, which version of it, and where its
/// namespaced-kind Secrets live (None for the cluster kind, whose references name theirs).
pub(super) struct BackendVersion<'a> {
    pub key: BackendKey,
    pub uid: String,
    pub generation: i64,
    pub provider: &'a BackendProvider,
    pub secret_namespace: Option<String>,
}

impl Clients {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            metrics,
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
        version: BackendVersion<'_>,
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
        let built = backend::build(version.provider, &secrets, self.metrics.clone()).await;
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
            version.key,
            Built {
                uid: version.uid,
                generation: version.generation,
                secrets: read,
                backend: backend.clone(),
            },
        );
        Ok(backend)
    }
}

pub struct Registry {
    builtin: Arc<dyn Backend>,
    /// One cache per watched namespace scope.
    pub backends: Vec<Store<ConnectionBackend>>,
    pub cluster_backends: Store<ClusterConnectionBackend>,
    pub namespaces: Store<Namespace>,
    pub clients: Arc<Clients>,
}

impl Registry {
    pub fn new(
        builtin: Arc<dyn Backend>,
        clients: Arc<Clients>,
        backends: Vec<Store<ConnectionBackend>>,
        cluster_backends: Store<ClusterConnectionBackend>,
        namespaces: Store<Namespace>,
    ) -> Self {
        Self {
            builtin,
            backends,
            cluster_backends,
            namespaces,
            clients,
        }
    }

    pub fn builtin(&self) -> Arc<dyn Backend> {
        self.builtin.clone()
    }

    /// The backend for a connection.
    pub async fn lookup(
        &self,
        conn: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError> {
        let Some(reference) = &conn.spec.backend_ref else {
            return Ok((self.builtin.clone(), BackendInfo::builtin()));
        };
        let namespace = conn.namespace().unwrap_or_default();
        let (key, uid, generation, provider, secret_namespace) = match reference.kind {
            BackendKind::ConnectionBackend => {
                let wanted = ObjectRef::new(&reference.name).within(&namespace);
                let found = self
                    .backends
                    .iter()
                    .find_map(|store| store.get(&wanted))
                    .ok_or_else(|| {
                        BackendLookupError::NotFound(format!(
                            "ConnectionBackend {:?} not found in namespace {namespace:?}",
                            reference.name
                        ))
                    })?;
                not_ready(found.status.as_ref(), reference.kind, &reference.name)?;
                let key = (reference.kind, namespace.clone(), reference.name.clone());
                (
                    key,
                    found.uid(),
                    found.metadata.generation,
                    found.spec.provider.clone(),
                    Some(namespace.clone()),
                )
            }
            BackendKind::ClusterConnectionBackend => {
                let found = self
                    .cluster_backends
                    .get(&ObjectRef::new(&reference.name))
                    .ok_or_else(|| {
                        BackendLookupError::NotFound(format!(
                            "ClusterConnectionBackend {:?} not found",
                            reference.name
                        ))
                    })?;
                self.check_namespace_allowed(&found, &namespace)?;
                not_ready(found.status.as_ref(), reference.kind, &reference.name)?;
                let key = (reference.kind, String::new(), reference.name.clone());
                (
                    key,
                    found.uid(),
                    found.metadata.generation,
                    found.spec.provider.clone(),
                    None,
                )
            }
        };
        let info = BackendInfo {
            kind: reference.kind.as_str().to_string(),
            name: reference.name.clone(),
            provider: provider.type_name().unwrap_or("unknown"),
            default_project: provider.default_project(),
        };
        if provider.builtin.is_some() {
            return Ok((self.builtin.clone(), info));
        }
        let backend = self
            .clients
            .get(BackendVersion {
                key,
                uid: uid.unwrap_or_default(),
                generation: generation.unwrap_or_default(),
                provider: &provider,
                secret_namespace,
            })
            .await?;
        Ok((backend, info))
    }

    fn check_namespace_allowed(
        &self,
        backend: &ClusterConnectionBackend,
        namespace: &str,
    ) -> Result<(), BackendLookupError> {
        let Some(selector) = backend
            .spec
            .conditions
            .as_ref()
            .and_then(|c| c.namespace_selector.as_ref())
        else {
            return Ok(());
        };
        let labels: BTreeMap<String, String> = self
            .namespaces
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.labels().clone())
            .unwrap_or_default();
        if super::selector::matches(selector, &labels) {
            Ok(())
        } else {
            Err(BackendLookupError::NotFound(format!(
                "ClusterConnectionBackend {:?} does not allow namespace {namespace:?} (conditions.namespaceSelector)",
                backend.name_any()
            )))
        }
    }
}

/// A backend whose own check failed makes its connections wait with its message.
fn not_ready(
    status: Option<&crate::crd::ConnectionBackendStatus>,
    kind: BackendKind,
    name: &str,
) -> Result<(), BackendLookupError> {
    let failed = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| c.status == "False");
    match failed {
        Some(c) => Err(BackendLookupError::NotReady(format!(
            "{} {name:?} is not ready: {}",
            kind.as_str(),
            c.message
        ))),
        None => Ok(()),
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
        let read = super::kube_env::read_secret_version(&self.client, namespace, name).await?;
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
    use crate::crd::InfisicalProvider;
    use crate::secret::SecretString;

    fn clients() -> Clients {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Clients::new(
            Client::try_from(config).unwrap(),
            Arc::new(Metrics::default()),
        )
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
