//! What the operator asks of the API server, counted at the test server by its User-Agent: two
//! writes on each new object (finalizer with the create-pending mark, then status) and one
//! Event; each Secret read once per real change; its own object never read back; nothing in
//! steady state; and after a restart no write, with the drift reads spread over the refresh
//! interval instead of made all at once. Against a real cluster (APPCONN_TEST_KUBECONFIG) there
//! is no request log, and these tests do nothing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use appconn_testkit::apiserver::TestApiServer;
use appconn_testkit::fake::infisical::FakeInfisical;
use common::{Cluster, OPERATOR_AGENT, Operator, OperatorSettings, Paths, eventually, ready};
use kube::api::ListParams;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const CONNECTIONS: usize = 20;

/// The operator's requests from position `from` of the server's log on, by "verb resource"
/// (watches and lists left out: they are per process, not per object).
fn operator_requests(server: &TestApiServer, from: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in server.requests().into_iter().skip(from) {
        if r.user_agent.as_deref() != Some(OPERATOR_AGENT)
            || matches!(r.verb.as_str(), "watch" | "list")
        {
            continue;
        }
        let resource = if r.subresource.is_empty() {
            r.resource
        } else {
            format!("{}/{}", r.resource, r.subresource)
        };
        *counts.entry(format!("{} {resource}", r.verb)).or_default() += 1;
    }
    counts
}

fn count(counts: &BTreeMap<String, usize>, key: &str) -> usize {
    counts.get(key).copied().unwrap_or(0)
}

