//! The Infisical backend end to end: the real operator (controllers, backend status, reconcile
//! core, reqwest client) against the Kubernetes API test server (or a real cluster with
//! APPCONN_TEST_KUBECONFIG) and the fake Infisical server.
//!
//! Counts come from the fake's request records and the API server's write counters.

mod common;

use std::time::Duration;

use appconn::crd::{AppConnection, ConnectionBackend, ConnectionBackendStatus};
use appconn_testkit::fake::infisical::FakeInfisical;
use common::{
    Cluster, Operator, OperatorSettings, Paths, backend_condition, backend_ready, backend_reason,
    condition, eventually, ready, reason_is,
};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const CLIENT_ID: &str = "5a0c4f0e-7d8b-4a55-9d3e-2f1b6c7d8e9f";
const CLIENT_SECRET: &str = "mi-client-secret-0042";
const PROJECT: &str = "6f1c2a9e-0b1d-4c55-9a57-3d1f1f1b2c3d";
/// A value that must never show up in a status, an Event or a condition message.
const CANARY: &str = "zebra-canary-7781";
const CONNECTIONS: &str = "/api/v1/app-connections/";
const BACKEND: &str = "infisical";

/// A cluster, the fake with one machine identity, and the identity's Secret.
struct Env {
    cluster: Cluster,
    fake: FakeInfisical,
    paths: Paths,
}

impl Env {
    async fn start() -> Env {
        let cluster = Cluster::start().await;
        let fake = FakeInfisical::start().await;
        fake.add_identity(CLIENT_ID, CLIENT_SECRET);
        cluster
            .put_secret(
                "infisical-mi",
                &[("clientId", CLIENT_ID), ("clientSecret", CLIENT_SECRET)],
            )
            .await;
        Env {
            cluster,
            fake,
            paths: Paths::temporary(),
        }
    }

    async fn operator(&self, settings: OperatorSettings) -> Operator {
        Operator::start(&self.cluster, &self.paths, settings).await
    }

    fn backends(&self) -> Api<ConnectionBackend> {
        self.cluster.backends()
    }

    /// A ConnectionBackend for the fake, its identity read from Secret `secret`.
    async fn create_backend(&self, name: &str, secret: &str) {
        let spec = json!({
            "infisical": {
                "url": self.fake.url(),
                "projectId": PROJECT,
                "auth": {"universalAuth": {
                    "clientId": {"secretKeyRef": {"name": secret, "key": "clientId"}},
                    "clientSecret": {"secretKeyRef": {"name": secret, "key": "clientSecret"}},
                }},
            },
            "rateLimit": {"requestsPerSecond": 200, "burst": 200},
        });
        self.create_backend_with(name, spec).await;
    }

    async fn create_backend_with(&self, name: &str, spec: Value) {
        self.cluster.create_backend(name, spec).await;
    }

    /// Polls the backend until `check` holds.
    async fn wait_backend(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&ConnectionBackendStatus) -> bool,
    ) -> ConnectionBackend {
        self.cluster.wait_backend(name, WAIT, what, check).await
    }

    /// The three quickstart Secrets, in the test's namespace.
    async fn quickstart_secrets(&self) {
        self.cluster
            .put_secret(
                "databricks-sp",
                &[
                    ("clientId", "6c2ab7d4-1f0e-4b8a-9d57-0c3f2e1a9b10"),
                    ("clientSecret", "example-not-a-real-secret-1"),
                ],
            )
            .await;
        self.cluster
            .put_secret(
                "mssql",
                &[
                    ("username", "svc_analytics"),
                    ("password", "example-password-change-me"),
                    ("ssl", "true"),
                ],
            )
            .await;
        self.cluster
            .put_secret(
                "key-vault-app",
                &[
                    ("clientId", "0f8fad5b-d9cb-469f-a165-70867728950e"),
                    ("clientSecret", "example-client-secret-change-me"),
                    ("tenantId", "7d1c2b3a-4e5f-4a6b-8c9d-0e1f2a3b4c5d"),
                ],
            )
            .await;
    }

    /// The quickstart's three connections, through `backend`.
    async fn quickstart(&self, backend: &str) {
        self.quickstart_secrets().await;
        self.cluster
            .create_connection("lakehouse", databricks(backend))
            .await;
        self.cluster
            .create_connection("warehouse", mssql(backend))
            .await;
        self.cluster
            .create_connection("key-vault", key_vault(backend))
            .await;
    }

    /// (reason, note) of the Events about `name`.
    async fn events_about(&self, name: &str) -> Vec<(String, String)> {
        self.cluster
            .events_about(name)
            .await
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    async fn wait_event(&self, name: &str, reason: &str) -> String {
        let event = self.cluster.wait_event(name, reason, WAIT).await;
        event.note.unwrap_or_default()
    }

    fn id_of(&self, conn: &AppConnection) -> String {
        conn.status.as_ref().and_then(|s| s.id.clone()).unwrap()
    }

    /// The object the fake stores under the connection's recorded id, secrets included.
    fn stored(&self, conn: &AppConnection) -> Value {
        self.fake
            .stored(&self.id_of(conn))
            .expect("the recorded id exists at the server")
    }
}

