//! The built-in store as a backend: records in a [`StoreEngine`], ids are uuids, and rotation is
//! the store's schedule (the credentials must change by `nextRotationAt`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use jiff::Timestamp;
use uuid::Uuid;

use super::{Backend, BackendError, Desired, Remote, RemoteRotation, Target};
use crate::crd::ProviderType;
use crate::metrics::Metrics;
use crate::store::{NewRecord, Record, RotationState, StoreEngine, StoreError};

/// The time source; tests move it.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

const MAX_NAME_LEN: usize = 64;

pub struct BuiltinBackend {
    store: Arc<dyn StoreEngine>,
    clock: Clock,
    metrics: Option<Arc<Metrics>>,
}

impl BuiltinBackend {
    pub fn new(store: Arc<dyn StoreEngine>) -> Self {
        Self {
            store,
            clock: Arc::new(Timestamp::now),
            metrics: None,
        }
    }

    /// Counts every store operation in `appconn_backend_requests_total{backend="builtin"}`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs one store operation, counted and timed as a request to this backend.
    async fn counted<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        let result = call.await;
        if let Some(metrics) = &self.metrics {
            metrics.observe_store(operation, result.is_ok(), started.elapsed());
        }
        result.map_err(backend_error)
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn remote(&self, record: &Record) -> Remote {
        Remote {
            id: record.id.to_string(),
            connection_name: record.connection_name.clone(),
            credentials_hash: Some(record.credentials_hash.clone()),
            rotation: record
                .rotation
                .map(|_| rotation_status(&record.rotation_state, (self.clock)())),
            content: None,
        }
    }

    /// The record `id` names, if it belongs to `namespace`: an id copied into another
    /// namespace's status must not reach this one's connection.
    async fn owned(&self, id: &str, namespace: &str) -> Result<Option<Uuid>, BackendError> {
        let Ok(id) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let record = self.counted("get", self.store.get(id)).await?;
        Ok(record.filter(|r| r.namespace == namespace).map(|r| r.id))
    }
}

/// Where a record with a schedule stands, as of `now`. The store moves `next_rotation_at` on
/// every change of the credentials, so a due date that has passed means they did not change.
fn rotation_status(state: &RotationState, now: Timestamp) -> RemoteRotation {
    let due = state.next_rotation_at.filter(|next| now >= *next);
    let (status, last_message) = match (due, state.last_rotation_time) {
        (Some(due), Some(last)) => (
            "overdue",
            Some(format!("credentials unchanged since {last}, due {due}")),
        ),
        (Some(due), None) => (
            "overdue",
            Some(format!(
                "credentials not changed since the schedule started, due {due}"
            )),
        ),
        (None, Some(_)) => ("success", None),
        (None, None) => ("pending", None),
    };
    RemoteRotation {
        status: Some(status.to_string()),
        last_message,
        last_rotation_time: state.last_rotation_time,
        next_rotation_at: state.next_rotation_at,
    }
}

fn new_record(desired: &Desired) -> NewRecord {
    let t = &desired.target;
    NewRecord {
        namespace: t.namespace.clone(),
        name: t.resource_name.clone(),
        connection_name: t.connection_name.clone(),
        app: t.app.clone(),
        method: t.method.clone(),
        project: t.project.clone(),
        description: desired.description.clone(),
        settings: desired.settings.clone(),
        credentials: desired.credentials.clone(),
        credentials_hash: desired.credentials_hash.clone(),
        rotation: desired.rotation,
    }
}

/// Store failures as backend failures. Damage and key trouble are reported as unavailable too:
/// nothing the connection's spec can fix, and they clear once the store or key is restored.
pub fn backend_error(e: StoreError) -> BackendError {
    match e {
        StoreError::NameTaken {
            connection_name, ..
        } => BackendError::AlreadyExists {
            name: connection_name,
        },
        StoreError::NotFound => BackendError::NotFound,
        other => BackendError::Unavailable {
            message: other.to_string(),
            retry_after: None,
        },
    }
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.chars().count())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[async_trait]
impl Backend for BuiltinBackend {
    fn provider(&self) -> ProviderType {
        ProviderType::Builtin
    }

    fn validate(&self, desired: &Desired) -> Result<(), BackendError> {
        let name = &desired.target.connection_name;
        if valid_name(name) {
            Ok(())
        } else {
            Err(BackendError::InvalidSpec {
                message: format!(
                    "connection name {name:?} is not valid for the built-in store: use 1 to \
                     {MAX_NAME_LEN} characters from A-Z, a-z, 0-9, '.', '_' and '-'"
                ),
            })
        }
    }

    async fn check(&self) -> Result<(), BackendError> {
        self.counted("check", self.store.get(Uuid::nil()))
            .await
            .map(|_| ())
    }

