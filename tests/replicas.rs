//! Two operators on one PostgreSQL store and the Kubernetes API test server: the Lease leader
//! reconciles, both serve the store read API (over HTTPS). The leader is killed in the middle of
//! a batch of new connections and Secret changes; the other takes over. Afterwards every
//! connection has exactly one record, the last value of every Secret is what the store holds,
//! and the survivor's read API answered every request throughout.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use appconn::cli::keys::{KeyTarget, KeysOptions};
use appconn::controller::operator::Maintenance;
use appconn::store::tls::TlsFiles;
use appconn_testkit::apiserver::{TestApiServer, UserInfo};
use appconn_testkit::postgres as pg;
use appconn_testkit::tls::TestCa;
use common::{Cluster, Operator, OperatorSettings, Paths, ready};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::{Value, json};

const N: usize = 120;
const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "tok-replica-reader-77";
const USER: &str = "system:serviceaccount:apps:reader";

fn spec(i: usize) -> Value {
    json!({
        "app": "mssql",
        "credentials": {
            "host": {"value": "sql.internal"},
            "password": {"secretKeyRef": {"name": format!("s{i}"), "key": "password"}},
        },
    })
}

async fn leader(cluster: &Cluster) -> Option<String> {
    Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace)
        .get_opt("appconn-leader")
        .await
        .unwrap()
        .and_then(|l| l.spec?.holder_identity)
}

/// [`TOKEN`] authenticates as [`USER`], who may list connections and read their credentials.
fn grant_reader(server: &TestApiServer, namespace: &str) {
    server.set_token(
        TOKEN,
        UserInfo {
            username: Some(USER.into()),
            uid: None,
            groups: None,
            extra: None,
        },
    );
    server.allow(
        USER,
        "list",
        "appconn.io",
        "appconnections",
        Some(namespace),
    );
    server.allow(
        USER,
        "get",
        "appconn.io",
        "appconnections/credentials",
        Some(namespace),
    );
}

fn https_client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_mid_batch_and_the_other_replica_takes_over() {
    let Some(postgres) = pg::or_skip("the_leader_dies_mid_batch_and_the_other_replica_takes_over")
    else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::start().await;
    let Some(server) = cluster.server.as_ref() else {
        // Its reader authenticates with a token only the test server knows.
        return;
    };
    grant_reader(server, &cluster.namespace);
    let database = postgres.database();
    let url = database.url.clone();
    let ca = TestCa::new("replicas CA");
    let tls = tempfile::tempdir().unwrap();
    ca.server_cert().write_to(tls.path());
    let settings = |identity: &str| OperatorSettings {
        leader_elect: Some(identity.into()),
        keys_in_secret: true,
        postgres: Some(url.clone()),
        store_api_tls: Some(TlsFiles::in_dir(tls.path())),
        ..Default::default()
    };
    let one = Operator::start(&cluster, &Paths::temporary(), settings("one")).await;
    common::eventually(WAIT, "a leader", || async {
        leader(&cluster).await.as_deref() == Some("one")
    })
    .await;
    let two = Operator::start(&cluster, &Paths::temporary(), settings("two")).await;

    // The standby answers reads from the start, and keeps answering while it takes over.
    let reader_stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = tokio::spawn({
        let list = format!(
            "{}/v1/namespaces/{}/connections",
            two.store_api, cluster.namespace
        );
        let client = https_client(&ca);
        let (stop, answered, failed) = (reader_stop.clone(), answered.clone(), failed.clone());
        let why = failures.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = client.get(&list).bearer_auth(TOKEN).send().await;
                let ok = match answer {
                    Ok(r) if r.status().is_success() => true,
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        why.lock().unwrap().push(format!("{status}: {body}"));
                        false
                    }
                    Err(e) => {
                        why.lock().unwrap().push(format!("{e:?}"));
                        false
                    }
                };
                let counter = if ok { &answered } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    for i in 0..N {
        cluster
            .put_secret(&format!("s{i}"), &[("password", &format!("first-{i}"))])
            .await;
    }
    // All at once, faster than the leader makes them Ready, so that it dies mid-batch.
    let cluster = &cluster;
    futures::future::join_all(
        (0..N).map(|i| async move { cluster.create_connection(&format!("c{i}"), spec(i)).await }),
    )
    .await;
    // Mid-batch: some connections are Ready, not all.
    common::eventually(WAIT, "the first connections Ready", || async {
        let list = cluster
            .connections()
            .list(&Default::default())
            .await
            .unwrap();
        list.items.iter().filter(|c| ready(c)).count() >= 5
    })
    .await;
    let ready_before = cluster
        .connections()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| ready(c))
        .count();
    // Killed: in-flight reconciles are cut short wherever they are.
    let answered_at_kill = answered.load(Ordering::Relaxed);
    drop(one);
    // Changes made while nobody leads must not be lost.
    for i in (0..N).step_by(4) {
        cluster
            .put_secret(&format!("s{i}"), &[("password", &format!("second-{i}"))])
            .await;
    }

    common::eventually(WAIT, "the standby to lead", || async {
        leader(cluster).await.as_deref() == Some("two")
    })
    .await;
    for i in 0..N {
        cluster
            .wait_for(&format!("c{i}"), WAIT, "Ready", ready)
            .await;
    }
    // Every Secret's last value reaches the store (a connection first created after the
    // change holds it from the start, at version 1; one created before is updated).
    let client = https_client(&ca);
    let record = |i: usize| {
        let client = client.clone();
        let url = format!(
            "{}/v1/namespaces/{}/connections/c{i}",
            two.store_api, cluster.namespace
        );
        async move {
            let response = client.get(url).bearer_auth(TOKEN).send().await.unwrap();
            assert!(
                response.status().is_success(),
                "c{i}: {}",
                response.status()
            );
            response.json::<Value>().await.unwrap()
        }
    };
    let expected = |i: usize| {
        if i.is_multiple_of(4) {
            format!("second-{i}")
        } else {
            format!("first-{i}")
        }
    };
    for i in 0..N {
        common::eventually(WAIT, &format!("c{i} to hold {}", expected(i)), || async {
            record(i).await["credentials"]["password"] == json!(expected(i))
        })
        .await;
    }
    reader_stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    let (answered, failed) = (
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(
        answered > answered_at_kill,
        "the survivor answered during the takeover: {answered_at_kill} answers before, {answered} in all"
    );
    assert_eq!(
        failed,
        0,
        "the survivor's read API failed {failed} of {}: {:?}",
        answered + failed,
        failures.lock().unwrap()
    );
    assert!(
        ready_before < N,
        "the leader was killed mid-batch ({ready_before} of {N} Ready)"
    );

    // One record per connection: the one its status names, with the hash it reports.
    let list: Value = client
        .get(format!(
            "{}/v1/namespaces/{}/connections",
            two.store_api, cluster.namespace
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), N, "{list}");
    let names: BTreeSet<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), N, "no duplicate rows");
    for i in 0..N {
        let name = format!("c{i}");
        let record = record(i).await;
        cluster
            .wait_for(&name, WAIT, "the record's id and hash in status", |c| {
                let status = c.status.as_ref();
                status.and_then(|s| s.id.as_deref()) == record["id"].as_str()
                    && status.and_then(|s| s.credentials_hash.as_deref())
                        == record["credentialsHash"].as_str()
            })
            .await;
    }
    let rows = postgres
        .psql(
            &database.name,
            "SELECT COUNT(*), COUNT(DISTINCT connection_name) FROM connections",
        )
        .unwrap();
    assert_eq!(rows, format!("{N}|{N}"));
    two.stop().await;
}

