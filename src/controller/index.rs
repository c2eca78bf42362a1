//! Which AppConnections read which Secret and use which backend, so that a change to either
//! reaches exactly the connections it affects. Only names are kept, never Secret data.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use crate::crd::{AppConnection, BackendKind};
use crate::reconcile::resolve::referenced_secrets;

/// A namespaced name.
pub type Key = (String, String);

/// What a connection refers to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Refs {
    /// Sorted, each once.
    secrets: Vec<Key>,
    backend: Option<(BackendKind, Key)>,
}

#[derive(Default)]
struct Inner {
    by_connection: HashMap<Key, Refs>,
    /// A Secret's readers are few as a rule (most often one): a vector, each connection once
    /// (a connection is unlinked before it is linked again).
    by_secret: HashMap<Key, Vec<Key>>,
    by_backend: HashMap<(BackendKind, Key), HashSet<Key>>,
}

/// Reverse index from Secrets and backends to the connections that use them.
#[derive(Default)]
pub struct RefIndex {
    inner: RwLock<Inner>,
}

impl RefIndex {
    /// Records what `conn` refers to now, replacing what it referred to before.
    pub fn update(&self, conn: &AppConnection) {
        let namespace = conn.metadata.namespace.clone().unwrap_or_default();
        let key = (
            namespace.clone(),
            conn.metadata.name.clone().unwrap_or_default(),
        );
        let refs = Refs {
            secrets: referenced_secrets(conn)
                .into_iter()
                .map(|s| (namespace.clone(), s))
                .collect(),
            backend: conn.spec.backend_ref.as_ref().map(|r| {
                let scope = match r.kind {
                    BackendKind::ConnectionBackend => namespace.clone(),
                    BackendKind::ClusterConnectionBackend => String::new(),
                };
                (r.kind, (scope, r.name.clone()))
            }),
        };
        let mut inner = self.inner.write().expect("index lock");
        if inner.by_connection.get(&key) == Some(&refs) {
            return;
        }
        inner.unlink(&key);
        for secret in &refs.secrets {
            inner
                .by_secret
                .entry(secret.clone())
                .or_default()
                .push(key.clone());
        }
        if let Some(backend) = &refs.backend {
            inner
                .by_backend
                .entry(backend.clone())
                .or_default()
                .insert(key.clone());
        }
        inner.by_connection.insert(key, refs);
    }

    /// Forgets a connection that is gone.
    pub fn remove(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let mut inner = self.inner.write().expect("index lock");
        inner.unlink(&key);
        inner.by_connection.remove(&key);
    }

    /// Connections that read the Secret.
    pub fn for_secret(&self, namespace: &str, name: &str) -> Vec<Key> {
        let inner = self.inner.read().expect("index lock");
        inner
            .by_secret
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Connections that use the backend; `namespace` is empty for the cluster kind.
    pub fn for_backend(&self, kind: BackendKind, namespace: &str, name: &str) -> Vec<Key> {
        let inner = self.inner.read().expect("index lock");
        inner
            .by_backend
            .get(&(kind, (namespace.to_string(), name.to_string())))
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Inner {
    fn unlink(&mut self, key: &Key) {
        let Some(old) = self.by_connection.get(key).cloned() else {
            return;
        };
        for secret in &old.secrets {
            if let Some(set) = self.by_secret.get_mut(secret) {
                set.retain(|k| k != key);
                if set.is_empty() {
                    self.by_secret.remove(secret);
                }
            }
        }
        if let Some(backend) = &old.backend
            && let Some(set) = self.by_backend.get_mut(backend)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_backend.remove(backend);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(name: &str, secrets: &[&str], backend: Option<&str>) -> AppConnection {
        let creds: serde_json::Map<String, serde_json::Value> = secrets
            .iter()
            .map(|s| {
                (
                    format!("f-{s}"),
                    serde_json::json!({"secretKeyRef": {"name": s, "key": "k"}}),
                )
            })
            .collect();
        let mut spec = serde_json::json!({"app": "a", "credentials": creds});
        if let Some(b) = backend {
            spec["backendRef"] = serde_json::json!({"kind": "ClusterConnectionBackend", "name": b});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
            "metadata": {"name": name, "namespace": "ns"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn follows_changes_of_references() {
        let index = RefIndex::default();
        index.update(&conn("a", &["s1", "s2"], Some("b1")));
        index.update(&conn("b", &["s2"], None));
        let mut users = index.for_secret("ns", "s2");
        users.sort();
        assert_eq!(
            users,
            vec![("ns".into(), "a".into()), ("ns".into(), "b".into())]
        );
        assert_eq!(
            index
                .for_backend(BackendKind::ClusterConnectionBackend, "", "b1")
                .len(),
            1
        );

        index.update(&conn("a", &["s3"], None));
        assert_eq!(index.for_secret("ns", "s1"), Vec::<Key>::new());
        assert_eq!(
            index.for_secret("ns", "s3"),
            vec![("ns".into(), "a".into())]
        );
        assert!(
            index
                .for_backend(BackendKind::ClusterConnectionBackend, "", "b1")
                .is_empty()
        );

        index.remove("ns", "b");
        assert!(index.for_secret("ns", "s2").is_empty());
        assert!(index.for_secret("other", "s3").is_empty());
    }
}
