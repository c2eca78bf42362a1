//! No secret value in logs, Events, status, metrics or errors: the operator runs against a
//! Secret holding a distinctive value, through success and every failure that quotes a field,
//! while every log line at TRACE is captured.

mod common;

use std::time::Duration;

use appconn_testkit::logs::{self, Capture};
use common::{Cluster, Operator, OperatorSettings, Paths, ready, reason_is};
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
    seen.push_str(&operator.metrics().await);
    operator.stop().await;
    let logs = logs.text();
    assert!(logs.contains("reconciled"), "the capture works");
    assert!(seen.contains("InvalidCredential") && seen.contains("hmac-sha256:"));
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
