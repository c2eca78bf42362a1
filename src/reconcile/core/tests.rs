//! The core against an in-memory environment and a scripted backend: what it calls, in which
//! order, and what it reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jiff::Timestamp;
use serde_json::json;

use super::*;
use crate::backend::{Backend, BackendError, ConnectionTest, Remote, Target};
use crate::crd::{AppConnectionStatus, CREATE_PENDING, FINALIZER};

/// A resource kept in memory, as the API server would keep it, with a log of the writes.
struct MemoryEnv {
    backend: Arc<Scripted>,
    conn: Mutex<AppConnection>,
    secrets: BTreeMap<String, SecretData>,
    writes: Mutex<Vec<String>>,
    events: Mutex<Vec<Event>>,
    /// The next `mark` fails as the API would.
    fail_mark: Mutex<bool>,
    lookup: Mutex<Option<BackendLookupError>>,
}

#[async_trait]
impl Environment for MemoryEnv {
    async fn secret(&self, _: &str, name: &str) -> Result<Option<SecretData>, EnvError> {
        Ok(self.secrets.get(name).cloned())
    }
    async fn backend(
        &self,
        _: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError> {
        if let Some(err) = self.lookup.lock().unwrap().clone() {
            return Err(err);
        }
        Ok((self.backend.clone(), BackendInfo::builtin()))
    }
    async fn mark(&self, _: &AppConnection, pending: bool) -> Result<(), EnvError> {
        if std::mem::take(&mut *self.fail_mark.lock().unwrap()) {
            return Err(EnvError::message(
                "marking c",
                "the object has been modified (HTTP 409 Conflict)",
            ));
        }
        self.writes
            .lock()
            .unwrap()
            .push(format!("mark pending={pending}"));
        let mut conn = self.conn.lock().unwrap();
        conn.metadata.finalizers = Some(vec![FINALIZER.into()]);
        if pending {
            conn.metadata.annotations = Some([(CREATE_PENDING.to_string(), "true".into())].into());
        }
        Ok(())
    }
    async fn latest(&self, _: &AppConnection) -> Result<Option<AppConnection>, EnvError> {
        Ok(Some(self.conn.lock().unwrap().clone()))
    }
    async fn clear_pending(&self, _: &AppConnection) -> Result<(), EnvError> {
        self.writes.lock().unwrap().push("clear-pending".into());
        self.conn.lock().unwrap().metadata.annotations = None;
        Ok(())
    }
    async fn release(&self, _: &AppConnection) -> Result<(), EnvError> {
        self.writes.lock().unwrap().push("release".into());
        self.conn.lock().unwrap().metadata.finalizers = None;
        Ok(())
    }
    async fn write_status(
        &self,
        _: &AppConnection,
        status: &AppConnectionStatus,
    ) -> Result<(), EnvError> {
        self.writes.lock().unwrap().push("status".into());
        self.conn.lock().unwrap().status = Some(status.clone());
        Ok(())
    }
    async fn event(&self, _: &AppConnection, event: Event) {
        self.events.lock().unwrap().push(event);
    }
}

/// A backend whose answers the test sets, with a log of its calls.
#[derive(Default)]
struct Scripted {
    /// id -> (name, hash as the backend reports it)
    objects: Mutex<HashMap<String, (String, String)>>,
    calls: Mutex<Vec<String>>,
    /// Refuse the next update as invalid.
    reject_update: Mutex<bool>,
    content_differs: Mutex<Option<bool>>,
    rotates: Mutex<bool>,
    /// Fail deletes as unavailable.
    unavailable: Mutex<bool>,
    /// The failure the next connection tests report (None: they pass).
    test_failure: Mutex<Option<String>>,
    /// Connection tests cannot run.
    test_unavailable: Mutex<bool>,
}

impl Scripted {
    fn call(&self, what: &str) {
        self.calls.lock().unwrap().push(what.to_string());
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn remote(id: &str, name: &str, hash: &str) -> Remote {
        Remote {
            id: id.into(),
            connection_name: name.into(),
            credentials_hash: Some(hash.into()),
            rotation: None,
            content: None,
        }
    }
    fn insert(&self, name: &str) -> String {
        let id = format!("id-{}", self.objects.lock().unwrap().len() + 1);
        self.objects
            .lock()
            .unwrap()
            .insert(id.clone(), (name.into(), format!("b-{id}")));
        id
    }
}

#[async_trait]
impl Backend for Scripted {
    fn provider(&self) -> ProviderType {
        ProviderType::Builtin
    }
    fn validate(&self, _: &Desired) -> Result<(), BackendError> {
        Ok(())
    }
    async fn check(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn get(&self, id: &str, _: &Target) -> Result<Option<Remote>, BackendError> {
        self.call("get");
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(id)
            .map(|(name, hash)| Scripted::remote(id, name, hash)))
    }
    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError> {
        self.call("find");
        Ok(self
            .objects
            .lock()
            .unwrap()
            .iter()
            .find(|(_, (name, _))| *name == target.connection_name)
            .map(|(id, (name, hash))| Scripted::remote(id, name, hash)))
    }
    async fn create(&self, desired: &Desired) -> Result<Remote, BackendError> {
        self.call("create");
        let name = desired.target.connection_name.clone();
        if self
            .objects
            .lock()
            .unwrap()
            .values()
            .any(|(n, _)| *n == name)
        {
            return Err(BackendError::AlreadyExists { name });
        }
        let id = self.insert(&name);
        let (_, hash) = self.objects.lock().unwrap()[&id].clone();
        Ok(Scripted::remote(&id, &name, &hash))
    }
    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError> {
        self.call("update");
        if std::mem::take(&mut *self.reject_update.lock().unwrap()) {
            return Err(BackendError::Rejected {
                message: "port: Expected number".into(),
            });
        }
        let mut objects = self.objects.lock().unwrap();
        let Some(object) = objects.get_mut(id) else {
            return Err(BackendError::NotFound);
        };
        object.1 = format!("b-{id}-{}", &desired.credentials_hash[12..20]);
        Ok(Scripted::remote(id, &object.0, &object.1))
    }
    async fn delete(&self, id: &str, _: &Target) -> Result<(), BackendError> {
        self.call("delete");
        if *self.unavailable.lock().unwrap() {
            return Err(BackendError::Unavailable {
                message: "timed out".into(),
                retry_after: None,
            });
        }
        self.objects.lock().unwrap().remove(id);
        Ok(())
    }
    fn rotates_itself(&self, _: &Desired) -> bool {
        *self.rotates.lock().unwrap()
    }
    fn content_differs(&self, _: &Desired, _: &Remote) -> Option<bool> {
        *self.content_differs.lock().unwrap()
    }
    async fn test_connection(&self, _: &Desired) -> Result<Option<ConnectionTest>, BackendError> {
        self.call("test");
        if *self.test_unavailable.lock().unwrap() {
            return Err(BackendError::Unavailable {
                message: "HTTP 503".into(),
                retry_after: None,
            });
        }
        let failure = self.test_failure.lock().unwrap().clone();
        Ok(Some(ConnectionTest {
            ok: failure.is_none(),
            message: failure.unwrap_or_default(),
        }))
    }
}

fn env(spec: serde_json::Value) -> MemoryEnv {
    let conn: AppConnection = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": "c", "namespace": "ns", "generation": 1, "uid": "u-1"},
        "spec": spec,
    }))
    .unwrap();
    MemoryEnv {
        backend: Arc::new(Scripted::default()),
        conn: Mutex::new(conn),
        secrets: [(
            "s".to_string(),
            [("password".to_string(), b"first".to_vec())].into(),
        )]
        .into(),
        writes: Mutex::new(Vec::new()),
        events: Mutex::new(Vec::new()),
        fail_mark: Mutex::new(false),
        lookup: Mutex::new(None),
    }
}

