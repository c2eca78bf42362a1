//! A backend that throttles slows appconn down and never stalls it: 200 connections on one
//! Infisical backend whose server answers 429 (`Retry-After: 1`) to any request less than
//! 100 ms after the last one it accepted (10 requests/s), with tokens that expire every few
//! seconds. Run against the test API server or a real cluster (APPCONN_TEST_KUBECONFIG).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appconn::crd::{AppConnection, ConnectionBackend};
use appconn_testkit::fake::infisical::FakeInfisical;
use appconn_testkit::fake::server::RateLimit;
use common::{Cluster, Operator, OperatorSettings, Paths, ready};
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const CONNECTIONS: usize = 200;
const CLIENT_ID: &str = "5a0c4f0e-7d8b-4a55-9d3e-2f1b6c7d8e9f";
const CLIENT_SECRET: &str = "mi-client-secret-0042";
const PROJECT: &str = "6f1c2a9e-0b1d-4c55-9a57-3d1f1f1b2c3d";
/// What the server's limit alone needs for the creates: 200 requests at 10 a second.
const LIMIT_ALONE: Duration = Duration::from_secs(20);

/// Everything seen while watching: any moment the backend was not Ready, and every condition
/// reason a connection showed.
#[derive(Default)]
struct Seen {
    backend_not_ready: Vec<String>,
    reasons: BTreeSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_through_a_ten_per_second_limit() {
    let cluster = Cluster::start().await;
    let fake = FakeInfisical::start().await;
    fake.add_identity(CLIENT_ID, CLIENT_SECRET);
    // Tokens outlive a few pauses only: some expire while requests wait.
    fake.set_token_ttl(4, 2_592_000);
    fake.set_rate_limit(Some(RateLimit::Spacing {
        min_gap: Duration::from_millis(100),
        retry_after_secs: 1,
    }));
    cluster
        .put_secret(
            "infisical-mi",
            &[("clientId", CLIENT_ID), ("clientSecret", CLIENT_SECRET)],
        )
        .await;
    cluster
        .put_secret("sp", &[("clientSecret", "example-not-a-real-secret")])
        .await;
    // The backend's own rate limit is the default (10/s, burst 20): it is the server that
    // decides, as with a hosted Infisical whose limits the user does not know.
    let backends: Api<ConnectionBackend> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let backend: ConnectionBackend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
        "metadata": {"name": "throttled", "namespace": cluster.namespace},
        "spec": {"infisical": {
            "url": fake.url(), "projectId": PROJECT,
            "auth": {"universalAuth": {
                "clientId": {"secretKeyRef": {"name": "infisical-mi", "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": "infisical-mi", "key": "clientSecret"}}}},
        }},
    }))
    .unwrap();
    backends
        .create(&PostParams::default(), &backend)
        .await
        .unwrap();
    let names: Vec<String> = (0..CONNECTIONS).map(|i| format!("lake-{i:03}")).collect();
    let creates = names.iter().map(|name| {
        let cluster = &cluster;
        async move {
            cluster
                .create_connection(name, common::databricks_spec("throttled"))
                .await
        }
    });
    futures::stream::iter(creates)
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let paths = Paths::temporary();
    let start = Instant::now();
    let operator = Operator::start(&cluster, &paths, OperatorSettings::default()).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let connections = cluster.connections();
    // Twice what the limit alone needs, as the target says.
    let deadline = start + LIMIT_ALONE * 2;
    let all_ready = loop {
        let list = connections.list(&ListParams::default()).await.unwrap();
        watch(
            &seen,
            &list.items,
            &backends.get("throttled").await.unwrap(),
        );
        let ready = list.items.iter().filter(|c| ready(c)).count();
        if ready == CONNECTIONS {
            break start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of {CONNECTIONS} Ready after {:?}; reasons seen: {:?}",
            start.elapsed(),
            seen.lock().unwrap().reasons
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let requests = fake.requests();
    let throttled = requests.iter().filter(|r| r.status == 429).count();
    let logins = requests.iter().filter(|r| r.is_login()).count();
    eprintln!(
        "throttled backend: {CONNECTIONS} connections Ready in {all_ready:.1?} \
         (the limit alone needs {LIMIT_ALONE:?}); {} requests, {throttled} answered 429 ({:.1}%), \
         {logins} logins",
        requests.len(),
        100.0 * throttled as f64 / requests.len() as f64
    );
    assert_eq!(fake.stored_all().len(), CONNECTIONS, "each created once");
    assert!(
        (throttled as f64) < 0.10 * requests.len() as f64,
        "{throttled} of {} requests were answered 429",
        requests.len()
    );
    {
        let seen = seen.lock().unwrap();
        assert!(
            seen.backend_not_ready.is_empty(),
            "the backend was reported not Ready: {:?}",
            seen.backend_not_ready
        );
        for bad in ["BackendNotReady", "BackendAuthFailed"] {
            assert!(!seen.reasons.contains(bad), "a connection showed {bad}");
        }
    }

    // Deletions go through the same limit, and all complete.
    let deleting = Instant::now();
    for name in &names {
        connections
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let deadline = deleting + LIMIT_ALONE * 2;
    loop {
        let left = connections
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        watch(&seen, &left, &backends.get("throttled").await.unwrap());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} deletions still pending after {:?}: {:?}",
            left.len(),
            deleting.elapsed(),
            left.first().and_then(|c| c.status.clone())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "throttled backend: all deleted in {:.1?}",
        deleting.elapsed()
    );
    assert!(fake.stored_all().is_empty(), "every backend object deleted");
    assert!(seen.lock().unwrap().backend_not_ready.is_empty());
    operator.stop().await;
}

fn watch(seen: &Mutex<Seen>, connections: &[AppConnection], backend: &ConnectionBackend) {
    let mut seen = seen.lock().unwrap();
    for conn in connections {
        if let Some(c) = conn
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == "Ready")
        {
            seen.reasons.insert(c.reason.clone());
        }
    }
    if let Some(c) = backend
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Ready" && c.status != "True")
    {
        seen.backend_not_ready.push(format!(
            "{} {}: {}",
            backend.name_any(),
            c.reason,
            c.message
        ));
    }
}

