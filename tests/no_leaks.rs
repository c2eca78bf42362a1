//! No secret value in logs, Events, status, metrics or errors: the operator runs against a
//! Secret holding a distinctive value, through success and every failure that quotes a field,
//! while every log line at TRACE is captured; again through Credible, whose reads return
//! secrets in clear; and against a Matillion whose client secret and tokens hold it.

mod common;

use std::time::Duration;

use appconn_testkit::fake::credible::FakeCredible;
use appconn_testkit::fake::matillion::FakeMatillion;
use appconn_testkit::logs::{self, Capture};
use common::{
    Cluster, Operator, OperatorSettings, Paths, backend_ready, backend_reason, ready, reason_is,
};
use kube::Api;
use serde_json::json;

const CANARY: &str = "zebra-canary-7781";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_anywhere() {
    if !logs::alone("no_secret_value_anywhere") {
        return;
    }
    let logs = Capture::start();

    let cluster = Cluster::start().await;
    let paths = Paths::temporary();
    let operator = Operator::start(&cluster, &paths, OperatorSettings::default()).await;

    cluster
        .put_secret("s", &[("password", CANARY), ("port", CANARY)])
        .await;
    cluster
        .create_connection(
            "good",
            json!({"app": "mssql", "credentials": {
                "password": {"secretKeyRef": {"name": "s", "key": "password"}},
                "user": {"value": "sa"}}}),
        )
        .await;
    cluster
        .create_connection(
            "bad-number",
            json!({"app": "mssql", "credentials": {
                "port": {"secretKeyRef": {"name": "s", "key": "port", "format": "number"}}}}),
        )
        .await;
    cluster
        .create_connection(
            "bad-json",
            json!({"app": "mssql", "credentials": {
                "blob": {"secretKeyRef": {"name": "s", "key": "password", "format": "json"}}}}),
        )
        .await;
    cluster
        .create_connection(
            "bad-bool",
            json!({"app": "mssql", "credentials": {
                "ssl": {"secretKeyRef": {"name": "s", "key": "password", "format": "boolean"}}}}),
        )
        .await;
    cluster.wait_for("good", WAIT, "Ready", ready).await;
    for name in ["bad-number", "bad-json", "bad-bool"] {
        cluster
            .wait_for(name, WAIT, "InvalidCredential", |c| {
                reason_is(c, "InvalidCredential")
            })
            .await;
    }
    cluster
        .put_secret(
            "s",
            &[("password", &format!("{CANARY}-2")), ("port", CANARY)],
        )
        .await;
    cluster
        .wait_for("good", WAIT, "version 2", |c| {
            c.status.as_ref().and_then(|s| s.version) == Some(2)
        })
        .await;

    let bad = cluster.event_notes("bad-number").await;
    assert!(bad.iter().any(|(reason, _)| reason == "InvalidCredential"));
    let mut seen = statuses_and_events(&cluster).await;
    seen.push_str(&operator.metrics().await);
    operator.stop().await;
    let logs = logs.text();
    assert!(logs.contains("reconciled"), "the capture works");
    assert!(seen.contains("InvalidCredential") && seen.contains("hmac-sha256:"));
    assert_no_canary(&[("status, Events or metrics", &seen), ("the logs", &logs)]);
}