fn spec() -> serde_json::Value {
    json!({"app": "postgres", "credentials": {
        "host": {"value": "db"},
        "password": {"secretKeyRef": {"name": "s", "key": "password"}}}})
}

fn core() -> Reconciler {
    Reconciler::new(Arc::new(HashKey::from_bytes([3; 32])))
}

fn opts(verify: bool) -> Options {
    Options {
        verify,
        dry_run: false,
        now: Timestamp::from_second(1_800_000_000).unwrap(),
        refresh: None,
    }
}

async fn run(core: &Reconciler, env: &MemoryEnv, verify: bool) -> Result<Outcome, EnvError> {
    let conn = env.conn.lock().unwrap().clone();
    core.reconcile(env, &conn, opts(verify)).await
}

fn writes(env: &MemoryEnv) -> Vec<String> {
    std::mem::take(&mut *env.writes.lock().unwrap())
}

#[tokio::test]
async fn a_create_is_marked_before_it_is_made_and_then_recorded() {
    let (core, env) = (core(), env(spec()));
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.action, Verb::Create);
    assert!(outcome.ready && outcome.reason == Reason::Synced);
    assert_eq!(writes(&env), ["mark pending=true", "status"]);
    assert_eq!(env.backend.calls(), ["create"]);
    let status = env.conn.lock().unwrap().status.clone().unwrap();
    assert_eq!(status.id.as_deref(), Some("id-1"));
    assert_eq!(status.version, Some(1));
    assert_eq!(env.events.lock().unwrap()[0].reason, "Created");

    // The same content again: no backend call and no write.
    let again = run(&core, &env, false).await.unwrap();
    assert_eq!(again.action, Verb::Noop);
    assert!(writes(&env).is_empty());
    assert_eq!(env.backend.calls(), ["create"]);
}

