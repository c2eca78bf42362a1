//! The Credible backend end to end: the real operator (controllers, backend status, reconcile
//! core, reqwest client) against the Kubernetes API test server (or a real cluster with
//! APPCONN_TEST_KUBECONFIG) and the fake Credible server.
//!
//! Counts come from the fake's request records and the API server's write counters (the
//! latter only against the test server). `cargo test --test credible_e2e -- --nocapture`
//! prints the request counts per operation.

mod common;

use std::time::Duration;

use appconn::crd::AppConnection;
use appconn_testkit::fake::credible::FakeCredible;
use common::{
    Cluster, Operator, OperatorSettings, Paths, backend_condition, backend_ready, backend_reason,
    condition, ready, reason_is,
};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const PROJECT: &str = "analytics";
const BACKEND: &str = "credible";
const TOKEN: &str = "credible-api-token-0042";
const CONNECTIONS: &str = "/api/v0/projects/analytics/connections";
/// A value that must never show up in a status, an Event or a condition message.
const CANARY: &str = "zebra-canary-7781";

/// A cluster, the fake with the project, and the token's Secret.
struct Env {
    cluster: Cluster,
    fake: FakeCredible,
    paths: Paths,
}

impl Env {
    async fn start() -> Env {
        let cluster = Cluster::start().await;
        let fake = FakeCredible::start().await;
        fake.add_project(PROJECT);
        fake.require_token(Some(TOKEN));
        cluster
            .put_secret("credible-api", &[("token", TOKEN)])
            .await;
        Env {
            cluster,
            fake,
            paths: Paths::temporary(),
        }
    }

    /// The operator running with drift checks every `refresh`, the backend Ready, and the
    /// connections' Secrets in place.
    async fn running(refresh: Duration) -> (Env, Operator) {
        let env = Env::start().await;
        let operator = env.operator(refresh).await;
        env.ready_backend().await;
        env.secrets().await;
        (env, operator)
    }

    async fn operator(&self, refresh: Duration) -> Operator {
        let settings = OperatorSettings {
            refresh,
            ..Default::default()
        };
        Operator::start(&self.cluster, &self.paths, settings).await
    }

    /// A ConnectionBackend for the fake, its token read from Secret `secret`, key `token`.
    async fn create_backend(&self, name: &str, project: &str, secret: &str) {
        let spec = json!({
            "credible": {
                "url": self.fake.url(),
                "project": project,
                "token": {"secretKeyRef": {"name": secret, "key": "token"}},
            },
            "rateLimit": {"requestsPerSecond": 200, "burst": 200},
        });
        self.cluster.create_backend(name, spec).await;
    }

    async fn ready_backend(&self) {
        self.create_backend(BACKEND, PROJECT, "credible-api").await;
        self.cluster
            .wait_backend(BACKEND, WAIT, "Ready", backend_ready)
            .await;
    }