/// Connections held back by a backend that is not Ready go the moment it is Ready again, not
/// at its next periodic check or their own next retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_back_by_a_backend_go_as_soon_as_it_is_ready() {
    let cluster = Cluster::start().await;
    let fake = FakeInfisical::start().await;
    fake.add_identity(CLIENT_ID, CLIENT_SECRET);
    cluster
        .put_secret(
            "infisical-mi",
            &[("clientId", CLIENT_ID), ("clientSecret", "not-the-secret")],
        )
        .await;
    cluster
        .put_secret("sp", &[("clientSecret", "example-not-a-real-secret")])
        .await;
    let backends: Api<ConnectionBackend> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let backend: ConnectionBackend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
        "metadata": {"name": "infisical", "namespace": cluster.namespace},
        "spec": {"infisical": {
            "url": fake.url(), "projectId": PROJECT,
            "auth": {"universalAuth": {
                "clientId": {"secretKeyRef": {"name": "infisical-mi", "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": "infisical-mi", "key": "clientSecret"}}}},
        }},
    }))
    .unwrap();
    backends
        .create(&PostParams::default(), &backend)
        .await
        .unwrap();
    let paths = Paths::temporary();
    let operator = Operator::start(&cluster, &paths, OperatorSettings::default()).await;
    let backend_ready = |status: &str| {
        let backends = backends.clone();
        let status = status.to_string();
        async move {
            backends
                .get("infisical")
                .await
                .unwrap()
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == "Ready" && c.status == status)
        }
    };
    common::eventually(Duration::from_secs(20), "the backend refused", || {
        backend_ready("False")
    })
    .await;
    let names: Vec<String> = (0..10).map(|i| format!("held-{i}")).collect();
    for name in &names {
        cluster
            .create_connection(name, common::databricks_spec("infisical"))
            .await;
    }
    for name in &names {
        cluster
            .wait_for(name, Duration::from_secs(20), "BackendNotReady", |c| {
                common::reason_is(c, "BackendNotReady")
            })
            .await;
    }
    // The fix: the right secret. The backend is checked again at once, and its connections
    // follow it, with no check or retry of theirs due for minutes.
    cluster
        .put_secret(
            "infisical-mi",
            &[("clientId", CLIENT_ID), ("clientSecret", CLIENT_SECRET)],
        )
        .await;
    common::eventually(Duration::from_secs(20), "the backend Ready", || {
        backend_ready("True")
    })
    .await;
    let ready_at = Instant::now();
    for name in &names {
        cluster
            .wait_for(name, Duration::from_secs(10), "Ready", ready)
            .await;
    }
    eprintln!(
        "held-back connections: all Ready {:.1?} after their backend",
        ready_at.elapsed()
    );
    assert_eq!(fake.stored_all().len(), names.len());
    operator.stop().await;
}
