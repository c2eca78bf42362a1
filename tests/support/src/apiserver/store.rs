//! Object storage with one global resourceVersion counter (as etcd's revision) and a bounded
//! per-resource change history that watches replay from and list snapshots are rebuilt from.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use k8s_openapi::api::authentication::v1::UserInfo;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::RequestRecord;
use super::error::ApiError;
use super::meta::set_rv;
use super::resource::{ResourceDef, compare_versions};

/// How many changes each resource keeps for watches that resume from an older version.
const HISTORY_LIMIT: usize = 20_000;

/// `(namespace, name)`, namespace empty for cluster-scoped objects; the order is etcd's key
/// order, so lists come out sorted the same way.
pub(crate) type Key = (String, String);

/// One stored object version: its JSON plus what selectors need.
#[derive(Debug)]
pub(crate) struct Stored {
    pub json: Bytes,
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub rv: u64,
    pub labels: BTreeMap<String, String>,
    pub fields: BTreeMap<String, String>,
    /// uids from `ownerReferences`, for garbage collection.
    pub owners: Vec<String>,
    meta_json: OnceLock<Bytes>,
}

impl Stored {
    pub fn new(value: &Value, rv: u64, field_labels: &[(String, String)]) -> Stored {
        let meta = value.get("metadata");
        let s = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        let labels = meta
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object)
            .map(|l| {
                l.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let fields = field_labels
            .iter()
            .filter_map(|(label, path)| {
                let v = path.split('.').try_fold(value, |v, k| v.get(k))?;
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => return None,
                    other => other.to_string(),
                };
                Some((label.clone(), s))
            })
            .collect();
        Stored {
            json: Bytes::from(serde_json::to_vec(value).expect("JSON values serialise")),
            api_version: value
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            namespace: s("namespace").to_string(),
            name: s("name").to_string(),
            uid: s("uid").to_string(),
            rv,
            labels,
            fields,
            owners: meta
                .and_then(|m| m.get("ownerReferences"))
                .and_then(Value::as_array)
                .map(|refs| {
                    refs.iter()
                        .filter_map(|r| r.get("uid").and_then(Value::as_str))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            meta_json: OnceLock::new(),
        }
    }

    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).expect("stored JSON parses")
    }

    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }

    /// The object as a `PartialObjectMetadata`, built once and shared by all metadata watchers.
    pub fn metadata_json(&self) -> Bytes {
        self.meta_json
            .get_or_init(|| {
                let v = self.value();
                let partial = json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": v.get("metadata").cloned().unwrap_or(json!({})),
                });
                Bytes::from(serde_json::to_vec(&partial).expect("JSON values serialise"))
            })
            .clone()
    }

    pub fn field(&self, label: &str) -> Option<&str> {
        match label {
            "metadata.name" => Some(&self.name),
            "metadata.namespace" => Some(&self.namespace),
            other => self.fields.get(other).map(String::as_str),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of the change history; `prev` is the version before (for DELETED, the object
/// as it was stored, while `obj` carries the deletion's resourceVersion).
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub kind: ChangeKind,
    pub obj: Arc<Stored>,
    pub prev: Option<Arc<Stored>>,
}

pub(crate) struct Storage {
    pub objects: BTreeMap<Key, Arc<Stored>>,
    pub history: VecDeque<Arc<Change>>,
    /// Every change with a resourceVersion above this is still in `history`.
    pub window_start: u64,
    /// Carries the latest resourceVersion; watchers wait on it, and dropping it ends them.
    pub notify: watch::Sender<u64>,
    pub namespaced: bool,
    pub field_labels: Vec<(String, String)>,
}

impl Storage {
    fn new(rv: u64, namespaced: bool, field_labels: Vec<(String, String)>) -> Storage {
        Storage {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            window_start: rv,
            notify: watch::channel(rv).0,
            namespaced,
            field_labels,
        }
    }

    /// Index of the first change newer than `rv`.
    pub fn first_after(&self, rv: u64) -> usize {
        self.history.partition_point(|c| c.rv <= rv)
    }

    /// The objects as they were at `rv`, rebuilt by undoing newer changes.
    pub fn snapshot_at(&self, rv: u64) -> Result<BTreeMap<Key, Arc<Stored>>, ApiError> {
        if rv < self.window_start {
            return Err(ApiError::gone(
                "The resourceVersion for the provided list is too old.",
            ));
        }
        let mut objects = self.objects.clone();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            let key = change.obj.key();
            match change.kind {
                ChangeKind::Added => {
                    objects.remove(&key);
                }
                ChangeKind::Modified | ChangeKind::Deleted => {
                    if let Some(prev) = &change.prev {
                        objects.insert(key, prev.clone());
                    }
                }
            }
        }
        Ok(objects)
    }

    /// Whether any changes happened after `rv`.
    pub fn changed_since(&self, rv: u64) -> bool {
        self.history.back().is_some_and(|c| c.rv > rv)
    }
}

/// A SubjectAccessReview grant registered with `allow`.
#[derive(Clone, Debug)]
pub(crate) struct AccessRule {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
}

/// A failure to inject into the next matching request.
#[derive(Clone, Debug)]
pub(crate) struct Injection {
    pub verb: String,
    pub resource: String,
    pub code: u16,
}

pub(crate) struct State {
    pub rv: u64,
    pub defs: BTreeMap<(String, String, String), Arc<ResourceDef>>,
    pub storages: HashMap<String, Storage>,
    pub writes: HashMap<String, u64>,
    pub total_writes: u64,
    pub requests: Vec<RequestRecord>,
    /// `apiserver_request_total`'s counts.
    pub request_totals: super::metrics::RequestTotals,
    pub tokens: HashMap<String, UserInfo>,
    pub rules: Vec<AccessRule>,
    pub injections: Vec<Injection>,
    pub terminating_namespaces: BTreeSet<String>,
    pub terminating_crds: BTreeSet<String>,
    /// Owner uid to the objects whose `ownerReferences` name it.
    pub dependents: HashMap<String, BTreeSet<(String, Key)>>,
    /// CRDs whose names the establishing controller still has to accept.
    pub pending_crds: Vec<String>,
}

impl State {
    pub fn new() -> State {
        State {
            rv: 1,
            defs: BTreeMap::new(),
            storages: HashMap::new(),
            writes: HashMap::new(),
            total_writes: 0,
            requests: Vec::new(),
            request_totals: Default::default(),
            tokens: HashMap::new(),
            rules: Vec::new(),
            injections: Vec::new(),
            terminating_namespaces: BTreeSet::new(),
            terminating_crds: BTreeSet::new(),
            dependents: HashMap::new(),
            pending_crds: Vec::new(),
        }
    }

    pub fn register(&mut self, def: ResourceDef) {
        if def.stored() && !self.storages.contains_key(&def.storage) {
            let storage = Storage::new(self.rv, def.namespaced, def.field_labels.clone());
            self.storages.insert(def.storage.clone(), storage);
        }
        let key = (def.group.clone(), def.version.clone(), def.plural.clone());
        self.defs.insert(key, Arc::new(def));
    }

    /// Forgets the served versions of a storage (a CRD being re-established or removed).
    pub fn unregister(&mut self, storage: &str) {
        self.defs.retain(|_, d| d.storage != storage);
    }

    pub fn def(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// The preferred (highest priority) served version of a storage, for internal writes.
    pub fn preferred_def(&self, storage: &str) -> Option<Arc<ResourceDef>> {
        let mut defs: Vec<&Arc<ResourceDef>> = self
            .defs
            .values()
            .filter(|d| d.storage == storage)
            .collect();
        defs.sort_by(|a, b| compare_versions(&a.version, &b.version));
        defs.first().map(|d| (*d).clone())
    }

    pub fn get(&self, storage: &str, key: &Key) -> Option<Arc<Stored>> {
        self.storages.get(storage)?.objects.get(key).cloned()
    }

    /// Stores `next` under `key` (or removes the object when `None`) at a new resourceVersion,
    /// records the change and wakes the watchers. Returns the stored version (for a removal,
    /// the last version with the deletion's resourceVersion).
    pub fn commit(&mut self, storage_id: &str, key: &Key, next: Option<Value>) -> Arc<Stored> {
        self.rv += 1;
        let rv = self.rv;
        let storage = self
            .storages
            .get_mut(storage_id)
            .expect("committing to a known storage");
        let change = match next {
            Some(mut v) => {
                set_rv(&mut v, rv);
                let stored = Arc::new(Stored::new(&v, rv, &storage.field_labels));
                let prev = storage.objects.insert(key.clone(), stored.clone());
                let kind = if prev.is_some() {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Added
                };
                Change {
                    rv,
                    kind,
                    obj: stored,
                    prev,
                }
            }
            None => {
                let prev = storage
                    .objects
                    .remove(key)
                    .expect("removing a stored object");
                let mut v = prev.value();
                set_rv(&mut v, rv);
                let gone = Arc::new(Stored::new(&v, rv, &storage.field_labels));
                Change {
                    rv,
                    kind: ChangeKind::Deleted,
                    obj: gone,
                    prev: Some(prev),
                }
            }
        };
        let stored = change.obj.clone();
        let entry = (storage_id.to_string(), key.clone());
        if let Some(prev) = &change.prev {
            for owner in &prev.owners {
                if let Some(deps) = self.dependents.get_mut(owner) {
                    deps.remove(&entry);
                    if deps.is_empty() {
                        self.dependents.remove(owner);
                    }
                }
            }
        }
        if change.kind != ChangeKind::Deleted {
            for owner in &stored.owners {
                self.dependents
                    .entry(owner.clone())
                    .or_default()
                    .insert(entry.clone());
            }
        }
        let storage = self
            .storages
            .get_mut(storage_id)
            .expect("storage still there");
        storage.history.push_back(Arc::new(change));
        while storage.history.len() > HISTORY_LIMIT {
            if let Some(old) = storage.history.pop_front() {
                storage.window_start = old.rv;
            }
        }
        storage.notify.send_replace(rv);
        stored
    }

    pub fn compact(&mut self) {
        let rv = self.rv;
        for s in self.storages.values_mut() {
            s.history.clear();
            s.window_start = rv;
        }
    }

    /// Whether any namespaced object is left in `ns`.
    pub fn namespace_has_content(&self, ns: &str) -> bool {
        let start = (ns.to_string(), String::new());
        self.storages.values().filter(|s| s.namespaced).any(|s| {
            s.objects
                .range(start.clone()..)
                .next()
                .is_some_and(|((n, _), _)| n == ns)
        })
    }
}