#[tokio::test]
async fn a_name_taken_by_a_stranger_is_refused_once_and_then_only_read() {
    let (core, env) = (core(), env(spec()));
    env.backend.insert("c");
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.reason, Reason::AlreadyExists);
    assert_eq!(outcome.requeue, Requeue::WaitForChange);
    assert_eq!(
        writes(&env),
        ["mark pending=true", "clear-pending", "status"]
    );

    // Its own status write triggers the next reconcile: one read, no create, no write.
    let again = run(&core, &env, false).await.unwrap();
    assert_eq!(again.reason, Reason::AlreadyExists);
    assert_eq!(env.backend.calls(), ["create", "find"]);
    assert!(writes(&env).is_empty());
}

#[tokio::test]
async fn adopt_existing_takes_the_object_over() {
    let mut with_adopt = spec();
    with_adopt["adoptExisting"] = json!(true);
    let (core, env) = (core(), env(with_adopt));
    let id = env.backend.insert("c");
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.action, Verb::Adopt);
    assert_eq!(env.backend.calls(), ["create", "find", "update"]);
    let status = env.conn.lock().unwrap().status.clone().unwrap();
    assert_eq!(status.id, Some(id));
}

#[tokio::test]
async fn a_failing_api_ends_the_reconcile_instead_of_passing_for_the_backend() {
    let (core, env) = (core(), env(spec()));
    *env.fail_mark.lock().unwrap() = true;
    let err = run(&core, &env, false).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "marking c: the object has been modified (HTTP 409 Conflict)"
    );
    assert!(env.backend.calls().is_empty(), "nothing created unmarked");
    assert!(writes(&env).is_empty(), "no status claims a backend outage");
}

#[tokio::test]
async fn content_the_backend_refused_is_not_sent_again() {
    let (core, env) = (core(), env(spec()));
    run(&core, &env, false).await.unwrap();
    writes(&env);
    let mut changed = env.conn.lock().unwrap().clone();
    changed.spec.description = Some("new".into());
    changed.metadata.generation = Some(2);
    *env.conn.lock().unwrap() = changed;
    *env.backend.reject_update.lock().unwrap() = true;
    let refused = run(&core, &env, false).await.unwrap();
    assert_eq!(refused.reason, Reason::BackendRejected);
    assert_eq!(refused.message, "port: Expected number");
    assert_eq!(refused.requeue, Requeue::WaitForChange);
    let again = run(&core, &env, false).await.unwrap();
    assert_eq!(again.reason, Reason::BackendRejected);
    assert_eq!(
        env.backend.calls(),
        ["create", "update"],
        "the refused update was not sent again"
    );
}

#[tokio::test]
async fn drift_checks_recreate_correct_or_record() {
    let (core, env) = (core(), env(spec()));
    run(&core, &env, false).await.unwrap();

    assert_eq!(run(&core, &env, true).await.unwrap().action, Verb::Verify);

    *env.backend.content_differs.lock().unwrap() = Some(true);
    let corrected = run(&core, &env, true).await.unwrap();
    assert_eq!(corrected.action, Verb::DriftCorrect);

    *env.backend.rotates.lock().unwrap() = true;
    let recorded = run(&core, &env, true).await.unwrap();
    assert_eq!(recorded.action, Verb::RecordRotation);
    assert_eq!(recorded.backend_writes, 0);

    env.backend.objects.lock().unwrap().clear();
    let recreated = run(&core, &env, true).await.unwrap();
    assert_eq!(recreated.action, Verb::Recreate);
    let reasons: Vec<&str> = env
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons,
        ["Created", "DriftCorrected", "RotationRecorded", "Recreated"]
    );
}

