//! The Matillion DPC backend end to end: the real operator (controllers, backend status,
//! reconcile core, reqwest client) against the Kubernetes API test server (or a real cluster
//! with APPCONN_TEST_KUBECONFIG) and the fake Matillion server.
//!
//! Counts come from the fake's request record and, on the test server only, its write counters.
//! `cargo test --test matillion_e2e requests_per_operation -- --nocapture` prints the token and
//! API requests each operation costs.

mod common;

use std::fmt;
use std::time::Duration;

use appconn::crd::AppConnection;
use appconn_testkit::fake::matillion::FakeMatillion;
use appconn_testkit::fake::server::retry_after_violations;
use common::{
    Cluster, Operator, OperatorSettings, Paths, backend_condition, backend_ready, backend_reason,
    condition, eventually, ready, reason_is,
};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const CLIENT_ID: &str = "dpc-client-0042";
const CLIENT_SECRET: &str = "dpc-client-secret-0042";
const PROJECT: &str = "2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60";
const CONNECTIONS: &str = "/dpc/v1/projects/2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60/connections";
const TOKEN: &str = "/oauth/dpc/token";
const BACKEND: &str = "matillion";

/// A cluster, the fake with one API client and one project, the client's Secret and the
/// Secret where the team keeps its vault paths.
struct Env {
    cluster: Cluster,
    fake: FakeMatillion,
    paths: Paths,
}

impl Env {
    async fn start() -> Env {
        let cluster = Cluster::start().await;
        let fake = FakeMatillion::start().await;
        fake.add_client(CLIENT_ID, CLIENT_SECRET);
        fake.add_project(PROJECT);
        cluster
            .put_secret(
                "matillion-client",
                &[("clientId", CLIENT_ID), ("clientSecret", CLIENT_SECRET)],
            )
            .await;
        cluster
            .put_secret("vault-paths", &[("snowflake", "prod/snowflake")])
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

    /// The `matillion` block for the fake, its client read from Secret `secret`.
    fn provider(&self, secret: &str, project: &str) -> Value {
        json!({
            "url": self.fake.url(),
            "tokenUrl": self.fake.token_url(),
            "projectId": project,
            "auth": {
                "clientId": {"secretKeyRef": {"name": secret, "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": secret, "key": "clientSecret"}},
            },
        })
    }

    /// A ConnectionBackend for the fake with a rate limit that does not slow tests down.
    async fn create_backend(&self, name: &str) {
        let spec = json!({
            "matillion": self.provider("matillion-client", PROJECT),
            "rateLimit": {"requestsPerSecond": 200, "burst": 200},
        });
        self.cluster.create_backend(name, spec).await;
        self.cluster
            .wait_backend(name, WAIT, "Ready", backend_ready)
            .await;
    }

    /// The connection as the fake stores it.
    fn stored(&self, name: &str) -> Value {
        self.fake
            .stored(PROJECT, name)
            .unwrap_or_else(|| panic!("{name} at Matillion"))
    }

    fn id_of(&self, conn: &AppConnection) -> String {
        conn.status.as_ref().and_then(|s| s.id.clone()).unwrap()
    }

    async fn put_vault_path(&self, path: &str) {
        self.cluster
            .put_secret("vault-paths", &[("snowflake", path)])
            .await;
    }

    /// Requests the fake has seen so far: a mark for [`Env::since`].
    fn mark(&self) -> usize {
        self.fake.requests().len()
    }

    fn since(&self, mark: usize) -> Tally {
        let mut tally = Tally::default();
        for r in self.fake.requests().into_iter().skip(mark) {
            let named = r
                .query
                .as_deref()
                .is_some_and(|q| q.contains("connectionNames="));
            match (r.method.as_str(), r.path.as_str()) {
                ("POST", TOKEN) => tally.token += 1,
                ("GET", CONNECTIONS) if named => tally.read += 1,
                ("GET", CONNECTIONS) => tally.check += 1,
                ("POST", CONNECTIONS) => tally.post += 1,
                ("PUT", CONNECTIONS) => tally.put += 1,
                ("DELETE", CONNECTIONS) => tally.delete += 1,
                (method, path) => panic!("unexpected request {method} {path}"),
            }
        }
        tally
    }

    /// Requests the test server has seen so far (None on a real cluster, which has no record).
    fn api_mark(&self) -> Option<usize> {
        self.cluster.server.as_ref().map(|s| s.requests().len())
    }

    /// The API writes since `mark`, as `verb resource/subresource name`.
    fn api_writes_since(&self, mark: Option<usize>) -> Vec<String> {
        let (Some(server), Some(mark)) = (self.cluster.server.as_ref(), mark) else {
            return Vec::new();
        };
        server
            .requests()
            .into_iter()
            .skip(mark)
            .filter(|r| !matches!(r.verb.as_str(), "get" | "list" | "watch"))
            .map(|r| {
                let name = r.name.unwrap_or_default();
                format!("{} {}/{} {name}", r.verb, r.resource, r.subresource)
            })
            .collect()
    }
}

/// What reached the fake Matillion in one stretch of a test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Token requests.
    token: usize,
    /// The backend check's read of the project.
    check: usize,
    /// Reads of one connection by name (list route, `connectionNames=`).
    read: usize,
    post: usize,
    put: usize,
    delete: usize,
}

