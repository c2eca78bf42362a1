//! `appconn keys rotate | status | remove` and `appconn store backup` as a person runs them,
//! on both engines: the commands themselves as processes, the store on a real SQLite file or a
//! real PostgreSQL database. Includes a `keys rotate` killed in the middle of re-encryption,
//! and a rotation of the key Secret that a running operator carries out.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appconn::controller::operator::Maintenance;
use appconn::keys::InstallationKeys;
use appconn::secret::Credentials;
use appconn::store::{NewRecord, SqlStore, StoreEngine, StoreLocation};
use appconn_testkit::postgres as pg;
use common::{Cluster, Operator, OperatorSettings, Paths, ready};
use jiff::Timestamp;
use serde_json::json;
use sqlx::AnyPool;
use uuid::Uuid;

const CANARY: &str = "zebra-canary-7781";

/// A store (SQLite file or PostgreSQL database) and its key file.
struct Fixture {
    store: String,
    key_file: PathBuf,
    dir: tempfile::TempDir,
    database: Option<pg::Database>,
}

impl Fixture {
    fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            store: dir.path().join("appconn.db").display().to_string(),
            key_file: dir.path().join("appconn.key"),
            dir,
            database: None,
        }
    }

    fn postgres(test: &str) -> Option<Fixture> {
        let database = pg::or_skip(test)?.database();
        let dir = tempfile::tempdir().unwrap();
        Some(Fixture {
            store: database.url.clone(),
            key_file: dir.path().join("appconn.key"),
            dir,
            database: Some(database),
        })
    }

    fn location(&self) -> StoreLocation {
        StoreLocation::parse(&self.store).unwrap()
    }

    fn keys(&self) -> InstallationKeys {
        InstallationKeys::read_file(&self.key_file).unwrap()
    }

    async fn open(&self) -> SqlStore {
        SqlStore::open_location(&self.location(), &self.keys().store_keys)
            .await
            .unwrap()
    }

    /// Creates the key file and `n` records, each with the password [`CANARY`].
    async fn fill(&self, n: usize) -> Vec<Uuid> {
        InstallationKeys::load_or_create_file(&self.key_file).unwrap();
        let store = self.open().await;
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(store.insert(record(i), Timestamp::now()).await.unwrap().id);
        }
        store.close().await;
        ids
    }

    /// `appconn ARGS --store STORE --key-file KEY_FILE`.
    fn appconn(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_appconn"));
        command
            .args(args)
            .arg("--store")
            .arg(&self.store)
            .arg("--key-file")
            .arg(&self.key_file)
            .env_remove("APPCONN_STORE")
            .env_remove("KUBECONFIG");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.appconn(args).output().unwrap()
    }

    /// Records per key id, read with plain SQL.
    async fn per_key(&self) -> BTreeMap<String, i64> {
        sqlx::any::install_default_drivers();
        let url = match self.location() {
            StoreLocation::Sqlite(path) => format!("sqlite://{}", path.display()),
            StoreLocation::Postgres(url) => url.to_string(),
        };
        let pool = AnyPool::connect(&url).await.unwrap();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT key_id, COUNT(*) FROM connections GROUP BY key_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        rows.into_iter().collect()
    }
}