/// The statuses of every AppConnection and ConnectionBackend and every Event of the test's
/// namespace, as JSON.
async fn statuses_and_events(cluster: &Cluster) -> String {
    let mut seen = String::new();
    for conn in cluster
        .connections()
        .list(&Default::default())
        .await
        .unwrap()
    {
        seen.push_str(&serde_json::to_string(&conn.status).unwrap());
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    for event in events.list(&Default::default()).await.unwrap() {
        seen.push_str(&serde_json::to_string(&event).unwrap());
    }
    for backend in cluster.backends().list(&Default::default()).await.unwrap() {
        seen.push_str(&serde_json::to_string(&backend.status).unwrap());
    }
    seen
}

fn assert_no_canary(places: &[(&str, &str)]) {
    for (what, text) in places {
        if let Some(at) = text.find(CANARY) {
            let start = text[..at]
                .char_indices()
                .rev()
                .nth(200)
                .map(|(i, _)| i)
                .unwrap_or(0);
            panic!(
                "a secret value is in {what}: ...{}...",
                &text[start..at + CANARY.len()]
            );
        }
    }
}

/// Credible returns secrets in clear on every read: the canary as a password, in a connection
/// string, in the API token and in the connection test's message goes through creates, drift
/// reads, a correction and a failed test, and reaches no log line, Event, status, metric, nor
/// the operator's store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credible_secret_anywhere() {
    if !logs::alone("no_credible_secret_anywhere") {
        return;
    }
    let logs = Capture::start();

    let cluster = Cluster::start().await;
    let paths = Paths::temporary();
    let settings = OperatorSettings {
        refresh: Duration::from_millis(300),
        ..Default::default()
    };
    let operator = Operator::start(&cluster, &paths, settings).await;
    let fake = FakeCredible::start().await;
    fake.add_project("analytics");
    let token = format!("{CANARY}-token");
    fake.require_token(Some(&token));
    fake.set_test_result(Some(&format!("password authentication failed ({CANARY})")));
    cluster
        .put_secret("credible-api", &[("token", &token)])
        .await;
    cluster
        .put_secret(
            "pg",
            &[
                ("password", CANARY),
                ("url", &format!("postgres://etl:{CANARY}@db.internal/sales")),
            ],
        )
        .await;
    cluster
        .create_backend(
            "credible",
            json!({"credible": {"url": fake.url(), "project": "analytics",
                "token": {"secretKeyRef": {"name": "credible-api", "key": "token"}}}}),
        )
        .await;
    let connection = |test: bool| {
        json!({
            "backendRef": {"kind": "ConnectionBackend", "name": "credible"},
            "app": "postgres",
            "testConnection": test,
            "credentials": {
                "host": {"value": "db.internal"},
                "userName": {"value": "etl"},
                "password": {"secretKeyRef": {"name": "pg", "key": "password"}},
                "connectionString": {"secretKeyRef": {"name": "pg", "key": "url"}},
            },
        })
    };
    cluster.create_connection("tested", connection(true)).await;
    cluster
        .create_connection("warehouse", connection(false))
        .await;
    cluster
        .wait_for("tested", WAIT, "ConnectionTestFailed", |c| {
            reason_is(c, "ConnectionTestFailed")
        })
        .await;
    cluster.wait_for("warehouse", WAIT, "Ready", ready).await;
    fake.edit_connection(
        "analytics",
        "warehouse",
        json!({"postgresConnection": {"host": "elsewhere", "password": format!("{CANARY}-2")}}),
    );
    cluster
        .wait_event("warehouse", "DriftCorrected", WAIT)
        .await;
    // Drift reads go on, each GET returning the password and the connection string in clear.
    let reads = fake.count("GET", "/api/v0/projects/analytics/connections/");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(fake.count("GET", "/api/v0/projects/analytics/connections/") >= reads + 2);
    assert!(
        fake.stored("analytics", "warehouse")
            .unwrap()
            .to_string()
            .contains(CANARY),
        "the server does hold the canary"
    );

    let mut seen = statuses_and_events(&cluster).await;
    assert!(
        seen.contains("[REDACTED]"),
        "the test's message was redacted"
    );
    seen.push_str(&operator.metrics().await);
    operator.stop().await;
    let mut store = String::new();
    for file in std::fs::read_dir(paths.store().parent().unwrap()).unwrap() {
        store.push_str(&String::from_utf8_lossy(
            &std::fs::read(file.unwrap().path()).unwrap(),
        ));
    }
    let logs = logs.text();
    assert!(logs.contains("reconciled"), "the capture works");
    assert!(
        logs.contains("credible"),
        "the capture saw the backend's requests"
    );
    assert_no_canary(&[
        ("status, Events or metrics", &seen),
        ("the logs", &logs),
        ("the store's files", &store),
    ]);
}

const PROJECT: &str = "2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60";

/// A Matillion backend whose API client's secret is in Secret `secret`.
fn matillion(fake: &FakeMatillion, secret: &str) -> serde_json::Value {
    json!({"matillion": {
        "url": fake.url(), "tokenUrl": fake.token_url(), "projectId": PROJECT,
        "auth": {
            "clientId": {"secretKeyRef": {"name": secret, "key": "clientId"}},
            "clientSecret": {"secretKeyRef": {"name": secret, "key": "clientSecret"}},
        },
    }})
}

/// Matillion: the canary is the API client's secret and the start of every token; one backend
/// is refused with a wrong secret, whose refusal is logged and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matillion_secret_anywhere() {
    if !logs::alone("no_matillion_secret_anywhere") {
        return;
    }
    let logs = Capture::start();

    let cluster = Cluster::start().await;
    let paths = Paths::temporary();
    let operator = Operator::start(&cluster, &paths, OperatorSettings::default()).await;
    let fake = FakeMatillion::start().await;
    fake.add_client("dpc-client", CANARY);
    fake.add_project(PROJECT);
    fake.set_token_prefix(CANARY);
    cluster
        .put_secret(
            "matillion-client",
            &[("clientId", "dpc-client"), ("clientSecret", CANARY)],
        )
        .await;
    cluster
        .put_secret(
            "wrong-client",
            &[
                ("clientId", "dpc-client"),
                ("clientSecret", &format!("{CANARY}-x")),
            ],
        )
        .await;
    cluster
        .create_backend("matillion", matillion(&fake, "matillion-client"))
        .await;
    cluster
        .create_backend("refused", matillion(&fake, "wrong-client"))
        .await;
    cluster
        .create_connection(
            "pointer",
            json!({"backendRef": {"kind": "ConnectionBackend", "name": "matillion"},
                   "app": "dwh", "method": "generic-secret",
                   "credentials": {"secretName": {"value": "prod/snowflake"}}}),
        )
        .await;
    cluster
        .wait_backend("refused", WAIT, "BackendAuthFailed", |s| {
            backend_reason(s, "BackendAuthFailed")
        })
        .await;
    cluster
        .wait_backend("matillion", WAIT, "Ready", backend_ready)
        .await;
    cluster.wait_for("pointer", WAIT, "Ready", ready).await;
    assert!(fake.stored(PROJECT, "pointer").is_some());

    let mut seen = statuses_and_events(&cluster).await;
    seen.push_str(&operator.metrics().await);
    operator.stop().await;
    let logs = logs.text();
    assert!(
        logs.contains("Matillion token request refused"),
        "the refused grant was logged"
    );
    assert!(seen.contains("Matillion token request refused (HTTP 401)"));
    assert_no_canary(&[("status, Events or metrics", &seen), ("the logs", &logs)]);
}