impl Tally {
    fn writes(self) -> usize {
        self.post + self.put + self.delete
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("check GET", self.check),
            ("GET", self.read),
            ("POST", self.post),
            ("PUT", self.put),
            ("DELETE", self.delete),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} x{n}"))
        .collect();
        let api = if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        };
        write!(f, "{:>6} | {api}", self.token)
    }
}

fn backend_ref() -> Value {
    json!({"kind": "ConnectionBackend", "name": BACKEND})
}

/// A Snowflake warehouse whose password is in AWS Secrets Manager, at the path the team keeps
/// in Secret `vault-paths`.
fn warehouse() -> Value {
    json!({
        "backendRef": backend_ref(),
        "app": "dwh",
        "method": "generic-secret",
        "connectionName": "warehouse-prod",
        "description": "Analytics warehouse",
        "credentials": {
            "secretName": {"secretKeyRef": {"name": "vault-paths", "key": "snowflake"}},
            "secretKey": {"value": "password"},
        },
        "settings": {
            "authProvider": "SNOWFLAKE",
            "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
        },
    })
}

/// The connection `warehouse()` becomes at Matillion, with the vault path `path`.
fn warehouse_at_matillion(path: &str) -> Value {
    json!({
        "name": "warehouse-prod",
        "platformConnectionType": "DWH",
        "authProvider": "SNOWFLAKE",
        "authType": "GENERIC_SECRET",
        "connectionDetails": {
            "description": "Analytics warehouse",
            "connectionProperties": {"secretName": path, "secretKey": "password"},
            "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
        },
    })
}

/// The fields appconn writes, without the server's own.
fn pushed(stored: &Value) -> Value {
    let mut pushed = stored.clone();
    let map = pushed.as_object_mut().unwrap();
    for server in ["id", "createdBy", "createdDate", "projectId"] {
        assert!(map.remove(server).is_some(), "the server's {server}");
    }
    pushed
}