#[tokio::test]
async fn a_gone_object_whose_name_a_stranger_took_is_refused_then_adopted_on_request() {
    let (core, env) = (core(), env(spec()));
    run(&core, &env, false).await.unwrap();
    let theirs = "id-9".to_string();
    *env.backend.objects.lock().unwrap() =
        [(theirs.clone(), ("c".to_string(), "b-id-9".to_string()))].into();
    writes(&env);

    let refused = run(&core, &env, true).await.unwrap();
    assert_eq!(refused.reason, Reason::AlreadyExists);
    assert!(
        refused.message.contains("adoptExisting"),
        "{}",
        refused.message
    );
    assert_eq!(refused.requeue, Requeue::WaitForChange);
    assert_eq!(
        writes(&env),
        ["mark pending=true", "clear-pending", "status"]
    );
    // Its own status write brings the next reconcile: a read, no create.
    let again = run(&core, &env, true).await.unwrap();
    assert_eq!(again.reason, Reason::AlreadyExists);
    assert!(writes(&env).is_empty());
    assert_eq!(
        env.backend.calls(),
        ["create", "get", "create", "get", "find"]
    );

    let mut adopting = env.conn.lock().unwrap().clone();
    adopting.spec.adopt_existing = Some(true);
    adopting.metadata.generation = Some(2);
    *env.conn.lock().unwrap() = adopting;
    let adopted = run(&core, &env, true).await.unwrap();
    assert_eq!(adopted.action, Verb::Adopt);
    let status = env.conn.lock().unwrap().status.clone().unwrap();
    assert_eq!(status.id, Some(theirs));
}

#[tokio::test]
async fn deletion_removes_the_object_then_the_finalizer_or_orphans_it() {
    for (policy, calls, action) in [
        ("Delete", vec!["create", "delete"], Verb::Delete),
        ("Orphan", vec!["create"], Verb::Release),
    ] {
        let mut s = spec();
        s["deletionPolicy"] = json!(policy);
        let (core, env) = (core(), env(s));
        run(&core, &env, false).await.unwrap();
        env.conn.lock().unwrap().metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        writes(&env);
        let outcome = run(&core, &env, false).await.unwrap();
        assert_eq!(outcome.action, action, "{policy}");
        assert!(outcome.status.is_none());
        assert_eq!(env.backend.calls(), calls, "{policy}");
        assert_eq!(writes(&env), ["release"], "{policy}");
    }
}

#[tokio::test]
async fn an_unreachable_backend_keeps_the_finalizer_and_says_why() {
    let (core, env) = (core(), env(spec()));
    run(&core, &env, false).await.unwrap();
    env.conn.lock().unwrap().metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
    );
    *env.backend.unavailable.lock().unwrap() = true;
    writes(&env);
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.reason, Reason::BackendUnavailable);
    assert!(
        outcome
            .message
            .contains("the finalizer stays until it succeeds"),
        "{}",
        outcome.message
    );
    assert_eq!(outcome.requeue, Requeue::Backoff { retry_after: None });
    assert_eq!(writes(&env), ["status"], "no release");
}

#[tokio::test]
async fn lookups_that_fail_wait_or_back_off() {
    let (core, env) = (core(), env(spec()));
    *env.lookup.lock().unwrap() = Some(BackendLookupError::NotFound("no such backend".into()));
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(
        (outcome.reason, outcome.requeue),
        (Reason::BackendNotFound, Requeue::WaitForChange)
    );
    *env.lookup.lock().unwrap() = Some(BackendLookupError::Unavailable("API down".into()));
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(
        (outcome.reason, outcome.requeue),
        (
            Reason::BackendUnavailable,
            Requeue::Backoff { retry_after: None }
        )
    );
    assert!(env.backend.calls().is_empty());
}

#[tokio::test]
async fn a_dry_run_plans_and_changes_nothing() {
    let (core, env) = (core(), env(spec()));
    let conn = env.conn.lock().unwrap().clone();
    let planned = core
        .reconcile(
            &env,
            &conn,
            Options {
                dry_run: true,
                ..opts(false)
            },
        )
        .await
        .unwrap();
    assert_eq!(planned.action, Verb::Create);
    assert_eq!(planned.message, "would create");
    assert!(env.backend.calls().is_empty());
    assert!(writes(&env).is_empty());
}