    async fn get(&self, id: &str, target: &Target) -> Result<Option<Remote>, BackendError> {
        let Ok(id) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let record = self.counted("get", self.store.get(id)).await?;
        Ok(record
            .filter(|r| r.namespace == target.namespace)
            .map(|r| self.remote(&r)))
    }

    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError> {
        let find = self
            .store
            .find_by_name(&target.namespace, &target.connection_name);
        let record = self.counted("find", find).await?;
        Ok(record.map(|r| self.remote(&r)))
    }

    async fn create(&self, desired: &Desired) -> Result<Remote, BackendError> {
        let insert = self.store.insert(new_record(desired), (self.clock)());
        let record = self.counted("create", insert).await?;
        Ok(self.remote(&record))
    }

    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError> {
        let id = self
            .owned(id, &desired.target.namespace)
            .await?
            .ok_or(BackendError::NotFound)?;
        let update = self.store.update(id, new_record(desired), (self.clock)());
        let record = self.counted("update", update).await?;
        Ok(self.remote(&record))
    }

    async fn delete(&self, id: &str, target: &Target) -> Result<(), BackendError> {
        if let Some(id) = self.owned(id, &target.namespace).await? {
            self.counted("delete", self.store.delete(id)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use serde_json::Value;

    use super::*;
    use crate::backend::RotationSchedule;
    use crate::keys::StoreKeys;
    use crate::secret::Credentials;
    use crate::store::{SqliteStore, next_rotation};

    const CANARY: &str = "zebra-canary-7781";

    struct Fixture {
        backend: BuiltinBackend,
        store: Arc<SqliteStore>,
        now: Arc<Mutex<Timestamp>>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(
                SqliteStore::open(dir.path().join("store.db"), &StoreKeys::generate())
                    .await
                    .unwrap(),
            );
            let now = Arc::new(Mutex::new(ts("2026-01-01T08:00:00Z")));
            let clock = now.clone();
            let backend = BuiltinBackend::new(store.clone())
                .with_clock(Arc::new(move || *clock.lock().unwrap()));
            Self {
                backend,
                store,
                now,
                _dir: dir,
            }
        }

        fn set_time(&self, t: &str) -> Timestamp {
            *self.now.lock().unwrap() = ts(t);
            ts(t)
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn target(namespace: &str, connection_name: &str) -> Target {
        Target {
            namespace: namespace.into(),
            resource_name: "warehouse".into(),
            connection_name: connection_name.into(),
            app: "mssql".into(),
            method: Some("username-and-password".into()),
            project: None,
        }
    }

    fn desired(target: Target, password: &str, description: &str) -> Desired {
        Desired {
            target,
            description: Some(description.into()),
            credentials: Credentials::new(BTreeMap::from([
                ("username".to_string(), Value::from("sa")),
                ("password".to_string(), Value::from(password)),
            ])),
            settings: BTreeMap::new(),
            rotation: None,
            // Stands in for the operator's hash: it covers description and credentials.
            credentials_hash: format!(
                "hmac-sha256:{}",
                hex::encode(description.to_string() + password)
            ),
        }
    }

    #[tokio::test]
    async fn validate_applies_the_name_rule() {
        let f = Fixture::new().await;
        let backend = &f.backend;
        for name in ["a", "warehouse-prod", "A.b_c-9", &"x".repeat(64)] {
            assert!(
                backend
                    .validate(&desired(target("ns", name), "p", "d"))
                    .is_ok(),
                "{name}"
            );
        }
        for name in ["", "has space", "slash/name", "ünï", &"x".repeat(65)] {
            let err = backend
                .validate(&desired(target("ns", name), "p", "d"))
                .unwrap_err();
            assert!(
                matches!(err, BackendError::InvalidSpec { .. }),
                "{name}: {err:?}"
            );
            assert!(
                err.to_string()
                    .contains("1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"),
                "{err}"
            );
            assert_eq!(err.reason(), crate::crd::Reason::InvalidSpec);
        }
    }

    #[tokio::test]
    async fn create_get_find_update_delete() {
        let f = Fixture::new().await;
        let b = &f.backend;
        assert_eq!(b.provider(), "builtin");
        b.check().await.unwrap();
        let t = target("analytics", "warehouse-prod");

        let created = b.create(&desired(t.clone(), CANARY, "one")).await.unwrap();
        assert!(Uuid::parse_str(&created.id).is_ok());
        assert_eq!(created.connection_name, "warehouse-prod");
        assert_eq!(created.rotation, None);
        let first_hash = created.credentials_hash.clone().unwrap();
        assert_eq!(Some(created.clone()), b.get(&created.id, &t).await.unwrap());
        assert_eq!(Some(created.clone()), b.find(&t).await.unwrap());

        let again = b
            .create(&desired(t.clone(), "other", "one"))
            .await
            .unwrap_err();
        assert!(
            matches!(&again, BackendError::AlreadyExists { name } if name == "warehouse-prod"),
            "{again:?}"
        );

        let updated = b
            .update(&created.id, &desired(t.clone(), "new-password", "one"))
            .await;
        let updated = updated.unwrap();
        assert_eq!(updated.id, created.id);
        assert_ne!(updated.credentials_hash.unwrap(), first_hash);
        let record = f
            .store
            .get(Uuid::parse_str(&created.id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.credentials.expose()["password"], "new-password");
        assert_eq!(record.version, 2);

        let writes = f.store.write_count();
        b.update(&created.id, &desired(t.clone(), "new-password", "one"))
            .await
            .unwrap();
        assert_eq!(
            f.store.write_count(),
            writes,
            "an unchanged update writes nothing"
        );

        b.delete(&created.id, &t).await.unwrap();
        assert_eq!(b.get(&created.id, &t).await.unwrap(), None);
        assert_eq!(b.find(&t).await.unwrap(), None);
        b.delete(&created.id, &t).await.unwrap();
        let gone = b
            .update(&created.id, &desired(t.clone(), "x", "one"))
            .await
            .unwrap_err();
        assert!(matches!(gone, BackendError::NotFound), "{gone:?}");
    }

    #[tokio::test]
    async fn store_operations_are_counted_as_backend_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("store.db"), &StoreKeys::generate())
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let b = BuiltinBackend::new(Arc::new(store)).with_metrics(metrics.clone());
        let t = target("analytics", "counted");
        let created = b.create(&desired(t.clone(), CANARY, "one")).await.unwrap();
        b.get(&created.id, &t).await.unwrap();
        b.get(&created.id, &t).await.unwrap();
        b.create(&desired(t.clone(), CANARY, "one"))
            .await
            .unwrap_err();
        let text = metrics.encode();
        let count = |op: &str, class: &str| {
            let series = format!(
                "appconn_backend_requests_total{{backend=\"builtin\",operation=\"{op}\",\
                 status_class=\"{class}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(count("create", "ok").as_deref(), Some("1"), "{text}");
        assert_eq!(count("get", "ok").as_deref(), Some("2"), "{text}");
        assert_eq!(count("create", "error").as_deref(), Some("1"), "{text}");
        assert!(!text.contains(CANARY));
    }

    #[tokio::test]
    async fn ids_that_are_not_this_namespaces_records_are_absent() {
        let f = Fixture::new().await;
        let b = &f.backend;
        let mine = target("team-a", "db");
        let theirs = target("team-b", "db");
        let created = b.create(&desired(mine.clone(), CANARY, "d")).await.unwrap();

        for id in ["not-a-uuid", "", &Uuid::new_v4().to_string()] {
            assert_eq!(b.get(id, &mine).await.unwrap(), None, "{id}");
            b.delete(id, &mine).await.unwrap();
            let err = b
                .update(id, &desired(mine.clone(), "x", "d"))
                .await
                .unwrap_err();
            assert!(matches!(err, BackendError::NotFound), "{id}: {err:?}");
        }
        // Another namespace can neither read, overwrite nor delete it by id.
        assert_eq!(b.get(&created.id, &theirs).await.unwrap(), None);
        let err = b
            .update(&created.id, &desired(theirs.clone(), "x", "d"))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::NotFound), "{err:?}");
        b.delete(&created.id, &theirs).await.unwrap();
        let still = f
            .store
            .get(Uuid::parse_str(&created.id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(still.namespace, "team-a");
        assert_eq!(still.credentials.expose()["password"], CANARY);
        // The same connection name in another namespace is a different connection.
        assert_ne!(
            b.create(&desired(theirs, "x", "d")).await.unwrap().id,
            created.id
        );
    }

    #[tokio::test]
    async fn rotation_schedule_pending_overdue_success() {
        let f = Fixture::new().await;
        let b = &f.backend;
        let t = target("ns", "rotating");
        let schedule = RotationSchedule {
            interval_days: 30,
            hours: 11,
            minutes: 29,
        };
        let with = |password: &str, description: &str| Desired {
            rotation: Some(schedule),
            ..desired(t.clone(), password, description)
        };

        let created = b.create(&with(CANARY, "d")).await.unwrap();
        let first_due = ts("2026-01-31T11:29:00Z");
        let pending = RemoteRotation {
            status: Some("pending".into()),
            last_message: None,
            last_rotation_time: None,
            next_rotation_at: Some(first_due),
        };
        assert_eq!(created.rotation, Some(pending.clone()));

        f.set_time("2026-01-31T11:28:59Z");
        assert_eq!(
            b.get(&created.id, &t).await.unwrap().unwrap().rotation,
            Some(pending)
        );

        f.set_time("2026-01-31T11:29:00Z");
        let overdue = b
            .get(&created.id, &t)
            .await
            .unwrap()
            .unwrap()
            .rotation
            .unwrap();
        assert_eq!(overdue.status.as_deref(), Some("overdue"));
        assert_eq!(
            overdue.last_message.as_deref(),
            Some("credentials not changed since the schedule started, due 2026-01-31T11:29:00Z")
        );

        // Editing the description is not a rotation.
        f.set_time("2026-02-01T00:00:00Z");
        let edited = b
            .update(&created.id, &with(CANARY, "edited"))
            .await
            .unwrap();
        assert_eq!(edited.rotation.unwrap().status.as_deref(), Some("overdue"));

        // New credentials are.
        let t1 = f.set_time("2026-02-02T09:00:00Z");
        let rotated = b
            .update(&created.id, &with("rotated-1", "edited"))
            .await
            .unwrap();
        let next = next_rotation(t1, schedule);
        assert_eq!(next, ts("2026-03-04T11:29:00Z"));
        let success = RemoteRotation {
            status: Some("success".into()),
            last_message: None,
            last_rotation_time: Some(t1),
            next_rotation_at: Some(next),
        };
        assert_eq!(rotated.rotation, Some(success.clone()));
        assert_eq!(b.find(&t).await.unwrap().unwrap().rotation, Some(success));

        f.set_time("2026-03-04T11:29:00Z");
        let overdue = b
            .get(&created.id, &t)
            .await
            .unwrap()
            .unwrap()
            .rotation
            .unwrap();
        assert_eq!(overdue.status.as_deref(), Some("overdue"));
        let message = overdue.last_message.unwrap();
        assert_eq!(
            message,
            "credentials unchanged since 2026-02-02T09:00:00Z, due 2026-03-04T11:29:00Z"
        );
        assert!(!message.contains(CANARY) && !message.contains("rotated-1"));

        // Switched off: no rotation state at all.
        let off = b
            .update(&created.id, &desired(t.clone(), "rotated-1", "edited"))
            .await
            .unwrap();
        assert_eq!(off.rotation, None);
        let record = f
            .store
            .get(Uuid::parse_str(&created.id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.rotation_state, RotationState::default());
    }

    #[tokio::test]
    async fn closed_store_is_unavailable() {
        let f = Fixture::new().await;
        f.store.close().await;
        let err = f.backend.check().await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert_eq!(err.reason(), crate::crd::Reason::BackendUnavailable);
        let err = f.backend.find(&target("ns", "x")).await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
    }

    #[test]
    fn every_store_error_maps_to_a_backend_error() {
        let path = PathBuf::from("/var/lib/appconn/store.db");
        let id = Uuid::nil();
        let unavailable = |e: StoreError, expected: &str| {
            let shown = e.to_string();
            match backend_error(e) {
                BackendError::Unavailable {
                    message,
                    retry_after: None,
                } => {
                    assert_eq!(message, shown);
                    assert!(message.contains(expected), "{message}");
                }
                other => panic!("{shown}: {other:?}"),
            }
        };
        let p = || path.clone();
        unavailable(
            StoreError::Open {
                path: p(),
                reason: "permission denied".into(),
            },
            "cannot open store /var/lib/appconn/store.db: permission denied",
        );
        unavailable(
            StoreError::Corrupt { path: p() },
            "/var/lib/appconn/store.db is not an appconn store or is corrupt",
        );
        unavailable(
            StoreError::NewerSchema {
                path: p(),
                found: 3,
                supported: 1,
            },
            "written by a newer appconn (schema version 3",
        );
        unavailable(
            StoreError::KeyMismatch {
                path: p(),
                key_id: "k1".into(),
            },
            "the key file does not match this store (/var/lib/appconn/store.db): key k1 cannot decrypt it",
        );
        unavailable(
            StoreError::UnknownKey {
                path: p(),
                key_id: "k1".into(),
            },
            "encrypted with key k1, which the installation keys do not contain",
        );
        unavailable(
            StoreError::Undecryptable { path: p(), id },
            "cannot be decrypted: it was altered or damaged",
        );
        unavailable(
            StoreError::Busy {
                path: p(),
                reason: "database is locked".into(),
            },
            "is busy: database is locked",
        );
        unavailable(
            StoreError::Io {
                path: p(),
                reason: "disk full".into(),
            },
            "I/O error: disk full",
        );
        unavailable(
            StoreError::Database {
                path: p(),
                reason: "boom".into(),
            },
            "store.db: boom",
        );

        let taken = backend_error(StoreError::NameTaken {
            namespace: "ns".into(),
            connection_name: "db".into(),
        });
        assert!(
            matches!(&taken, BackendError::AlreadyExists { name } if name == "db"),
            "{taken:?}"
        );
        assert!(matches!(
            backend_error(StoreError::NotFound),
            BackendError::NotFound
        ));
    }
}