/// A key rotation with two replicas: the standby reads every record, old key or new, at every
/// moment, because a new key becomes current only after every replica has read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_key_rotation_every_replica_reads_every_record() {
    const CONNECTIONS: usize = 20;
    let Some(postgres) = pg::or_skip("during_a_key_rotation_every_replica_reads_every_record")
    else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::start().await;
    let Some(server) = cluster.server.as_ref() else {
        return;
    };
    grant_reader(server, &cluster.namespace);
    let url = postgres.database().url;
    let ca = TestCa::new("rotation CA");
    let tls = tempfile::tempdir().unwrap();
    ca.server_cert().write_to(tls.path());
    let settings = |identity: &str| OperatorSettings {
        leader_elect: Some(identity.into()),
        keys_in_secret: true,
        postgres: Some(url.clone()),
        store_api_tls: Some(TlsFiles::in_dir(tls.path())),
        maintenance: Maintenance {
            reload_every: Duration::from_millis(400),
            reencrypt_batch: 2,
            reencrypt_pause: Duration::from_millis(5),
        },
        ..Default::default()
    };
    let one = Operator::start(&cluster, &Paths::temporary(), settings("one")).await;
    common::eventually(WAIT, "a leader", || async {
        leader(&cluster).await.as_deref() == Some("one")
    })
    .await;
    let two = Operator::start(&cluster, &Paths::temporary(), settings("two")).await;
    for i in 0..CONNECTIONS {
        cluster
            .put_secret(&format!("s{i}"), &[("password", &format!("first-{i}"))])
            .await;
        cluster.create_connection(&format!("c{i}"), spec(i)).await;
    }
    for i in 0..CONNECTIONS {
        cluster
            .wait_for(&format!("c{i}"), WAIT, "Ready", ready)
            .await;
    }

    let dir = tempfile::tempdir().unwrap();
    let options = KeysOptions {
        keys: KeyTarget::Secret {
            kubeconfig: Some(server.write_kubeconfig(dir.path(), &cluster.namespace)),
            namespace: None,
            name: "appconn-store-key".into(),
        },
        store: Some(appconn::store::StoreLocation::parse(&url).unwrap()),
    };
    let rotated = appconn::cli::keys::rotate(
        &KeysOptions {
            store: None,
            ..options.clone()
        },
        1,
    )
    .await
    .unwrap();
    assert_eq!(rotated.new_key, "k2");

    // Read every record from the standby until the leader has moved them all to k2.
    let client = https_client(&ca);
    let mut reads = 0;
    loop {
        for i in 0..CONNECTIONS {
            let response = client
                .get(format!(
                    "{}/v1/namespaces/{}/connections/c{i}",
                    two.store_api, cluster.namespace
                ))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert!(
                response.status().is_success(),
                "the standby could not read c{i} during the rotation: {}",
                response.status()
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["credentials"]["password"], json!(format!("first-{i}")));
            reads += 1;
        }
        let status = appconn::cli::keys::status(&options).await.unwrap();
        if status.iter().any(|k| k.id == "k1" && k.records == Some(0)) {
            break;
        }
        assert!(reads < 20_000, "re-encryption did not finish: {status:?}");
    }
    assert!(
        reads > CONNECTIONS,
        "the standby was read during the rotation"
    );
    drop(one);
    two.stop().await;
}