/// One connection through its whole life, with what each step cost at Matillion. Drift checks
/// are made to happen by restarting the operator (a new process checks every connection once),
/// so each step's requests can be counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_operation() {
    let env = Env::start().await;
    let mut table: Vec<(&str, Tally)> = Vec::new();
    let operator = env.operator(OperatorSettings::default()).await;

    // The backend's own check: a token is granted and the project answers.
    let mark = env.mark();
    env.create_backend(BACKEND).await;
    let backend = env.cluster.backends().get(BACKEND).await.unwrap();
    let status = backend.status.unwrap();
    assert_eq!(status.type_.as_deref(), Some("matillion"));
    let (_, reason, message) = backend_condition(&status).unwrap();
    assert_eq!(
        (reason.as_str(), message.as_str()),
        (
            "Synced",
            "matillion accepted the credentials and is healthy"
        )
    );
    // Its status write brings one more check, and the operator's start may bring another
    // (the Secret watch's first list): each one read, all with the one token.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let check = env.since(mark);
    assert_eq!((check.token, check.read, check.writes()), (1, 0, 0));
    assert!(check.check >= 1, "{check:?}");
    table.push(("new backend: its checks", check));

    // Create: Ready with Matillion's id, the pointer taken from the Secret.
    let mark = env.mark();
    env.cluster
        .create_connection("warehouse", warehouse())
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    let stored = env.stored("warehouse-prod");
    let id = env.id_of(&conn);
    assert_eq!(stored["id"], id.as_str(), "status.id is Matillion's id");
    assert_eq!(pushed(&stored), warehouse_at_matillion("prod/snowflake"));
    let status = conn.status.clone().unwrap();
    assert_eq!(status.connection_name.as_deref(), Some("warehouse-prod"));
    assert_eq!(status.backend.unwrap().type_, "matillion");
    assert_eq!(status.version, Some(1));
    assert!(status.credentials_hash.unwrap().starts_with("hmac-sha256:"));
    assert_eq!(
        status.backend_credentials_hash, None,
        "Matillion keeps no hash"
    );
    env.cluster.wait_event("warehouse", "Created", WAIT).await;
    let create = env.since(mark);
    assert_eq!(
        create,
        Tally {
            post: 1,
            ..Tally::default()
        },
        "one POST, and the token of the check reused"
    );
    table.push(("create", create));

    // Steady state: no drift check due, nothing sent, nothing written.
    let (mark, api) = (env.mark(), env.api_mark());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady = env.since(mark);
    assert_eq!(steady, Tally::default());
    let writes = env.api_writes_since(api);
    assert!(writes.is_empty(), "API writes in steady state: {writes:?}");
    table.push(("steady state (1 s)", steady));

    // The team moves the vault path: exactly one PUT, the whole object, the same id.
    let mark = env.mark();
    env.put_vault_path("prod/snowflake-v2").await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "version 2", |c| {
            c.status.as_ref().and_then(|s| s.version) == Some(2)
        })
        .await;
    assert_eq!(env.id_of(&conn), id, "the id is kept across updates");
    assert_eq!(
        pushed(&env.stored("warehouse-prod")),
        warehouse_at_matillion("prod/snowflake-v2")
    );
    // A quiet moment in which a second PUT would show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let update = env.since(mark);
    assert_eq!(
        update,
        Tally {
            read: 1,
            put: 1,
            ..Tally::default()
        },
        "a read to make sure the name is still ours, then exactly one PUT"
    );
    table.push(("pointer Secret change", update));

    // A restart: every connection is checked once; in sync, nothing is written.
    // After a restart the drift checks are spread over the refresh interval, not all made at
    // start: a short interval brings this one's soon.
    let restarted = || OperatorSettings {
        refresh: Duration::from_secs(3),
        ..OperatorSettings::default()
    };
    operator.stop().await;
    let (mark, api) = (env.mark(), env.api_mark());
    let operator = env.operator(restarted()).await;
    eventually(WAIT, "the drift check after the restart", || async {
        env.since(mark).read == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restart = env.since(mark);
    assert_eq!(
        (restart.token, restart.read, restart.writes()),
        (1, 1, 0),
        "{restart:?}"
    );
    let writes = env.api_writes_since(api);
    assert!(writes.is_empty(), "API writes after a restart: {writes:?}");
    table.push(("restart, drift check in sync", restart));

    // Deleted at Matillion while the operator was down: created again.
    operator.stop().await;
    assert!(env.fake.delete_connection(PROJECT, "warehouse-prod"));
    let mark = env.mark();
    let operator = env.operator(restarted()).await;
    env.cluster.wait_event("warehouse", "Recreated", WAIT).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready with the new id", |c| {
            ready(c) && c.status.as_ref().and_then(|s| s.id.as_deref()) != Some(id.as_str())
        })
        .await;
    let recreated = env.stored("warehouse-prod");
    assert_eq!(recreated["id"], env.id_of(&conn).as_str());
    assert_eq!(
        pushed(&recreated),
        warehouse_at_matillion("prod/snowflake-v2")
    );
    let id = env.id_of(&conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recreate = env.since(mark);
    assert_eq!(
        (recreate.read, recreate.post, recreate.put),
        (1, 1, 0),
        "{recreate:?}"
    );
    table.push(("restart, drift check: gone -> recreate", recreate));

    // Changed at Matillion while the operator was down: the declared content pushed again.
    operator.stop().await;
    assert!(env.fake.edit_connection(
        PROJECT,
        "warehouse-prod",
        json!({"authProvider": "DATABRICKS", "connectionDetails": {
            "connectionProperties": {"secretName": "someone/else", "secretKey": "password"}}}),
    ));
    let mark = env.mark();
    let operator = env.operator(restarted()).await;
    env.cluster
        .wait_event("warehouse", "DriftCorrected", WAIT)
        .await;
    let stored = env.stored("warehouse-prod");
    assert_eq!(pushed(&stored), warehouse_at_matillion("prod/snowflake-v2"));
    assert_eq!(stored["id"], id.as_str());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let corrected = env.since(mark);
    assert_eq!(
        (corrected.read, corrected.post, corrected.put),
        (2, 0, 1),
        "{corrected:?}"
    );
    table.push(("restart, drift check: changed -> full PUT", corrected));

    // Deleted: by name, after a read that makes sure the name is still ours.
    let mark = env.mark();
    env.cluster
        .connections()
        .delete("warehouse", &DeleteParams::default())
        .await
        .unwrap();
    env.cluster.wait_gone("warehouse", WAIT).await;
    assert!(env.fake.stored_all(PROJECT).is_empty());
    let delete = env.since(mark);
    assert_eq!(
        delete,
        Tally {
            read: 1,
            delete: 1,
            ..Tally::default()
        }
    );
    table.push(("delete", delete));
    operator.stop().await;

    println!("\nMatillion requests per operation (through the operator, against the fake):");
    println!("{:<42} | {:>6} | API requests", "operation", "tokens");
    for (operation, tally) in &table {
        println!("{operation:<42} | {tally}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_connections_share_one_token_then_only_read() {
    let env = Env::start().await;
    let settings = OperatorSettings {
        refresh: Duration::from_millis(400),
        ..Default::default()
    };
    let operator = env.operator(settings).await;
    env.create_backend(BACKEND).await;
    let names: Vec<String> = (0..20).map(|i| format!("conn-{i:02}")).collect();
    for name in &names {
        let mut spec = warehouse();
        spec["connectionName"] = json!(name);
        env.cluster.create_connection(name, spec).await;
    }
    for name in &names {
        env.cluster.wait_for(name, WAIT, "Ready", ready).await;
    }
    assert_eq!(env.fake.stored_all(PROJECT).len(), 20);
    assert_eq!(
        env.fake.token_requests(),
        1,
        "the check and 20 reconciles share one token"
    );
    // Let the writes of convergence (status, Events) land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (mark, api) = (env.mark(), env.api_mark());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let steady = env.since(mark);
    assert_eq!(steady.writes(), 0, "{steady:?}");
    assert_eq!(steady.token, 0);
    assert!(
        steady.read >= 40,
        "each connection read back every refresh: {steady:?}"
    );
    let writes = env.api_writes_since(api);
    assert!(
        writes.is_empty(),
        "drift checks that find the connections as written write nothing: {writes:?}"
    );
    println!("steady state: {steady:?} in 2 s at a 400 ms refresh, 0 API writes");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_create_and_status_write_leaves_no_duplicate() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND).await;
    env.cluster
        .create_connection("warehouse", warehouse())
        .await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;
    let id = env.id_of(&conn);
    operator.stop().await;

    env.cluster.forget_status("warehouse").await;

    let operator = env.operator(OperatorSettings::default()).await;
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "Ready with an id again", |c| {
            ready(c) && c.status.as_ref().and_then(|s| s.id.as_ref()).is_some()
        })
        .await;
    assert_eq!(env.id_of(&conn), id, "the same connection was adopted");
    assert_eq!(env.fake.stored_all(PROJECT).len(), 1, "no duplicate");
    assert_eq!(env.fake.count("POST", CONNECTIONS), 1, "created once");
    env.cluster.wait_event("warehouse", "Adopted", WAIT).await;
    operator.stop().await;
}

