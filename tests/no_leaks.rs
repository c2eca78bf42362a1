//! No secret value in logs, Events, status, metrics or errors: the operator runs against a
//! Secret holding a distinctive value, through success and every failure that quotes a field,
//! and against a Matillion whose client secret and tokens hold it, while every log line at
//! TRACE is captured.

mod common;

use std::time::Duration;

use appconn_testkit::fake::matillion::FakeMatillion;
use appconn_testkit::logs::{self, Capture};
use common::{
    Cluster, Operator, OperatorSettings, Paths, backend_ready, backend_reason, ready, reason_is,
};
use kube::Api;
use serde_json::json;

const CANARY: &str = "zebra-canary-7781";
const WAIT: Duration = Duration::from_secs(20);
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
    // Matillion: the canary is the API client's secret and the start of every token; one
    // backend is refused with a wrong secret, whose refusal is logged and reported.
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
    let events = events.list(&Default::default()).await.unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidCredential"))
    );
    for event in events {
        seen.push_str(&serde_json::to_string(&event).unwrap());
    }
    for backend in cluster.backends().list(&Default::default()).await.unwrap() {
        seen.push_str(&serde_json::to_string(&backend.status).unwrap());
    }
    seen.push_str(&operator.metrics().await);
    operator.stop().await;
    let logs = logs.text();
    assert!(logs.contains("reconciled"), "the capture works");
    assert!(
        logs.contains("Matillion token request refused"),
        "the refused grant was logged"
    );
    assert!(seen.contains("InvalidCredential") && seen.contains("hmac-sha256:"));
    assert!(seen.contains("Matillion token request refused (HTTP 401)"));
    for (what, text) in [("status, Events or metrics", &seen), ("the logs", &logs)] {
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
