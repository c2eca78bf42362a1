//! The operator's RBAC in deploy/ (rendered from the chart) grants every API call the operator
//! makes, recorded by the test API server over a scenario that exercises each feature, and
//! nothing it does not make.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Cluster, OPERATOR_AGENT, Operator, OperatorSettings, Paths, ready, reason_is};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// (group, resource or resource/subresource, verb).
type Call = (String, String, String);

fn granted() -> BTreeSet<Call> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rbac.yaml"))
            .unwrap();
    let mut calls = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if !matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in doc["rules"].as_array().into_iter().flatten() {
            for group in rule["apiGroups"].as_array().into_iter().flatten() {
                for resource in rule["resources"].as_array().into_iter().flatten() {
                    for verb in rule["verbs"].as_array().into_iter().flatten() {
                        calls.insert((
                            group.as_str().unwrap().to_string(),
                            resource.as_str().unwrap().to_string(),
                            verb.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_the_calls_the_operator_makes() {
    let cluster = Cluster::start().await;
    let Some(server) = cluster.server.as_ref() else {
        return;
    };
    let paths = Paths::temporary();
    let settings = OperatorSettings {
        leader_elect: Some("solo".into()),
        keys_in_secret: true,
        refresh: Duration::from_millis(300),
        ..Default::default()
    };
    let operator = Operator::start(&cluster, &paths, settings).await;

    let backends: Api<appconn::crd::ConnectionBackend> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let backend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
        "metadata": {"name": "local", "namespace": cluster.namespace}, "spec": {"builtin": {}}
    }))
    .unwrap();
    backends
        .create(&PostParams::default(), &backend)
        .await
        .unwrap();
    let cluster_backends: Api<appconn::crd::ClusterConnectionBackend> =
        Api::all(cluster.client.clone());
    let shared = format!("shared-{}", cluster.namespace);
    let cluster_backend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ClusterConnectionBackend",
        "metadata": {"name": shared}, "spec": {"builtin": {}}
    }))
    .unwrap();
    cluster_backends
        .create(&PostParams::default(), &cluster_backend)
        .await
        .unwrap();
    cluster.put_secret("s", &[("password", "one")]).await;
    let spec = json!({"app": "a", "credentials": {"password": {"secretKeyRef": {"name": "s", "key": "password"}}}});
    let mut with_backend = spec.clone();
    with_backend["backendRef"] = json!({"kind": "ConnectionBackend", "name": "local"});
    cluster.create_connection("plain", spec.clone()).await;
    cluster.create_connection("via-backend", with_backend).await;
    let mut via_cluster = spec.clone();
    via_cluster["backendRef"] = json!({"kind": "ClusterConnectionBackend", "name": shared});
    cluster
        .create_connection("via-cluster-backend", via_cluster)
        .await;
    let mut missing = spec.clone();
    missing["credentials"]["password"]["secretKeyRef"]["name"] = json!("absent");
    cluster.create_connection("missing", missing).await;
    cluster.wait_for("plain", WAIT, "Ready", ready).await;
    cluster.wait_for("via-backend", WAIT, "Ready", ready).await;
    cluster
        .wait_for("via-cluster-backend", WAIT, "Ready", ready)
        .await;
    cluster
        .wait_for("missing", WAIT, "SecretNotFound", |c| {
            reason_is(c, "SecretNotFound")
        })
        .await;
    cluster.put_secret("s", &[("password", "two")]).await;
    cluster
        .wait_for("plain", WAIT, "version 2", |c| {
            c.status.as_ref().and_then(|s| s.version) == Some(2)
        })
        .await;
    // The same change again: a repeated Event is counted in its series (a patch).
    cluster.put_secret("s", &[("password", "one")]).await;
    cluster
        .wait_for("plain", WAIT, "version 3", |c| {
            c.status.as_ref().and_then(|s| s.version) == Some(3)
        })
        .await;
    // A few drift checks.
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The store read API checks the caller with a TokenReview and a SubjectAccessReview.
    server.set_token(
        "reader-token",
        k8s_openapi::api::authentication::v1::UserInfo {
            username: Some("reader".into()),
            ..Default::default()
        },
    );
    server.allow(
        "reader",
        "get",
        "appconn.io",
        "appconnections/credentials",
        Some(&cluster.namespace),
    );
    let url = format!(
        "{}/v1/namespaces/{}/connections/plain",
        operator.store_api, cluster.namespace
    );
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth("reader-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    cluster
        .connections()
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    cluster.wait_gone("plain", WAIT).await;
    operator.stop().await;

    let requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.as_deref() == Some(OPERATOR_AGENT))
        .collect();
    // Connections and backend checks share one stream of Secret metadata per scope.
    let secret_watches = requests
        .iter()
        .filter(|r| r.resource == "secrets" && r.verb == "watch")
        .count();
    assert_eq!(secret_watches, 1, "one Secret watch for the whole scope");

    let made: BTreeSet<Call> = requests
        .into_iter()
        .map(|r| {
            let resource = if r.subresource.is_empty() {
                r.resource
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            (r.group, resource, r.verb)
        })
        .collect();
    let granted = granted();
    let missing: Vec<&Call> = made.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "deploy/rbac.yaml does not grant calls the operator makes: {missing:?}"
    );
    let unused: Vec<&Call> = granted.difference(&made).collect();
    assert!(
        unused.is_empty(),
        "deploy/rbac.yaml grants calls the operator never makes: {unused:?}\nmade: {made:?}"
    );
}