    async fn secrets(&self) {
        self.cluster
            .put_secret("warehouse-db", &[("password", "pg-password-1")])
            .await;
        self.cluster
            .put_secret(
                "snowflake",
                &[("username", "ANALYST"), ("password", "sf-password-1")],
            )
            .await;
        self.cluster
            .put_secret(
                "bigquery",
                &[("serviceAccountKeyJson", r#"{"type":"service_account"}"#)],
            )
            .await;
    }

    /// The connection as the fake stores it, secrets included.
    fn stored(&self, name: &str) -> Value {
        self.fake
            .stored(PROJECT, name)
            .unwrap_or_else(|| panic!("{name} at the server"))
    }

    fn writes(&self) -> (usize, usize, usize) {
        (
            self.fake.count("POST", CONNECTIONS),
            self.fake.count("PATCH", CONNECTIONS),
            self.fake.count("DELETE", CONNECTIONS),
        )
    }

    fn gets(&self) -> usize {
        self.fake.count("GET", &format!("{CONNECTIONS}/"))
    }
}

fn backend_ref() -> Value {
    json!({"kind": "ConnectionBackend", "name": BACKEND})
}

fn postgres() -> Value {
    json!({
        "backendRef": backend_ref(),
        "app": "postgres",
        "connectionName": "warehouse",
        "credentials": {
            "host": {"value": "db.internal"},
            "port": {"value": 5432},
            "databaseName": {"value": "sales"},
            "userName": {"value": "etl"},
            "password": {"secretKeyRef": {"name": "warehouse-db", "key": "password"}},
        },
    })
}

fn snowflake() -> Value {
    json!({
        "backendRef": backend_ref(),
        "app": "snowflake",
        "connectionName": "snow",
        "credentials": {
            "account": {"value": "acme-xy12345"},
            "username": {"secretKeyRef": {"name": "snowflake", "key": "username"}},
            "password": {"secretKeyRef": {"name": "snowflake", "key": "password"}},
            "responseTimeoutMilliseconds": {"value": 30000},
        },
        "settings": {"warehouse": "COMPUTE_WH", "database": "ANALYTICS", "role": "ANALYST"},
    })
}

fn bigquery() -> Value {
    json!({
        "backendRef": backend_ref(),
        "app": "bigquery",
        "connectionName": "lake",
        "credentials": {
            "defaultProjectId": {"value": "acme-analytics"},
            "location": {"value": "EU"},
            "serviceAccountKeyJson": {"secretKeyRef": {"name": "bigquery", "key": "serviceAccountKeyJson"}},
        },
    })
}

fn id_of(conn: &AppConnection) -> String {
    conn.status.as_ref().and_then(|s| s.id.clone()).unwrap()
}

fn version(conn: &AppConnection) -> Option<i64> {
    conn.status.as_ref().and_then(|s| s.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_created_then_one_patch_per_secret_change() {
    let env = Env::start().await;
    let operator = env.operator(Duration::from_secs(600)).await;
    env.create_backend(BACKEND, PROJECT, "credible-api").await;
    let backend = env
        .cluster
        .wait_backend(BACKEND, WAIT, "Ready", backend_ready)
        .await;
    let status = backend.status.unwrap();
    assert_eq!(status.type_.as_deref(), Some("credible"));
    let (_, reason, message) = backend_condition(&status).unwrap();
    assert_eq!(reason, "Synced");
    assert_eq!(message, "credible accepted the credentials and is healthy");
    assert!(
        env.fake.count("GET", CONNECTIONS) >= 1,
        "the check lists the project"
    );

    env.secrets().await;
    for (name, spec) in [
        ("warehouse", postgres()),
        ("snow", snowflake()),
        ("lake", bigquery()),
    ] {
        env.cluster.create_connection(name, spec).await;
    }
    for (name, app, block) in [
        (
            "warehouse",
            "postgres",
            json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
                   "userName": "etl", "password": "pg-password-1"}),
        ),
        (
            "snow",
            "snowflake",
            json!({"account": "acme-xy12345", "username": "ANALYST", "password": "sf-password-1",
                   "responseTimeoutMilliseconds": 30000, "warehouse": "COMPUTE_WH",
                   "database": "ANALYTICS", "role": "ANALYST"}),
        ),
        (
            "lake",
            "bigquery",
            json!({"defaultProjectId": "acme-analytics", "location": "EU",
                   "serviceAccountKeyJson": r#"{"type":"service_account"}"#}),
        ),
    ] {
        let conn = env.cluster.wait_for(name, WAIT, "Ready", ready).await;
        let status = conn.status.clone().unwrap();
        assert_eq!(
            status.id.as_deref(),
            Some(format!("projects/{PROJECT}/connections/{name}").as_str())
        );
        assert_eq!(status.connection_name.as_deref(), Some(name));
        let backend = status.backend.unwrap();
        assert_eq!(
            (
                backend.kind.as_str(),
                backend.name.as_str(),
                backend.type_.as_str()
            ),
            ("ConnectionBackend", BACKEND, "credible")
        );
        assert_eq!(status.version, Some(1));
        assert!(
            status.backend_credentials_hash.is_none(),
            "Credible has no hash"
        );
        let stored = env.stored(name);
        assert_eq!(
            (&stored["name"], &stored["type"]),
            (&json!(name), &json!(app))
        );
        assert_eq!(stored[format!("{app}Connection")], block, "{name}");
        assert_eq!(
            condition(&conn).unwrap().2,
            format!("connection is synced to ConnectionBackend {BACKEND}")
        );
    }
    assert_eq!(env.writes(), (3, 0, 0), "three creates, nothing else");
    let creates = env.writes().0;
    // Two API writes per new connection: the finalizer with the create-pending mark, then the
    // status (the test's own three creates count as writes to appconnections too).
    if let (Some(marks), Some(statuses)) = (
        env.cluster.writes("appconnections"),
        env.cluster.writes("appconnections/status"),
    ) {
        assert_eq!((marks, statuses), (3 + 3, 3));
    }

    // A Secret change: exactly one PATCH, carrying the whole block with the new value.
    env.cluster
        .put_secret("warehouse-db", &[("password", "pg-password-2")])
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "version 2", |c| version(c) == Some(2))
        .await;
    assert_eq!(id_of(&conn), "projects/analytics/connections/warehouse");
    // A quiet second in which a duplicate or a late write would show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let patches: Vec<String> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path)
        .collect();
    assert_eq!(patches, [format!("{CONNECTIONS}/warehouse")]);
    assert_eq!(
        env.stored("warehouse")["postgresConnection"],
        json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
               "userName": "etl", "password": "pg-password-2"}),
        "the PATCH carried the whole block"
    );
    assert_eq!(env.writes(), (3, 1, 0));
    assert!(
        env.fake.requests().iter().all(|r| r.bearer),
        "every request carries the token"
    );
    // The backend's own checks list the project (on creation, and again on its status echo).
    let checks = env.fake.count("GET", CONNECTIONS) - env.gets();
    assert_eq!(
        env.gets(),
        0,
        "no read of a connection without a drift check due"
    );
    assert_eq!(
        env.fake.requests().len(),
        checks + creates + 1,
        "the backend checks, the creates, the PATCH: nothing else: {:?}",
        env.fake.requests()
    );
    println!(
        "credible e2e: {creates} creates (POST) for 3 connections, {} PATCH (the whole block) \
         for 1 Secret change, {} GETs of a connection without a drift check due, {checks} \
         backend checks (GET of the project's list)",
        env.writes().1,
        env.gets()
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_sends_only_the_drift_reads() {
    let refresh = Duration::from_millis(400);
    let (env, operator) = Env::running(refresh).await;
    for (name, spec) in [
        ("warehouse", postgres()),
        ("snow", snowflake()),
        ("lake", bigquery()),
    ] {
        env.cluster.create_connection(name, spec).await;
    }
    for name in ["warehouse", "snow", "lake"] {
        env.cluster.wait_for(name, WAIT, "Ready", ready).await;
    }
    // Let the writes of convergence (status, events) land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let api_writes = || env.cluster.server.as_ref().map(|s| s.total_writes());
    let before = (env.writes(), api_writes(), env.fake.requests().len());
    let gets_before = env.gets();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let after = (env.writes(), api_writes(), env.fake.requests().len());
    let gets = env.gets() - gets_before;
    assert_eq!(
        (before.0, before.1),
        (after.0, after.1),
        "no POST/PATCH/DELETE at the server and no API write in steady state"
    );
    assert_eq!(
        after.2 - before.2,
        gets,
        "nothing but the drift reads reached the server"
    );
    let refreshes = window.as_secs_f64() / refresh.as_secs_f64();
    assert!(
        gets >= 6,
        "the drift checks did read the three connections ({gets} GETs)"
    );
    assert!(
        (gets as f64) <= 3.0 * (refreshes + 2.0),
        "at most one GET per connection per refresh ({gets} GETs in {refreshes} refreshes)"
    );
    for name in ["warehouse", "snow", "lake"] {
        let conn = env.cluster.connections().get(name).await.unwrap();
        assert!(ready(&conn), "{name}");
    }
    println!(
        "credible e2e steady state: {gets} GETs in {}s for 3 connections with a {}ms refresh \
         ({:.2} GETs per connection per refresh), 0 writes to Credible, 0 API writes",
        window.as_secs(),
        refresh.as_millis(),
        gets as f64 / 3.0 / refreshes
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_create_and_status_write_leaves_no_duplicate() {
    let (env, operator) = Env::running(Duration::from_secs(600)).await;
    env.cluster.create_connection("warehouse", postgres()).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    let id = id_of(&conn);
    operator.stop().await;

    // What a crash after the create and before the status write leaves behind.
    env.cluster.forget_status("warehouse").await;

    let operator = env.operator(Duration::from_secs(600)).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready with an id again", |c| {
            ready(c) && c.status.as_ref().and_then(|s| s.id.as_ref()).is_some()
        })
        .await;
    assert_eq!(id_of(&conn), id, "the same connection was adopted");
    assert_eq!(env.fake.stored_all(PROJECT).len(), 1, "one connection");
    assert_eq!(env.fake.count("POST", CONNECTIONS), 1, "created once");
    assert!(
        env.fake.count("GET", &format!("{CONNECTIONS}/warehouse")) >= 1,
        "found by name"
    );
    env.cluster
        .wait_event_note("warehouse", "Adopted", WAIT)
        .await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_recreated_or_corrected_and_stripped_secrets_are_left_alone() {
    let (env, operator) = Env::running(Duration::from_millis(300)).await;
    env.cluster.create_connection("warehouse", postgres()).await;
    env.cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    let written = env.stored("warehouse");

    // Deleted outside: created again.
    assert!(env.fake.delete_connection(PROJECT, "warehouse"));
    let note = env
        .cluster
        .wait_event_note("warehouse", "Recreated", WAIT)
        .await;
    assert!(note.contains("\"warehouse\" was gone"), "{note}");
    assert_eq!(
        env.stored("warehouse")["postgresConnection"],
        written["postgresConnection"]
    );
    assert_eq!(env.writes(), (2, 0, 0));

    // Edited outside: the declared block pushed again.
    env.fake.edit_connection(
        PROJECT,
        "warehouse",
        json!({"postgresConnection": {"host": "elsewhere.internal", "port": 5432}}),
    );
    let note = env
        .cluster
        .wait_event_note("warehouse", "DriftCorrected", WAIT)
        .await;
    assert!(note.contains("changed outside appconn"), "{note}");
    assert_eq!(
        env.stored("warehouse")["postgresConnection"],
        written["postgresConnection"]
    );
    assert_eq!(env.writes(), (2, 1, 0));

    // A hosted server strips secrets from what it returns: several drift checks, no write.
    env.fake.strip_secrets(true);
    let gets = env.gets();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(env.gets() >= gets + 2, "the drift checks went on");
    assert_eq!(env.writes(), (2, 1, 0), "stripped secrets are not drift");
    let corrected = env
        .cluster
        .event_notes("warehouse")
        .await
        .iter()
        .filter(|(r, _)| r == "DriftCorrected")
        .count();
    assert_eq!(corrected, 1);
    let conn = env.cluster.connections().get("warehouse").await.unwrap();
    assert!(ready(&conn));
    assert_eq!(version(&conn), Some(1), "the content never changed here");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_removes_the_connection_unless_orphaned() {
    let (env, operator) = Env::running(Duration::from_secs(600)).await;
    env.cluster.create_connection("warehouse", postgres()).await;
    let mut orphan = snowflake();
    orphan["deletionPolicy"] = json!("Orphan");
    env.cluster.create_connection("snow", orphan).await;
    for name in ["warehouse", "snow"] {
        env.cluster.wait_for(name, WAIT, "Ready", ready).await;
        env.cluster
            .connections()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    env.cluster.wait_gone("warehouse", WAIT).await;
    env.cluster.wait_gone("snow", WAIT).await;
    assert!(env.fake.stored(PROJECT, "warehouse").is_none(), "Delete");
    assert!(env.fake.stored(PROJECT, "snow").is_some(), "Orphan");
    let deletes: Vec<String> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(deletes, [format!("{CONNECTIONS}/warehouse")]);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_backend_auth_failed_without_a_storm() {
    let env = Env::start().await;
    env.cluster
        .put_secret("wrong-token", &[("token", CANARY)])
        .await;
    let operator = env.operator(Duration::from_secs(600)).await;
    env.create_backend(BACKEND, PROJECT, "wrong-token").await;
    let backend = env
        .cluster
        .wait_backend(BACKEND, WAIT, "BackendAuthFailed", |s| {
            backend_reason(s, "BackendAuthFailed")
        })
        .await;
    let (status, _, message) = backend_condition(backend.status.as_ref().unwrap()).unwrap();
    assert_eq!(status, "False");
    assert_eq!(
        message,
        "authentication failed: Credible refused the configured token: Unauthorized"
    );

    env.secrets().await;
    env.cluster.create_connection("warehouse", postgres()).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "not Ready", |c| {
            reason_is(c, "BackendNotReady") || reason_is(c, "BackendAuthFailed")
        })
        .await;
    assert!(!ready(&conn));
    // A quiet second: a storm of refused requests shows here.
    let requests = env.fake.requests().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = env.fake.requests().len();
    assert!(
        refused <= requests + 1,
        "refused requests go on: {requests} -> {refused}"
    );
    // The check when the backend appears and on its own status write; a connection that
    // read the backend before its verdict landed tries its create once or twice.
    let seen: Vec<(String, String, u16)> = env
        .fake
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert!(seen.len() <= 6, "requests with a wrong token: {seen:?}");
    assert!(seen.iter().all(|(_, _, status)| *status == 401), "{seen:?}");
    assert!(env.fake.stored_all(PROJECT).is_empty());

    // The right token: the backend, then its connection.
    env.cluster
        .put_secret("wrong-token", &[("token", TOKEN)])
        .await;
    env.cluster
        .wait_backend(BACKEND, WAIT, "Ready", backend_ready)
        .await;
    env.cluster
        .wait_for("warehouse", WAIT, "Ready after the fix", ready)
        .await;
    let everything = format!(
        "{:?}{:?}{:?}",
        env.cluster.backends().get(BACKEND).await.unwrap().status,
        env.cluster.event_notes(BACKEND).await,
        env.cluster
            .connections()
            .get("warehouse")
            .await
            .unwrap()
            .status
    );
    assert!(!everything.contains(CANARY), "the token leaked");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_project_is_backend_not_ready_naming_it() {
    let env = Env::start().await;
    let operator = env.operator(Duration::from_secs(600)).await;
    env.create_backend(BACKEND, "marketing", "credible-api")
        .await;
    let backend = env
        .cluster
        .wait_backend(BACKEND, WAIT, "BackendNotReady", |s| {
            backend_reason(s, "BackendNotReady")
        })
        .await;
    let (_, _, message) = backend_condition(backend.status.as_ref().unwrap()).unwrap();
    assert!(
        message.starts_with("Credible has no project \"marketing\" (projects)"),
        "{message}"
    );
    env.secrets().await;
    env.cluster.create_connection("warehouse", postgres()).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "BackendNotReady", |c| {
            reason_is(c, "BackendNotReady")
        })
        .await;
    assert!(condition(&conn).unwrap().2.contains("\"marketing\""));
    assert_eq!(env.writes(), (0, 0, 0));
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_test_holds_until_a_change_passes() {
    let (env, operator) = Env::running(Duration::from_millis(300)).await;
    env.cluster
        .put_secret("warehouse-db", &[("password", CANARY)])
        .await;
    env.fake.set_test_result(Some(&format!(
        "password authentication failed for user \"etl\" ({CANARY})"
    )));
    let mut spec = postgres();
    spec["testConnection"] = json!(true);
    env.cluster.create_connection("warehouse", spec).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "ConnectionTestFailed", |c| {
            reason_is(c, "ConnectionTestFailed")
        })
        .await;
    let (status, _, message) = condition(&conn).unwrap();
    assert_eq!(status, "False");
    assert_eq!(
        message,
        "the connection test failed: password authentication failed for user \"etl\" \
         ([REDACTED])"
    );
    assert_eq!(id_of(&conn), "projects/analytics/connections/warehouse");
    let note = env
        .cluster
        .wait_event_note("warehouse", "ConnectionTestFailed", WAIT)
        .await;
    assert_eq!(note, message);

    // The verdict stands through drift checks: the connection is neither sent nor tested again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(env.writes(), (1, 0, 0));
    assert_eq!(env.fake.tested().len(), 1);
    assert!(env.gets() >= 2, "drift checks went on");
    let conn = env.cluster.connections().get("warehouse").await.unwrap();
    assert!(reason_is(&conn, "ConnectionTestFailed"));

    // The fixed password is written and tested once; the test passes.
    env.fake.set_test_result(None);
    env.cluster
        .put_secret("warehouse-db", &[("password", "pg-password-2")])
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    assert_eq!(version(&conn), Some(2));
    assert_eq!(env.writes(), (1, 1, 0));
    let tested = env.fake.tested();
    assert_eq!(tested.len(), 2);
    assert_eq!(tested[1]["postgresConnection"]["password"], "pg-password-2");
    let events = env.cluster.event_notes("warehouse").await;
    assert!(!format!("{events:?}{:?}", conn.status).contains(CANARY));
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_fields_are_invalid_spec_before_any_write() {
    let (env, operator) = Env::running(Duration::from_secs(600)).await;
    let mut hyphen = postgres();
    hyphen["connectionName"] = json!("warehouse-prod");
    env.cluster.create_connection("hyphen", hyphen).await;
    let mut unknown = postgres();
    unknown["credentials"]["sslmode"] = json!({"value": "require"});
    env.cluster.create_connection("unknown", unknown).await;
    let mut method = postgres();
    method["method"] = json!("username-and-password");
    env.cluster.create_connection("method", method).await;
    let mut text_port = postgres();
    text_port["credentials"]["port"] = json!({"value": "not-a-port"});
    env.cluster.create_connection("textport", text_port).await;
    for (name, message) in [
        (
            "hyphen",
            "Credible connection names may hold only letters, digits and underscores \
             (^[A-Za-z0-9_]+$), and \"duckdb\" is reserved; set spec.connectionName; got \
             \"warehouse-prod\"",
        ),
        (
            "unknown",
            "a Credible postgres connection has no field \"sslmode\"; its fields: host, port, \
             databaseName, userName, password, connectionString",
        ),
        (
            "method",
            "Credible connections have no auth methods: remove spec.method",
        ),
        (
            "textport",
            "field \"port\" of a Credible postgres connection must be a number (an inline \
             number, or format: number)",
        ),
    ] {
        let conn = env
            .cluster
            .wait_for(name, WAIT, "InvalidSpec", |c| reason_is(c, "InvalidSpec"))
            .await;
        assert_eq!(condition(&conn).unwrap().2, message, "{name}");
    }
    assert_eq!(env.writes(), (0, 0, 0));
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_needs_adopt_existing_and_is_then_patched() {
    let (env, operator) = Env::running(Duration::from_secs(600)).await;
    env.fake.insert_connection(
        PROJECT,
        json!({"name": "warehouse", "type": "postgres",
               "postgresConnection": {"host": "old.internal", "password": "theirs"}}),
    );
    env.cluster.create_connection("warehouse", postgres()).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "AlreadyExists", |c| {
            reason_is(c, "AlreadyExists")
        })
        .await;
    assert!(condition(&conn).unwrap().2.contains("adoptExisting"));
    assert_eq!(
        env.stored("warehouse")["postgresConnection"]["password"],
        "theirs"
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
    assert_eq!(id_of(&conn), "projects/analytics/connections/warehouse");
    assert_eq!(
        env.stored("warehouse")["postgresConnection"],
        json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
               "userName": "etl", "password": "pg-password-1"}),
        "adopted and patched to the declared block"
    );
    assert_eq!(env.fake.stored_all(PROJECT).len(), 1);
    env.cluster
        .wait_event_note("warehouse", "Adopted", WAIT)
        .await;
    operator.stop().await;
}