/// A same-name connection with another id is someone else's: the drift check reports ours
/// gone, the create finds the name taken, and nothing of theirs is changed until
/// `adoptExisting` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_name_connection_with_another_id_is_not_ours() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND).await;
    let mut spec = warehouse();
    spec["refreshInterval"] = json!("300ms");
    env.cluster.create_connection("warehouse", spec).await;
    env.cluster
        .wait_for("warehouse", WAIT, "Ready", ready)
        .await;

    assert!(env.fake.delete_connection(PROJECT, "warehouse-prod"));
    let theirs = env.fake.insert_connection(
        PROJECT,
        json!({"name": "warehouse-prod", "platformConnectionType": "DWH",
               "authType": "CLOUD_PROVIDER_SECRET", "authProvider": "REDSHIFT"}),
    );
    let conn = env
        .cluster
        .wait_for("warehouse", WAIT, "AlreadyExists", |c| {
            reason_is(c, "AlreadyExists")
        })
        .await;
    let (_, _, message) = condition(&conn).unwrap();
    assert!(message.contains("adoptExisting"), "{message}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = env.stored("warehouse-prod");
    assert_eq!(stored["id"], theirs.as_str());
    assert_eq!(stored["authProvider"], "REDSHIFT", "theirs, untouched");
    assert_eq!(env.fake.count("PUT", CONNECTIONS), 0);
    assert_eq!(env.fake.count("DELETE", CONNECTIONS), 0);
    let posts = env.fake.count("POST", CONNECTIONS);
    assert!(posts <= 3, "no create loop: {posts} POSTs");

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
    assert_eq!(env.id_of(&conn), theirs);
    assert_eq!(
        pushed(&env.stored("warehouse-prod")),
        warehouse_at_matillion("prod/snowflake")
    );
    env.cluster.wait_event("warehouse", "Adopted", WAIT).await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_matillion_would_refuse_is_invalid_spec_before_any_call() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND).await;
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let mut unknown_type = warehouse();
    unknown_type["app"] = json!("snowflake");
    cases.push((
        "unknown-type",
        unknown_type,
        "Matillion has no platform connection type \"snowflake\"; spec.app must be one of dwh, \
         component-basic, cloud-platform-credentials",
    ));
    let mut no_method = warehouse();
    no_method.as_object_mut().unwrap().remove("method");
    cases.push((
        "no-method",
        no_method,
        "Matillion needs spec.method, the auth type: one of generic-secret, cloud-provider-secret",
    ));
    let mut basic = warehouse();
    basic["app"] = json!("component-basic");
    basic["credentials"]
        .as_object_mut()
        .unwrap()
        .remove("secretName");
    cases.push((
        "basic",
        basic,
        "a Matillion COMPONENT_BASIC connection needs credentials.secretName, the name of its \
         secret in your vault",
    ));
    let mut project = warehouse();
    project["project"] = json!("analytics");
    cases.push((
        "project",
        project,
        "spec.project must be a Matillion project UUID; got \"analytics\"",
    ));
    let mut setting = warehouse();
    setting["settings"]["gatewayId"] = json!("g-1");
    cases.push((
        "setting",
        setting,
        "settings.gatewayId has no place in a Matillion connection; settings may hold \
         authProvider and secretsLocation",
    ));
    for (name, spec, _) in &cases {
        env.cluster.create_connection(name, spec.clone()).await;
    }
    for (name, _, message) in &cases {
        let conn = env
            .cluster
            .wait_for(name, WAIT, "InvalidSpec", |c| reason_is(c, "InvalidSpec"))
            .await;
        assert_eq!(condition(&conn).unwrap().2, *message, "{name}");
        let event = env.cluster.wait_event(name, "InvalidSpec", WAIT).await;
        assert_eq!(event.note.as_deref(), Some(*message));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = env.since(0);
    assert_eq!(
        (sent.read, sent.writes()),
        (0, 0),
        "nothing reached Matillion's connection routes"
    );
    assert!(env.fake.stored_all(PROJECT).is_empty());
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_is_ready_only_when_a_token_is_granted_and_the_project_answers() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;

    // A project id that is not a UUID is refused by the API server itself.
    let backend: appconn::crd::ConnectionBackend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
        "metadata": {"name": "not-a-uuid", "namespace": env.cluster.namespace},
        "spec": {"matillion": env.provider("matillion-client", "analytics")},
    }))
    .unwrap();
    let refused = env
        .cluster
        .backends()
        .create(&Default::default(), &backend)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("projectId"), "{refused}");

    // A wrong client secret: the token request is refused.
    env.cluster
        .put_secret(
            "wrong-client",
            &[("clientId", CLIENT_ID), ("clientSecret", "not-the-secret")],
        )
        .await;
    env.cluster
        .create_backend(
            "wrong",
            json!({"matillion": env.provider("wrong-client", PROJECT)}),
        )
        .await;
    let wrong = env
        .cluster
        .wait_backend("wrong", WAIT, "BackendAuthFailed", |s| {
            backend_reason(s, "BackendAuthFailed")
        })
        .await;
    let (_, _, message) = backend_condition(wrong.status.as_ref().unwrap()).unwrap();
    assert!(
        message.contains("Matillion token request refused (HTTP 401): access_denied"),
        "{message}"
    );
    assert!(!message.contains("not-the-secret"), "{message}");

    // A project this client cannot see.
    env.cluster
        .create_backend(
            "elsewhere",
            json!({"matillion": env.provider("matillion-client", "00000000-0000-4000-8000-000000000000")}),
        )
        .await;
    let elsewhere = env
        .cluster
        .wait_backend("elsewhere", WAIT, "BackendNotReady", |s| {
            backend_reason(s, "BackendNotReady")
        })
        .await;
    let (_, _, message) = backend_condition(elsewhere.status.as_ref().unwrap()).unwrap();
    assert!(
        message.contains("Matillion has no project 00000000-0000-4000-8000-000000000000"),
        "{message}"
    );

    // Connections through a backend that is not Ready wait for it.
    let mut spec = warehouse();
    spec["backendRef"] = json!({"kind": "ConnectionBackend", "name": "wrong"});
    env.cluster.create_connection("warehouse", spec).await;
    env.cluster
        .wait_for("warehouse", WAIT, "BackendNotReady", |c| {
            reason_is(c, "BackendNotReady")
        })
        .await;
    assert!(env.fake.stored_all(PROJECT).is_empty());

    // The Secret fixed: the backend and then its connection become Ready.
    env.cluster
        .put_secret(
            "wrong-client",
            &[("clientId", CLIENT_ID), ("clientSecret", CLIENT_SECRET)],
        )
        .await;
    env.cluster
        .wait_backend("wrong", WAIT, "Ready", backend_ready)
        .await;
    env.cluster
        .wait_for("warehouse", WAIT, "Ready after the fix", ready)
        .await;
    assert_eq!(env.fake.stored_all(PROJECT).len(), 1);
    let refused = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.path == TOKEN && r.status == 401)
        .count();
    assert_eq!(refused, 1, "the refused grant was not retried in a loop");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_removes_the_connection_unless_orphaned() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    env.create_backend(BACKEND).await;
    env.cluster
        .create_connection("warehouse", warehouse())
        .await;
    let mut orphan = warehouse();
    orphan["connectionName"] = json!("kept");
    orphan["deletionPolicy"] = json!("Orphan");
    env.cluster.create_connection("kept", orphan).await;
    for name in ["warehouse", "kept"] {
        env.cluster.wait_for(name, WAIT, "Ready", ready).await;
        env.cluster
            .connections()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    env.cluster.wait_gone("warehouse", WAIT).await;
    env.cluster.wait_gone("kept", WAIT).await;
    assert!(
        env.fake.stored(PROJECT, "warehouse-prod").is_none(),
        "Delete"
    );
    assert!(env.fake.stored(PROJECT, "kept").is_some(), "Orphan");
    let deletes: Vec<String> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.query.unwrap_or_default())
        .collect();
    assert_eq!(deletes, ["connectionName=warehouse-prod"]);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_pauses_the_whole_backend_for_its_retry_after() {
    let env = Env::start().await;
    let operator = env.operator(OperatorSettings::default()).await;
    let spec = json!({
        "matillion": env.provider("matillion-client", PROJECT),
        "rateLimit": {"requestsPerSecond": 20, "burst": 5},
    });
    env.cluster.create_backend(BACKEND, spec).await;
    env.cluster
        .wait_backend(BACKEND, WAIT, "Ready", backend_ready)
        .await;
    env.fake.rate_limit_storm(0.5, Duration::from_secs(3), 1);
    let names: Vec<String> = (0..8).map(|i| format!("storm-{i}")).collect();
    for name in &names {
        let mut spec = warehouse();
        spec["connectionName"] = json!(name);
        env.cluster.create_connection(name, spec).await;
    }
    for name in &names {
        env.cluster
            .wait_for(name, Duration::from_secs(30), "Ready", ready)
            .await;
    }
    let requests = env.fake.requests();
    let limited = requests.iter().filter(|r| r.status == 429).count();
    assert!(limited >= 2, "the storm hit: {limited}");
    let violations = retry_after_violations(&requests, Duration::from_millis(150));
    assert!(
        violations.is_empty(),
        "sent during a Retry-After: {violations:#?}"
    );
    assert_eq!(
        env.fake.stored_all(PROJECT).len(),
        8,
        "every connection once, no duplicates"
    );
    operator.stop().await;
}