fn backend_ref(backend: &str) -> Value {
    json!({"kind": "ConnectionBackend", "name": backend})
}

fn databricks(backend: &str) -> Value {
    json!({
        "backendRef": backend_ref(backend),
        "app": "databricks",
        "method": "service-principal",
        "description": "Databricks workspace for the analytics team",
        "credentials": {
            "clientId": {"secretKeyRef": {"name": "databricks-sp", "key": "clientId"}},
            "clientSecret": {"secretKeyRef": {"name": "databricks-sp", "key": "clientSecret"}},
            "workspaceUrl": {"value": "https://dbc-1a2b3c4d-5e6f.cloud.databricks.com"},
        },
    })
}

fn mssql(backend: &str) -> Value {
    json!({
        "backendRef": backend_ref(backend),
        "app": "mssql",
        "method": "username-and-password",
        "connectionName": "warehouse-prod",
        "description": "Analytics warehouse",
        "credentials": {
            "host": {"value": "sql.internal"},
            "port": {"value": 1433},
            "database": {"value": "analytics"},
            "username": {"secretKeyRef": {"name": "mssql", "key": "username"}},
            "password": {"secretKeyRef": {"name": "mssql", "key": "password"}},
            "sslEnabled": {"secretKeyRef": {"name": "mssql", "key": "ssl", "format": "boolean"}},
            "sslRejectUnauthorized": {"value": true},
        },
    })
}

fn key_vault(backend: &str) -> Value {
    json!({
        "backendRef": backend_ref(backend),
        "app": "azure-key-vault",
        "method": "client-secret",
        "description": "Platform Key Vault",
        "credentialsFrom": [{"secretRef": {"name": "key-vault-app"}}],
        "rotation": {"enabled": true, "intervalDays": 30, "rotateAtUtc": {"hours": 11, "minutes": 29}},
    })
}

