//! The built-in store's rotation schedule through the reconcile core (DESIGN 2.7): when
//! `nextRotationAt` passes without a credentials change the connection is marked overdue with a
//! RotationOverdue Warning event; a change is a successful rotation and moves the schedule on.
//! Time is a controlled clock shared by the store and the core.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use appconn::backend::Backend;
use appconn::backend::builtin::BuiltinBackend;
use appconn::crd::{AppConnection, AppConnectionStatus};
use appconn::keys::{HashKey, InstallationKeys};
use appconn::reconcile::resolve::SecretData;
use appconn::reconcile::{
    BackendInfo, BackendLookupError, EnvError, Environment, Event, EventType, Options, Reconciler,
};
use appconn::store::SqliteStore;
use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

/// A resource kept in memory, as the API server would keep it.
struct MemoryEnv {
    backend: Arc<dyn Backend>,
    secrets: Mutex<BTreeMap<String, SecretData>>,
    conn: Mutex<AppConnection>,
    events: Mutex<Vec<Event>>,
}

#[async_trait]
impl Environment for MemoryEnv {
    async fn secret(&self, _: &str, name: &str) -> Result<Option<SecretData>, EnvError> {
        Ok(self.secrets.lock().unwrap().get(name).cloned())
    }
    async fn backend(
        &self,
        _: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError> {
        Ok((self.backend.clone(), BackendInfo::builtin()))
    }
    async fn mark(&self, _: &AppConnection, pending: bool) -> Result<(), EnvError> {
        let mut conn = self.conn.lock().unwrap();
        conn.metadata.finalizers = Some(vec![appconn::crd::FINALIZER.into()]);
        if pending {
            conn.metadata.annotations =
                Some([(appconn::crd::CREATE_PENDING.to_string(), "true".to_string())].into());
        }
        Ok(())
    }
    async fn latest(&self, _: &AppConnection) -> Result<Option<AppConnection>, EnvError> {
        Ok(Some(self.conn.lock().unwrap().clone()))
    }
    async fn clear_pending(&self, _: &AppConnection) -> Result<(), EnvError> {
        self.conn.lock().unwrap().metadata.annotations = None;
        Ok(())
    }
    async fn release(&self, _: &AppConnection) -> Result<(), EnvError> {
        self.conn.lock().unwrap().metadata.finalizers = None;
        Ok(())
    }
    async fn write_status(
        &self,
        _: &AppConnection,
        status: &AppConnectionStatus,
    ) -> Result<(), EnvError> {
        self.conn.lock().unwrap().status = Some(status.clone());
        Ok(())
    }
    async fn event(&self, _: &AppConnection, event: Event) {
        self.events.lock().unwrap().push(event);
    }
}

fn secret(password: &str) -> SecretData {
    [("password".to_string(), password.as_bytes().to_vec())].into()
}

#[tokio::test]
async fn overdue_when_unchanged_success_when_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let keys = InstallationKeys::generate();
    let store = SqliteStore::open(dir.path().join("s.db"), &keys.store_keys)
        .await
        .unwrap();
    let start: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
    let now = Arc::new(Mutex::new(start));
    let clock = now.clone();
    let backend =
        BuiltinBackend::new(Arc::new(store)).with_clock(Arc::new(move || *clock.lock().unwrap()));
    let conn: AppConnection = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": "vault", "namespace": "platform", "generation": 1, "uid": "u-1"},
        "spec": {"app": "azure-key-vault", "method": "client-secret",
                 "credentials": {"password": {"secretKeyRef": {"name": "s", "key": "password"}}},
                 "rotation": {"enabled": true, "intervalDays": 1, "rotateAtUtc": {"hours": 11, "minutes": 29}}}
    }))
    .unwrap();
    let env = MemoryEnv {
        backend: Arc::new(backend),
        secrets: Mutex::new([("s".to_string(), secret("first"))].into()),
        conn: Mutex::new(conn),
        events: Mutex::new(Vec::new()),
    };
    let core = Reconciler::new(Arc::new(HashKey::from_bytes([1; 32])));
    let run = |at: Timestamp| {
        *now.lock().unwrap() = at;
        let conn = env.conn.lock().unwrap().clone();
        let opts = Options {
            verify: false,
            dry_run: false,
            now: at,
            refresh: None,
        };
        let core = &core;
        let env = &env;
        async move { core.reconcile(env, &conn, opts).await.unwrap() }
    };
    let rotation = |env: &MemoryEnv| {
        env.conn
            .lock()
            .unwrap()
            .status
            .clone()
            .unwrap()
            .rotation
            .unwrap()
    };

    let created = run(start).await;
    assert_eq!(created.action, "create");
    let first = rotation(&env);
    assert_eq!(first.status.as_deref(), Some("pending"));
    let due = first.next_rotation_at.clone().unwrap().0;
    assert_eq!(due.to_string(), "2026-11-27T11:29:00Z");

    // Before the due time nothing is read; after it, the unchanged credentials are overdue.
    assert_eq!(
        run(start + SignedDuration::from_hours(2)).await.action,
        "noop"
    );
    let late = run(due + SignedDuration::from_mins(1)).await;
    assert_eq!(late.action, "verify");
    assert!(
        late.ready,
        "an overdue rotation does not take the connection out of service"
    );
    assert_eq!(rotation(&env).status.as_deref(), Some("overdue"));
    let warnings: Vec<Event> = env
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.type_ == EventType::Warning)
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].reason, "RotationOverdue");
    // Checked again while still overdue: no second Warning.
    run(due + SignedDuration::from_mins(2)).await;
    assert_eq!(
        env.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.type_ == EventType::Warning)
            .count(),
        1
    );

    // The credentials change: a successful rotation, scheduled again from now.
    env.secrets
        .lock()
        .unwrap()
        .insert("s".into(), secret("second"));
    let rotated_at = due + SignedDuration::from_mins(3);
    let updated = run(rotated_at).await;
    assert_eq!(updated.action, "update");
    let after = rotation(&env);
    assert_eq!(after.status.as_deref(), Some("success"));
    assert_eq!(after.last_rotation_time.unwrap().0, rotated_at);
    assert_eq!(
        after.next_rotation_at.unwrap().0.to_string(),
        "2026-11-28T11:29:00Z"
    );
}