fn record(i: usize) -> NewRecord {
    NewRecord {
        namespace: "ns".into(),
        name: format!("c{i}"),
        connection_name: format!("c{i}"),
        app: "mssql".into(),
        method: None,
        project: None,
        description: None,
        settings: BTreeMap::new(),
        credentials: Credentials::new(BTreeMap::from([("password".to_string(), json!(CANARY))])),
        credentials_hash: "hmac-sha256:00".into(),
        rotation: None,
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Failed with exit code 2 and exactly one line on stderr, containing `expected`.
fn assert_one_line_error(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(!stderr.contains(CANARY), "{stderr}");
}

appconn_testkit::on_both_engines!(
    rotate_status_and_remove,
    a_crash_in_the_middle_of_reencryption_loses_nothing,
);

async fn rotate_status_and_remove(f: Fixture) {
    let ids = f.fill(30).await;
    let status = f.run(&["keys", "status"]);
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        stdout(&status),
        "KEY          STATE      RECORDS\nk1           current    30\n"
    );
    assert_one_line_error(
        &f.run(&["keys", "remove", "k1"]),
        "key k1 cannot be removed: it is the current key: rotate to a new key first",
    );

    let rotated = f.run(&["keys", "rotate", "--batch-size", "7"]);
    assert!(rotated.status.success(), "{rotated:?}");
    let shown = stdout(&rotated);
    assert!(
        shown.contains("k2 is now the current key (k1 is kept for reading)"),
        "{shown}"
    );
    assert!(
        shown.contains("re-encrypted 30 record(s) with k2"),
        "{shown}"
    );
    assert_eq!(f.per_key().await, BTreeMap::from([("k2".to_string(), 30)]));
    assert_eq!(
        stdout(&f.run(&["keys", "status"])),
        "KEY          STATE      RECORDS\nk1           old        0\nk2           current    30\n"
    );

    let removed = f.run(&["keys", "remove", "k1"]);
    assert!(removed.status.success(), "{removed:?}");
    assert_eq!(f.keys().store_keys.ids().collect::<Vec<_>>(), ["k2"]);
    assert_eq!(
        stdout(&f.run(&["keys", "status"])),
        "KEY          STATE      RECORDS\nk2           current    30\n"
    );
    let store = f.open().await;
    for id in ids {
        let r = store.get(id).await.unwrap().unwrap();
        assert_eq!(r.credentials.expose()["password"], json!(CANARY));
    }
    store.close().await;

    assert_one_line_error(&f.run(&["keys", "remove", "k9"]), "holds no key \"k9\"");
    // The key file and the output never show key material.
    let doc = std::fs::read_to_string(&f.key_file).unwrap();
    let material: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let key = material["storeKeys"][0]["key"].as_str().unwrap();
    assert!(!shown.contains(key));
}

/// `keys rotate` killed (SIGKILL) after some records moved: every record still reads, on one
/// key or the other, and re-encryption finishes afterwards.
async fn a_crash_in_the_middle_of_reencryption_loses_nothing(f: Fixture) {
    const N: usize = 1500;
    let ids = f.fill(N).await;
    let mut child = f
        .appconn(&["keys", "rotate", "--batch-size", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (on_k1, on_k2) = loop {
        let counts = f.per_key().await;
        let (k1, k2) = (counts.get("k1").copied(), counts.get("k2").copied());
        if k2.unwrap_or(0) >= 20 || Instant::now() > deadline {
            break (k1, k2);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(on_k2.unwrap_or(0) >= 20, "re-encryption never started");
    let counts = f.per_key().await;
    let moved = counts.get("k2").copied().unwrap_or(0);
    assert!(
        counts.get("k1").copied().unwrap_or(0) > 0,
        "killed too late to be mid-way: {counts:?} (first seen {on_k1:?}/{on_k2:?})"
    );
    assert_eq!(
        counts.values().sum::<i64>(),
        N as i64,
        "no record lost: {counts:?}"
    );

    // The keys were saved before re-encryption began: both keys are there, k2 current.
    let keys = f.keys();
    assert_eq!(keys.store_keys.ids().collect::<Vec<_>>(), ["k1", "k2"]);
    assert_eq!(keys.store_keys.active_id(), "k2");
    let store = f.open().await;
    for id in &ids {
        let r = store
            .get(*id)
            .await
            .unwrap()
            .expect("every record is still there");
        assert_eq!(r.credentials.expose()["password"], json!(CANARY));
        assert_eq!(r.version, 1);
    }
    // What the operator does next: the rest moves, and k1 can go.
    assert_eq!(store.reencrypt().await.unwrap(), N as u64 - moved as u64);
    store.close().await;
    let removed = f.run(&["keys", "remove", "k1"]);
    assert!(removed.status.success(), "{removed:?}");
}

#[tokio::test]
async fn backup_while_writing_then_restore_reads_every_record() {
    const N: usize = 200;
    let f = Fixture::sqlite();
    let ids = f.fill(N).await;
    // The operator keeps writing while the copy is taken.
    let store = Arc::new(f.open().await);
    let writer = tokio::spawn({
        let store = store.clone();
        let ids = ids.clone();
        async move {
            let mut round = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                round += 1;
                for (i, id) in ids.iter().enumerate().take(20) {
                    let mut new = record(i);
                    new.credentials = Credentials::new(BTreeMap::from([(
                        "password".into(),
                        json!(format!("{CANARY}-{round}")),
                    )]));
                    store.update(*id, new, Timestamp::now()).await.unwrap();
                }
            }
            round
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let backup = f.dir.path().join("backup.db");
    let out = f.run(&["store", "backup", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), format!("wrote {}\n", backup.display()));
    assert!(writer.await.unwrap() > 1, "the writer ran during the copy");
    store.close().await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }
    assert_eq!(
        std::fs::read_dir(f.dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
            .count(),
        0,
        "no temporary file is left"
    );

    // Restore: the copy and the key file are a working store.
    let restored_dir = tempfile::tempdir().unwrap();
    let restored = restored_dir.path().join("appconn.db");
    std::fs::copy(&backup, &restored).unwrap();
    let store = SqlStore::open(&restored, &f.keys().store_keys)
        .await
        .unwrap();
    assert_eq!(store.list(None).await.unwrap().len(), N);
    for (i, id) in ids.iter().enumerate() {
        let r = store.get(*id).await.unwrap().unwrap();
        let password = r.credentials.expose()["password"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(password.starts_with(CANARY), "c{i}");
        // One snapshot: a record's version and content agree.
        if i >= 20 {
            assert_eq!((r.version, password.as_str()), (1, CANARY));
        }
    }
    store.close().await;

    assert_one_line_error(
        &f.run(&["store", "backup", backup.to_str().unwrap()]),
        "it exists already: name a new file",
    );
}

#[tokio::test]
async fn a_postgresql_store_is_copied_with_pg_dump_and_restored() {
    let Some(f) = Fixture::postgres("a_postgresql_store_is_copied_with_pg_dump_and_restored")
    else {
        return;
    };
    let ids = f.fill(50).await;
    assert_one_line_error(
        &f.run(&[
            "store",
            "backup",
            f.dir.path().join("b.db").to_str().unwrap(),
        ]),
        "a PostgreSQL store is backed up with pg_dump",
    );
    let server = pg::server().unwrap();
    let database = f.database.as_ref().unwrap();
    let dump = server.dump(database);
    assert!(
        !dump.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
        "the dump holds ciphertext only"
    );
    let restored = server.dump_and_restore(database);
    let store = SqlStore::open_location(
        &StoreLocation::parse(&restored.url).unwrap(),
        &f.keys().store_keys,
    )
    .await
    .unwrap();
    assert_eq!(store.list(None).await.unwrap().len(), ids.len());
    for id in ids {
        let r = store.get(id).await.unwrap().unwrap();
        assert_eq!(r.credentials.expose()["password"], json!(CANARY));
    }
}

#[tokio::test]
async fn bad_input_gets_one_line_and_exit_2() {
    let f = Fixture::sqlite();
    let mut no_keys = Command::new(env!("CARGO_BIN_EXE_appconn"));
    no_keys
        .args(["keys", "status"])
        .env_remove("APPCONN_STORE")
        .env_remove("APPCONN_KEY_FILE");
    assert_one_line_error(&no_keys.output().unwrap(), "name the keys: --key-file PATH");
    // No key file yet: commands that change keys never create one.
    assert_one_line_error(
        &f.run(&["keys", "rotate"]),
        &format!("cannot read key file {}", f.key_file.display()),
    );
    let mut bad_url = Command::new(env!("CARGO_BIN_EXE_appconn"));
    bad_url
        .args(["keys", "status", "--key-file", "k", "--store"])
        .arg(format!("postgres://app:{CANARY}@db:99999/app"));
    assert_one_line_error(&bad_url.output().unwrap(), "invalid PostgreSQL URL");
    let mut run = Command::new(env!("CARGO_BIN_EXE_appconn"));
    run.args(["run", "--kubeconfig", "/nonexistent"])
        .env_remove("APPCONN_STORE_API_TLS_DIR")
        .env_remove("APPCONN_STORE_API_PLAIN_HTTP");
    assert_one_line_error(
        &run.output().unwrap(),
        "the store read API serves HTTPS: give --store-api-tls-dir DIR",
    );
}

/// `keys rotate --key-secret` changes the Secret a running operator reads: the operator takes
/// the new key, moves every record to it in batches, and `keys remove` then drops the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_key_secret_reaches_the_running_operator() {
    const N: usize = 12;
    let cluster = Cluster::start().await;
    let Some(server) = cluster.server.as_ref() else {
        return;
    };
    let paths = Paths::temporary();
    let settings = OperatorSettings {
        keys_in_secret: true,
        maintenance: Maintenance {
            reload_every: Duration::from_millis(200),
            reencrypt_batch: 5,
            reencrypt_pause: Duration::from_millis(20),
        },
        ..Default::default()
    };
    let operator = Operator::start(&cluster, &paths, settings).await;
    for i in 0..N {
        cluster
            .put_secret(&format!("s{i}"), &[("password", CANARY)])
            .await;
        let spec = json!({"app": "mssql", "credentials": {"password": {"secretKeyRef": {"name": format!("s{i}"), "key": "password"}}}});
        cluster.create_connection(&format!("c{i}"), spec).await;
    }
    for i in 0..N {
        cluster
            .wait_for(&format!("c{i}"), Duration::from_secs(30), "Ready", ready)
            .await;
    }

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), &cluster.namespace);
    let appconn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_appconn"))
            .args(args)
            .args(["--key-secret", "appconn-store-key", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--store")
            .arg(paths.store())
            .env_remove("APPCONN_STORE")
            .output()
            .unwrap()
    };
    let rotated = Command::new(env!("CARGO_BIN_EXE_appconn"))
        .args([
            "keys",
            "rotate",
            "--key-secret",
            "appconn-store-key",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .env_remove("APPCONN_STORE")
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{rotated:?}");
    let shown = stdout(&rotated);
    assert!(
        shown.contains(&format!(
            "Secret {}/appconn-store-key: k2 is now the current key",
            cluster.namespace
        )),
        "{shown}"
    );
    assert!(
        shown.contains("the running operator re-encrypts"),
        "{shown}"
    );

    common::eventually(Duration::from_secs(30), "every record on k2", || async {
        stdout(&appconn(&["keys", "status"]))
            == format!("KEY          STATE      RECORDS\nk1           old        0\nk2           current    {N}\n")
    })
    .await;
    let removed = appconn(&["keys", "remove", "k1"]);
    assert!(removed.status.success(), "{removed:?}");

    // The operator carries on with k2 alone: a changed Secret is written and read back.
    cluster
        .put_secret("s0", &[("password", "rotated-later")])
        .await;
    cluster
        .wait_for("c0", Duration::from_secs(30), "version 2", |c| {
            c.status.as_ref().and_then(|s| s.version) == Some(2)
        })
        .await;
    operator.stop().await;
    let keys = {
        let secret = cluster.secrets().get("appconn-store-key").await.unwrap();
        InstallationKeys::from_json(&secret.data.unwrap()["keys.json"].0).unwrap()
    };
    assert_eq!(keys.store_keys.ids().collect::<Vec<_>>(), ["k2"]);
    let store = SqlStore::open(paths.store(), &keys.store_keys)
        .await
        .unwrap();
    let records = store.list(None).await.unwrap();
    assert_eq!(records.len(), N);
    let c0 = records.iter().find(|r| r.name == "c0").unwrap();
    let c0 = store.get(c0.id).await.unwrap().unwrap();
    assert_eq!(c0.credentials.expose()["password"], json!("rotated-later"));
}