async fn all_ready(cluster: &Cluster, n: usize) {
    eventually(WAIT, "every connection Ready", || async {
        let list = cluster
            .connections()
            .list(&ListParams::default())
            .await
            .unwrap();
        list.items.iter().filter(|c| ready(c)).count() == n
    })
    .await;
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_cost_two_writes_and_one_read_per_secret_and_restarts_write_nothing() {
    let cluster = Cluster::start().await;
    let Some(server) = cluster.server.as_ref() else {
        eprintln!("no request log on a real cluster: skipped");
        return;
    };
    for i in 0..CONNECTIONS {
        cluster
            .put_secret(
                &format!("s{i}"),
                &[("username", "app"), ("password", "p-4471")],
            )
            .await;
        cluster
            .create_connection(
                &format!("c{i}"),
                json!({
                    "app": "mssql", "method": "username-and-password",
                    "credentials": {
                        "host": {"value": "sql.internal"}, "port": {"value": 1433},
                        "username": {"secretKeyRef": {"name": format!("s{i}"), "key": "username"}},
                        "password": {"secretKeyRef": {"name": format!("s{i}"), "key": "password"}},
                    },
                }),
            )
            .await;
    }
    let paths = Paths::temporary();
    let operator = Operator::start(&cluster, &paths, OperatorSettings::default()).await;
    all_ready(&cluster, CONNECTIONS).await;
    // Every reconcile its own writes trigger has run by now, and the last Event is posted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let created = operator_requests(server, 0);
    let expected: BTreeMap<String, usize> = [
        ("patch appconnections", CONNECTIONS),
        ("patch appconnections/status", CONNECTIONS),
        ("create events", CONNECTIONS),
        ("get secrets", CONNECTIONS),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(
        created, expected,
        "per new connection: the finalizer with the mark, the status, one Event, one read of \
         its Secret, and no read of its own object"
    );

    // One Secret changes: one read of it, one status write, nothing for the others.
    let mark = server.requests().len();
    cluster
        .put_secret("s3", &[("username", "app"), ("password", "p-4472")])
        .await;
    eventually(WAIT, "the change in the status", || async {
        let conn = cluster.connections().get("c3").await.unwrap();
        conn.status.and_then(|s| s.version) == Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let changed = operator_requests(server, mark);
    assert_eq!(count(&changed, "get secrets"), 1, "{changed:?}");
    assert_eq!(
        count(&changed, "patch appconnections/status"),
        1,
        "{changed:?}"
    );
    assert_eq!(count(&changed, "get appconnections"), 0, "{changed:?}");
    assert_eq!(count(&changed, "patch appconnections"), 0, "{changed:?}");

    // Steady state: nothing at all.
    let mark = server.requests().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(operator_requests(server, mark), BTreeMap::new());
    operator.stop().await;

    // A restart with a 4 s drift check: each connection is looked at once (its Secret read,
    // nothing written), and the store reads come spread over the interval.
    let mark = server.requests().len();
    let refresh = Duration::from_secs(4);
    let operator = Operator::start(
        &cluster,
        &paths,
        OperatorSettings {
            refresh,
            ..OperatorSettings::default()
        },
    )
    .await;
    eventually(WAIT, "the first pass after the restart", || async {
        metric(&operator.metrics().await, "appconn_reconciles_total") >= CONNECTIONS as u64
    })
    .await;
    // Read before the metric: every Secret read after the first pass belongs to a drift read
    // the metric already counts.
    let first_pass = operator_requests(server, mark);
    let at_first_pass = metric(
        &operator.metrics().await,
        "appconn_backend_requests_total{backend=\"builtin\",operation=\"get\"",
    );
    let secret_reads = count(&first_pass, "get secrets") as u64;
    assert!(
        (CONNECTIONS as u64..=CONNECTIONS as u64 + at_first_pass).contains(&secret_reads),
        "each Secret read once in the first pass, and once more per drift read \
         ({at_first_pass}): {first_pass:?}"
    );
    assert!(
        at_first_pass < CONNECTIONS as u64 / 2,
        "{at_first_pass} of {CONNECTIONS} drift reads made at once after the restart"
    );
    // Spread, not postponed: half an interval on, about half of them have been made (were
    // each first check a whole interval after the first pass, there would be none yet; fewer
    // than two of twenty when each is due at a random point is a 1 in 50,000 chance).
    tokio::time::sleep(refresh / 2).await;
    let at_half = metric(
        &operator.metrics().await,
        "appconn_backend_requests_total{backend=\"builtin\",operation=\"get\"",
    );
    assert!(
        at_half >= 2,
        "{at_half} of {CONNECTIONS} drift reads half an interval after the restart"
    );
    eventually(refresh * 3, "every connection's drift read", || async {
        let text = operator.metrics().await;
        metric(
            &text,
            "appconn_backend_requests_total{backend=\"builtin\",operation=\"get\"",
        ) >= CONNECTIONS as u64
    })
    .await;
    let restarted = operator_requests(server, mark);
    let writes: usize = restarted
        .iter()
        .filter(|(k, _)| !k.starts_with("get "))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(writes, 0, "writes after a restart: {restarted:?}");
    assert_eq!(count(&restarted, "get appconnections"), 0, "{restarted:?}");
    // A drift check reads the connection's Secrets again (what it would push if the object
    // were gone): at most once more each.
    assert!(
        count(&restarted, "get secrets") <= 2 * CONNECTIONS,
        "{restarted:?}"
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_backend_also_costs_two_writes_per_new_connection() {
    let cluster = Cluster::start().await;
    let Some(server) = cluster.server.as_ref() else {
        eprintln!("no request log on a real cluster: skipped");
        return;
    };
    let fake = FakeInfisical::start().await;
    fake.add_identity("id-0042", "client-secret-0042");
    cluster
        .put_secret(
            "mi",
            &[
                ("clientId", "id-0042"),
                ("clientSecret", "client-secret-0042"),
            ],
        )
        .await;
    cluster
        .put_secret("sp", &[("clientSecret", "sp-secret-0042")])
        .await;
    cluster
        .create_backend(
            "infisical",
            json!({"infisical": {
                "url": fake.url(), "projectId": "6f1c2a9e-0b1d-4c55-9a57-3d1f1f1b2c3d",
                "auth": {"universalAuth": {
                    "clientId": {"secretKeyRef": {"name": "mi", "key": "clientId"}},
                    "clientSecret": {"secretKeyRef": {"name": "mi", "key": "clientSecret"}}}},
            }}),
        )
        .await;
    let n = 5;
    for i in 0..n {
        cluster
            .create_connection(&format!("lake-{i}"), common::databricks_spec("infisical"))
            .await;
    }
    let paths = Paths::temporary();
    let operator = Operator::start(&cluster, &paths, OperatorSettings::default()).await;
    all_ready(&cluster, n).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = operator_requests(server, 0);
    assert_eq!(count(&counts, "patch appconnections"), n, "{counts:?}");
    assert_eq!(
        count(&counts, "patch appconnections/status"),
        n,
        "{counts:?}"
    );
    assert_eq!(count(&counts, "get appconnections"), 0, "{counts:?}");
    assert_eq!(fake.stored_all().len(), n, "each created once");
    operator.stop().await;
}