fn writes_to_fake(fake: &FakeInfisical) -> (usize, usize, usize) {
    (
        fake.count("POST", CONNECTIONS),
        fake.count("PATCH", CONNECTIONS),
        fake.count("DELETE", CONNECTIONS),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_through_the_controller_then_one_patch_per_secret_change() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;

    // The backend's own check: a real login and /api/status.
    let backend = env.wait_backend(BACKEND, "Ready", backend_ready).await;
    let status = backend.status.clone().unwrap();
    assert_eq!(status.type_.as_deref(), Some("infisical"));
    assert_eq!(status.observed_generation, backend.metadata.generation);
    assert!(status.last_check_time.is_some());
    assert_eq!(backend_condition(&status).unwrap().1, "Synced");
    assert_eq!(env.fake.logins(), 1);
    assert!(env.fake.count("GET", "/api/status") >= 1);
    if let Some(writes) = env.cluster.writes("connectionbackends/status") {
        assert_eq!(writes, 1, "one status write for a new backend");
    }

    env.quickstart(BACKEND).await;

    for name in ["lakehouse", "warehouse", "key-vault"] {
        let conn = env.cluster.wait_for(name, WAIT, "Ready", ready).await;
        let status = conn.status.clone().unwrap();
        let stored = env.stored(&conn);
        assert_eq!(stored["id"].as_str(), status.id.as_deref(), "{name}");
        assert_eq!(
            stored["projectId"], PROJECT,
            "{name}: the backend's project"
        );
        let backend = status.backend.unwrap();
        assert_eq!(
            (
                backend.kind.as_str(),
                backend.name.as_str(),
                backend.type_.as_str()
            ),
            ("ConnectionBackend", BACKEND, "infisical")
        );
        assert_eq!(
            status.backend_credentials_hash.as_deref(),
            stored["credentialsHash"].as_str(),
            "{name}: the server's hash is recorded"
        );
        assert_eq!(status.version, Some(1));
    }
    assert_eq!(
        env.fake.logins(),
        1,
        "the backend check and the connections share one client, so one login"
    );
    let warehouse = env.cluster.connections().get("warehouse").await.unwrap();
    let stored = env.stored(&warehouse);
    assert_eq!(stored["name"], "warehouse-prod");
    assert_eq!(
        stored["credentials"],
        json!({"host": "sql.internal", "port": 1433, "database": "analytics",
               "username": "svc_analytics", "password": "example-password-change-me",
               "sslEnabled": true, "sslRejectUnauthorized": true})
    );
    let vault = env.cluster.connections().get("key-vault").await.unwrap();
    let stored_vault = env.stored(&vault);
    assert_eq!(stored_vault["isAutoRotationEnabled"], true);
    assert_eq!(
        stored_vault["rotation"]["rotateAtUtc"],
        json!({"hours": 11, "minutes": 29})
    );
    assert_eq!(stored_vault["rotation"]["rotationInterval"], 30);
    let rotation = vault.status.unwrap().rotation.expect("status.rotation");
    assert!(rotation.enabled);
    let next = rotation.next_rotation_at.expect("nextRotationAt").0;
    assert_eq!(
        next.to_string(),
        stored_vault["rotation"]["nextRotationAt"]
            .as_str()
            .unwrap()
            .replace(".000Z", "Z"),
    );
    assert!(next.to_string().contains("T11:29:00"), "{next}");

    assert_eq!(env.fake.stored_all().len(), 3);
    assert_eq!(
        writes_to_fake(&env.fake),
        (3, 0, 0),
        "three creates, nothing else"
    );
    let logins = env.fake.logins();

    // A Secret change: exactly one PATCH, carrying the new value, on the same object.
    let id = env.id_of(&warehouse);
    env.cluster
        .put_secret(
            "mssql",
            &[
                ("username", "svc_analytics"),
                ("password", "a-new-password"),
                ("ssl", "true"),
            ],
        )
        .await;
    let updated = env
        .cluster
        .wait_for("warehouse", WAIT, "version 2", |c| {
            c.status.as_ref().and_then(|s| s.version) == Some(2)
        })
        .await;
    assert_eq!(env.id_of(&updated), id);
    assert_eq!(
        env.stored(&updated)["credentials"]["password"],
        "a-new-password"
    );
    // A quiet second in which a duplicate or a late write would show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let patches: Vec<String> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        patches,
        vec![format!("{CONNECTIONS}mssql/{id}")],
        "exactly one PATCH, to the changed connection"
    );
    assert_eq!(env.fake.count("POST", CONNECTIONS), 3);
    assert_eq!(env.fake.logins(), logins, "the token is reused");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_resync_sends_nothing_and_writes_nothing() {
    let env = Env::start().await;
    let settings = OperatorSettings {
        refresh: Duration::from_millis(400),
        ..Default::default()
    };
    let operator = env.operator(settings).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart(BACKEND).await;
    for name in ["lakehouse", "warehouse", "key-vault"] {
        env.cluster.wait_for(name, WAIT, "Ready", ready).await;
    }
    env.wait_backend(BACKEND, "Ready", backend_ready).await;
    // Let the writes of convergence (status, events) land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let api_writes = || env.cluster.server.as_ref().map(|s| s.total_writes());
    let before = (writes_to_fake(&env.fake), api_writes());
    let reads_before = env.fake.count("GET", CONNECTIONS);
    let logins_before = env.fake.logins();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = (writes_to_fake(&env.fake), api_writes());
    let reads_after = env.fake.count("GET", CONNECTIONS);
    assert_eq!(
        before, after,
        "no POST/PATCH/DELETE at the server and no API write over several refresh periods"
    );
    assert!(
        reads_after >= reads_before + 6,
        "the drift checks did read the three objects (GETs {reads_before} -> {reads_after})"
    );
    assert_eq!(env.fake.logins(), logins_before, "the token is reused");
    println!(
        "steady state: {} drift-check GETs in 3 s, 0 backend writes, 0 API writes",
        reads_after - reads_before
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_create_and_status_write_leaves_no_duplicate() {
    let env = Env::start().await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.cluster
        .create_connection("warehouse", mssql(BACKEND))
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    let id = env.id_of(&conn);
    operator.stop().await;

    env.cluster.lose_status("warehouse").await;

    let operator = env.operator(OperatorSettings::default()).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready with an id again", |c| {
            ready(c) && c.status.as_ref().and_then(|s| s.id.as_ref()).is_some()
        })
        .await;
    assert_eq!(env.id_of(&conn), id, "the same object was adopted");
    assert_eq!(env.fake.stored_all().len(), 1, "one object at the server");
    assert_eq!(env.fake.count("POST", CONNECTIONS), 1, "created once");
    assert!(
        env.fake.count(
            "GET",
            &format!("{CONNECTIONS}mssql/connection-name/warehouse-prod")
        ) >= 1,
        "found by name"
    );
    env.wait_event("warehouse", "Adopted").await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_on_mssql_is_refused_with_infisicals_message() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    let mut spec = mssql(BACKEND);
    spec["rotation"] =
        json!({"enabled": true, "intervalDays": 30, "rotateAtUtc": {"hours": 11, "minutes": 29}});
    env.cluster.create_connection("warehouse", spec).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "BackendRejected", |c| {
            reason_is(c, "BackendRejected")
        })
        .await;
    let (status, _, message) = condition(&conn).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains(
            "Auto-rotation is not supported for Microsoft SQL Server connections using the \"username-and-password\" method"
        ),
        "{message}"
    );
    assert!(env.fake.stored_all().is_empty());
    let note = env.wait_event("warehouse", "BackendRejected").await;
    assert!(note.contains("Auto-rotation is not supported"), "{note}");
    // Invalid input waits for a change: once the operator's own writes have echoed back (a
    // reconcile or two), no further attempt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posts = env.fake.count("POST", CONNECTIONS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.fake.count("POST", CONNECTIONS), posts, "no retry loop");
    assert_eq!(posts, 1, "one create attempt for one content");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_by_the_server_is_recorded_and_never_undone() {
    let env = Env::start().await;
    let settings = OperatorSettings {
        refresh: Duration::from_millis(300),
        ..Default::default()
    };
    let operator = env.operator(settings).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    env.cluster
        .create_connection("key-vault", key_vault(BACKEND))
        .await;
    let conn = env
        .cluster
        .wait_for("key-vault", WAIT, "Ready", ready)
        .await;
    let status = conn.status.clone().unwrap();
    let rotation = status.rotation.clone().expect("status.rotation");
    assert!(rotation.enabled);
    assert!(rotation.next_rotation_at.is_some());
    let hash_before = status.backend_credentials_hash.clone().unwrap();
    let before = status.clone();
    let id = env.id_of(&conn);

    assert!(env.fake.rotate_now(&id));
    let rotated = env.fake.stored(&id).unwrap();
    let new_hash = rotated["credentialsHash"].as_str().unwrap().to_string();
    assert_ne!(new_hash, hash_before);
    let conn = env
        .cluster
        .wait_for("key-vault", WAIT, "the new hash recorded", |c| {
            c.status
                .as_ref()
                .and_then(|s| s.backend_credentials_hash.as_deref())
                == Some(new_hash.as_str())
        })
        .await;
    let status = conn.status.unwrap();
    let rotation = status.rotation.unwrap();
    assert_eq!(rotation.status.as_deref(), Some("success"));
    assert!(rotation.next_rotation_at.is_some());
    assert_eq!(
        (status.credentials_hash, status.version),
        (before.credentials_hash, before.version),
        "what appconn wrote is unchanged: the rotation is the server's"
    );
    env.wait_event("key-vault", "RotationRecorded").await;
    // Several more drift checks: the rotated secret stays, nothing is pushed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        writes_to_fake(&env.fake),
        (1, 0, 0),
        "no PATCH after the rotation"
    );
    let stored = env.fake.stored(&id).unwrap();
    assert!(
        stored["credentials"]["clientSecret"]
            .as_str()
            .unwrap()
            .starts_with("rotated-"),
        "the server's rotated secret was not overwritten"
    );
    assert_eq!(stored["credentialsHash"], new_hash.as_str());
    assert!(
        !env.events_about("key-vault")
            .await
            .iter()
            .any(|(r, _)| r == "DriftCorrected")
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_at_the_server_needs_adopt_existing() {
    let env = Env::start().await;
    let existing = env.fake.insert_connection(
        "mssql",
        "username-and-password",
        "warehouse-prod",
        Some(PROJECT),
        json!({"host": "old.internal", "port": 1433, "database": "analytics", "username": "someone",
               "password": "their-password", "sslEnabled": false, "sslRejectUnauthorized": false}),
    );
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    env.cluster
        .create_connection("warehouse", mssql(BACKEND))
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "AlreadyExists", |c| {
            reason_is(c, "AlreadyExists")
        })
        .await;
    assert!(condition(&conn).unwrap().2.contains("adoptExisting"));
    assert_eq!(env.fake.stored_all().len(), 1);
    assert_eq!(
        env.fake.stored(&existing).unwrap()["credentials"]["password"],
        "their-password",
        "untouched"
    );

    env.cluster
        .connections()
        .patch(
            "warehouse",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"adoptExisting": true}})),
        )
        .await
        .unwrap();
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "adopted", ready)
        .await;
    assert_eq!(env.id_of(&conn), existing);
    let stored = env.fake.stored(&existing).unwrap();
    assert_eq!(
        stored["credentials"]["password"],
        "example-password-change-me"
    );
    assert_eq!(stored["credentials"]["host"], "sql.internal");
    assert_eq!(env.fake.stored_all().len(), 1);
    operator.stop().await;
}