fn tested() -> serde_json::Value {
    let mut s = spec();
    s["testConnection"] = json!(true);
    s
}

fn status(env: &MemoryEnv) -> AppConnectionStatus {
    env.conn.lock().unwrap().status.clone().unwrap()
}

#[tokio::test]
async fn a_failed_connection_test_stands_until_the_content_changes() {
    let (core, env) = (core(), env(tested()));
    *env.backend.test_failure.lock().unwrap() =
        Some("password authentication failed for user \"etl\"".into());
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.action, Verb::Create);
    assert!(!outcome.ready);
    assert_eq!(outcome.reason, Reason::ConnectionTestFailed);
    assert_eq!(
        outcome.message,
        "the connection test failed: password authentication failed for user \"etl\""
    );
    assert_eq!(outcome.requeue, Requeue::After(None));
    let written = status(&env);
    assert_eq!(written.id.as_deref(), Some("id-1"), "the write is recorded");
    assert!(written.credentials_hash.is_some());
    assert_eq!(writes(&env), ["mark pending=true", "status"]);
    let events: Vec<_> = env
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.type_, e.reason))
        .collect();
    assert_eq!(
        events,
        [
            (EventType::Normal, "Created"),
            (EventType::Warning, "ConnectionTestFailed")
        ]
    );

    // Nothing changed: the verdict stands, with no test, no write and no status write.
    for verify in [false, true] {
        let again = run(&core, &env, verify).await.unwrap();
        assert_eq!(
            again.reason,
            Reason::ConnectionTestFailed,
            "verify={verify}"
        );
        assert!(writes(&env).is_empty());
    }
    assert_eq!(env.backend.calls(), ["create", "test", "get"]);
    assert_eq!(env.events.lock().unwrap().len(), 2, "no repeated Event");

    // A change is written and tested again; passing clears the failure.
    *env.backend.test_failure.lock().unwrap() = None;
    let mut changed = env.conn.lock().unwrap().clone();
    changed.spec.description = Some("fixed".into());
    changed.metadata.generation = Some(2);
    *env.conn.lock().unwrap() = changed;
    let fixed = run(&core, &env, false).await.unwrap();
    assert_eq!((fixed.action, fixed.ready), (Verb::Update, true));
    assert_eq!(fixed.reason, Reason::Synced);
    assert_eq!(
        env.backend.calls(),
        ["create", "test", "get", "update", "test"]
    );
}

#[tokio::test]
async fn a_test_that_cannot_run_is_tried_again_with_its_write() {
    let (core, env) = (core(), env(tested()));
    *env.backend.test_unavailable.lock().unwrap() = true;
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.reason, Reason::BackendUnavailable);
    assert!(
        outcome
            .message
            .starts_with("written, but the connection test could not run"),
        "{}",
        outcome.message
    );
    assert_eq!(outcome.requeue, Requeue::Backoff { retry_after: None });
    let written = status(&env);
    assert_eq!(written.id.as_deref(), Some("id-1"), "the object is known");
    assert!(written.credentials_hash.is_none(), "but not as tested");

    *env.backend.test_unavailable.lock().unwrap() = false;
    let retried = run(&core, &env, false).await.unwrap();
    assert_eq!((retried.action, retried.ready), (Verb::Update, true));
    assert_eq!(env.backend.calls(), ["create", "test", "update", "test"]);
}

#[tokio::test]
async fn without_test_connection_nothing_is_tested() {
    let (core, env) = (core(), env(spec()));
    *env.backend.test_failure.lock().unwrap() = Some("never asked".into());
    let outcome = run(&core, &env, false).await.unwrap();
    assert!(outcome.ready);
    assert_eq!(env.backend.calls(), ["create"]);
    let untested = status(&env).credentials_hash;

    // Turning the test on is a change: written and tested once.
    let mut on = env.conn.lock().unwrap().clone();
    on.spec.test_connection = Some(true);
    on.metadata.generation = Some(2);
    *env.conn.lock().unwrap() = on;
    let outcome = run(&core, &env, false).await.unwrap();
    assert_eq!(outcome.reason, Reason::ConnectionTestFailed);
    assert_ne!(status(&env).credentials_hash, untested);
    assert_eq!(env.backend.calls(), ["create", "update", "test"]);
}