/// A refused create waits for a change (DESIGN 2.6): the marker written and cleared around the
/// refused create must not trigger create after create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_is_not_retried_in_a_loop() {
    let env = Env::start().await;
    env.fake.insert_connection(
        "databricks",
        "service-principal",
        "lakehouse",
        Some(PROJECT),
        json!({"clientId": "c", "clientSecret": "s", "workspaceUrl": "https://w"}),
    );
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    env.cluster
        .create_connection("lakehouse", databricks(BACKEND))
        .await;
    env.cluster
        .wait_for("lakehouse", WAIT, "AlreadyExists", |c| {
            reason_is(c, "AlreadyExists")
        })
        .await;
    let posts = env.fake.count("POST", CONNECTIONS);
    let writes = env.cluster.writes("appconnections");
    // A quiet second: a loop shows here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (posts_after, writes_after) = (
        env.fake.count("POST", CONNECTIONS),
        env.cluster.writes("appconnections"),
    );
    assert!(
        posts_after <= posts + 1,
        "creates retried in a loop: {posts} -> {posts_after}"
    );
    assert!(
        writes_after.zip(writes).is_none_or(|(a, b)| a <= b + 2),
        "AppConnection writes in a loop: {writes:?} -> {writes_after:?}"
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_status_follows_its_identity_and_holds_its_connections() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;

    // A backend whose Secret does not exist yet.
    env.create_backend("wrong", "wrong-mi").await;
    let backend = env
        .wait_backend("wrong", "BackendNotReady", |s| {
            backend_reason(s, "BackendNotReady")
        })
        .await;
    let (_, _, message) = backend_condition(backend.status.as_ref().unwrap()).unwrap();
    assert!(message.contains("\"wrong-mi\""), "{message}");
    assert_eq!(env.fake.logins(), 0, "no login without credentials");

    // The Secret appears with a wrong clientSecret: a real login is refused.
    env.cluster
        .put_secret(
            "wrong-mi",
            &[("clientId", CLIENT_ID), ("clientSecret", CANARY)],
        )
        .await;
    let backend = env
        .wait_backend("wrong", "BackendAuthFailed", |s| {
            backend_reason(s, "BackendAuthFailed")
        })
        .await;
    let status = backend.status.clone().unwrap();
    let (ready_status, _, message) = backend_condition(&status).unwrap();
    assert_eq!(ready_status, "False");
    assert!(message.contains("401"), "{message}");
    assert!(env.fake.logins() >= 1);

    // Its connections wait for it, with its reason in their message.
    env.quickstart_secrets().await;
    env.cluster
        .create_connection("warehouse", mssql("wrong"))
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "BackendNotReady", |c| {
            reason_is(c, "BackendNotReady")
        })
        .await;
    let (_, _, message) = condition(&conn).unwrap();
    assert!(message.contains("\"wrong\" is not ready"), "{message}");
    assert!(env.fake.stored_all().is_empty());

    // Fixing the Secret brings the backend and then its connection.
    env.cluster
        .put_secret(
            "wrong-mi",
            &[("clientId", CLIENT_ID), ("clientSecret", CLIENT_SECRET)],
        )
        .await;
    env.wait_backend("wrong", "Ready", backend_ready).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready after the fix", ready)
        .await;
    assert_eq!(env.stored(&conn)["name"], "warehouse-prod");
    assert!(!env.fake.is_locked(CLIENT_ID), "never locked out");
    // The wrong secret was tried once: later checks with it waited for the cool-down, and the
    // fixed Secret brought a new client.
    let refused = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.is_login() && r.status == 401)
        .count();
    assert_eq!(refused, 1, "logins with the wrong secret");

    let events = env.events_about("wrong").await;
    assert!(
        events.iter().any(|(r, _)| r == "BackendAuthFailed"),
        "{events:?}"
    );
    assert!(events.iter().any(|(r, _)| r == "Synced"), "{events:?}");
    let everything = format!(
        "{:?}{:?}{:?}",
        env.backends().get("wrong").await.unwrap().status,
        events,
        env.cluster
            .connections()
            .get("warehouse")
            .await
            .unwrap()
            .status
    );
    assert!(!everything.contains(CANARY), "a secret value leaked");

    // A healthy backend stays as it is: its status is not rewritten.
    let status_writes = env.cluster.writes("connectionbackends/status");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.cluster.writes("connectionbackends/status"),
        status_writes
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_is_ready_without_a_call_and_a_bad_url_is_invalid_spec() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend_with("local", json!({"builtin": {}}))
        .await;
    env.create_backend_with(
        "bad-url",
        json!({"infisical": {
            "url": "infisical.internal:8080",
            "auth": {"universalAuth": {
                "clientId": {"secretKeyRef": {"name": "infisical-mi", "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": "infisical-mi", "key": "clientSecret"}},
            }},
        }}),
    )
    .await;

    let local = env.wait_backend("local", "Ready", backend_ready).await;
    let status = local.status.unwrap();
    assert_eq!(status.type_.as_deref(), Some("builtin"));
    assert_eq!(backend_condition(&status).unwrap().1, "Synced");
    let bad = env
        .wait_backend("bad-url", "InvalidSpec", |s| {
            backend_reason(s, "InvalidSpec")
        })
        .await;
    let (_, _, message) = backend_condition(bad.status.as_ref().unwrap()).unwrap();
    assert!(message.contains("infisical.url"), "{message}");
    assert!(env.fake.requests().is_empty(), "no request to any server");

    // A connection through the built-in ConnectionBackend works as the default store does.
    env.quickstart_secrets().await;
    let mut spec = mssql(BACKEND);
    spec["backendRef"] = json!({"kind": "ConnectionBackend", "name": "local"});
    env.cluster.create_connection("warehouse", spec).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    assert_eq!(conn.status.unwrap().backend.unwrap().type_, "builtin");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_identity_secret_reaches_the_clients_already_built() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    env.cluster
        .create_connection("warehouse", mssql(BACKEND))
        .await;
    env.cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    env.wait_backend(BACKEND, "Ready", backend_ready).await;

    // The identity's client secret is rotated at Infisical: the old one and its tokens stop
    // working; the Secret gets the new one.
    const ROTATED: &str = "mi-client-secret-0043";
    env.fake.add_identity(CLIENT_ID, ROTATED);
    env.fake.revoke_all_tokens();
    env.cluster
        .put_secret(
            "infisical-mi",
            &[("clientId", CLIENT_ID), ("clientSecret", ROTATED)],
        )
        .await;
    // The next write through the backend logs in with the new secret.
    env.cluster
        .put_secret(
            "mssql",
            &[
                ("username", "svc_analytics"),
                ("password", "after-the-rotation"),
                ("ssl", "true"),
            ],
        )
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready at version 2", |c| {
            // A backend check already under way with the old secret may flip the backend (and
            // so the connection) to not ready for a moment; it settles on the new secret.
            ready(c) && c.status.as_ref().and_then(|s| s.version) == Some(2)
        })
        .await;
    assert_eq!(
        env.stored(&conn)["credentials"]["password"],
        "after-the-rotation"
    );
    // A reconcile already under way when the Secret changed may try the old client once; its
    // refused login is not repeated, and the next reconcile gets a client with the new secret.
    let refused = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.is_login() && r.status == 401)
        .count();
    assert!(refused <= 1, "{refused} logins with the old secret");
    assert!(!env.fake.is_locked(CLIENT_ID));
    // The identity really was refused between the rotation and the Secret update, so a check
    // in that window may report it; the backend settles Ready on the new secret.
    env.wait_backend(BACKEND, "Ready", backend_ready).await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_removes_the_object_at_the_server_unless_orphaned() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.quickstart_secrets().await;
    env.cluster
        .create_connection("lakehouse", databricks(BACKEND))
        .await;
    let mut orphan = mssql(BACKEND);
    orphan["deletionPolicy"] = json!("Orphan");
    env.cluster.create_connection("warehouse", orphan).await;
    let deleted = env
        .cluster
        .wait_for("lakehouse", WAIT, "Ready", ready)
        .await;
    let kept = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    let (deleted_id, kept_id) = (env.id_of(&deleted), env.id_of(&kept));

    for name in ["lakehouse", "warehouse"] {
        env.cluster
            .connections()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    env.cluster.wait_gone("lakehouse", WAIT).await;
    env.cluster.wait_gone("warehouse", WAIT).await;
    assert!(
        env.fake.stored(&deleted_id).is_none(),
        "Delete: gone at the server"
    );
    assert!(
        env.fake.stored(&kept_id).is_some(),
        "Orphan: left at the server"
    );
    let deletes: Vec<String> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        deletes,
        vec![format!("{CONNECTIONS}databricks/{deleted_id}")]
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_stay_out_of_status_and_events() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND, "infisical-mi").await;
    env.cluster
        .put_secret(
            "mssql",
            &[
                ("username", "svc_analytics"),
                ("password", CANARY),
                ("ssl", "true"),
            ],
        )
        .await;
    env.cluster
        .create_connection("warehouse", mssql(BACKEND))
        .await;
    env.cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    // The server now refuses live validation and echoes the password in its message.
    env.fake
        .fail_live_validation(Some("Unable to validate connection: login failed"));
    env.fake.echo_credential_in_errors(Some("password"));
    env.cluster
        .put_secret(
            "mssql",
            &[
                ("username", "svc_analytics"),
                ("password", &format!("{CANARY}-2")),
                ("ssl", "true"),
            ],
        )
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "BackendRejected", |c| {
            reason_is(c, "BackendRejected")
        })
        .await;
    let (_, _, message) = condition(&conn).unwrap();
    assert!(
        message.contains("Unable to validate connection"),
        "{message}"
    );
    eventually(WAIT, "the rejection Event", || async {
        env.events_about("warehouse")
            .await
            .iter()
            .any(|(r, _)| r == "BackendRejected")
    })
    .await;
    let everything = format!(
        "{:?}{:?}{:?}",
        conn.status,
        conn.metadata.annotations,
        env.events_about("warehouse").await
    );
    assert!(
        !everything.contains(CANARY),
        "a secret value leaked: {everything}"
    );
    operator.stop().await;
}
