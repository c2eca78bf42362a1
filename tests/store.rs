//! The built-in store on both engines: every test of the shared contract runs on a real SQLite
//! file and on a real PostgreSQL server (started by the test harness; skipped, saying why, where
//! none is installed). Tests of what only one engine has come after them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use appconn::crd::RotationSchedule;
use appconn::keys::{InstallationKeys, StoreKeys};
use appconn::secret::Credentials;
use appconn::store::migrations::{self, Migration};
use appconn::store::{
    KeyUsage, NewRecord, SqlStore, SqliteStore, StoreEngine, StoreError, StoreLocation,
};
use appconn_testkit::postgres as pg;
use jiff::Timestamp;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::AnyPool;
use uuid::Uuid;

const CANARY: &str = "zebra-canary-7781";
const CANARY_2: &str = "zebra-canary-7782";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn new_record(namespace: &str, connection_name: &str, password: &str) -> NewRecord {
    NewRecord {
        namespace: namespace.into(),
        name: format!("{connection_name}-resource"),
        connection_name: connection_name.into(),
        app: "mssql".into(),
        method: Some("username-and-password".into()),
        project: Some("6f1c".into()),
        description: Some("Analytics warehouse".into()),
        settings: BTreeMap::from([("gatewayId".to_string(), Value::Null)]),
        credentials: Credentials::new(BTreeMap::from([
            ("host".to_string(), json!("sql.internal")),
            ("port".to_string(), json!(1433)),
            ("password".to_string(), json!(password)),
        ])),
        credentials_hash: format!("hmac-sha256:{}", hex::encode(password)),
        rotation: None,
    }
}

/// A store location on one engine: a SQLite file in a temporary directory, or a fresh database
/// on the test process's PostgreSQL server.
struct Fixture {
    location: StoreLocation,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            location: StoreLocation::Sqlite(dir.path().join("appconn.db")),
            _dir: Some(dir),
        }
    }

    /// `None` (the test says it is skipped, and why) without a PostgreSQL server.
    fn postgres(test: &str) -> Option<Self> {
        let server = pg::or_skip(test)?;
        Some(Self {
            location: StoreLocation::parse(&server.database().url).unwrap(),
            _dir: None,
        })
    }

    async fn open(&self, keys: &StoreKeys) -> Result<SqlStore, StoreError> {
        SqlStore::open_location(&self.location, keys).await
    }

    fn engine(&self) -> &'static str {
        match self.location {
            StoreLocation::Sqlite(_) => "SQLite",
            StoreLocation::Postgres(_) => "PostgreSQL",
        }
    }

    /// What errors call the store: its path, or its URL without the password.
    fn shown(&self) -> String {
        self.location.describe()
    }

    /// A plain connection to the same database, for what the store's API cannot do.
    async fn raw(&self) -> AnyPool {
        sqlx::any::install_default_drivers();
        let url = match &self.location {
            StoreLocation::Sqlite(path) => format!("sqlite://{}?mode=rwc", path.display()),
            StoreLocation::Postgres(url) => url.to_string(),
        };
        AnyPool::connect(&url).await.unwrap()
    }

    async fn exec(&self, sql: &'static str) {
        let pool = self.raw().await;
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }

    /// `key_id` column of a record, read with plain SQL.
    async fn key_id_of(&self, id: Uuid) -> String {
        let pool = self.raw().await;
        let sql = match self.location {
            StoreLocation::Sqlite(_) => "SELECT key_id FROM connections WHERE id = ?",
            StoreLocation::Postgres(_) => "SELECT key_id FROM connections WHERE id = $1",
        };
        let key: String = sqlx::query_scalar(sql)
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        key
    }
}

appconn_testkit::on_both_engines!(
    round_trip_by_id_and_by_name_and_after_reopening,
    version_moves_only_on_change_and_nothing_is_written_otherwise,
    concurrent_updates_all_land_in_order_of_versions,
    connection_names_are_unique_per_namespace,
    delete_removes_once_and_frees_the_name,
    list_is_ordered_filtered_and_has_no_credentials,
    state_documents_are_written_only_when_they_change,
    wrong_key_fails_at_open_and_the_right_key_still_reads,
    missing_key_is_named_at_open,
    key_rotation_writes_with_the_new_key_and_reads_the_old,
    reencryption_runs_in_bounded_batches_and_keys_go_only_when_unused,
    newer_schema_is_refused,
    migrations_upgrade_an_older_store_and_the_older_binary_refuses_it,
    tables_of_something_else_are_refused,
    swapped_ciphertexts_do_not_decrypt,
    errors_never_show_credentials,
    rotation_state_is_kept_by_the_engine,
    ten_thousand_records,
);

/// A SQLite file in a temporary directory, for what only a file can show.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("appconn.db")
    }
}

fn keys_with(ids: &[&str], active: &str) -> StoreKeys {
    let key = || {
        use base64::Engine as _;
        let bytes: [u8; 32] = rand::random();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let entries: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "key": key()}))
        .collect();
    let doc = json!({"hashKey": key(), "storeKeys": entries, "activeStoreKey": active});
    InstallationKeys::from_json(doc.to_string().as_bytes())
        .unwrap()
        .store_keys
}

async fn round_trip_by_id_and_by_name_and_after_reopening(f: Fixture) {
    let keys = StoreKeys::generate();
    let store = f.open(&keys).await.unwrap();
    assert_eq!(store.write_count(), 0);
    let now = ts("2026-11-26T10:00:00.123456789Z");
    let inserted = store
        .insert(new_record("analytics", "warehouse", CANARY), now)
        .await
        .unwrap();
    assert_eq!(store.write_count(), 1);
    assert_eq!(inserted.version, 1);
    assert_eq!((inserted.created_at, inserted.updated_at), (now, now));

    let by_id = store.get(inserted.id).await.unwrap().unwrap();
    let by_name = store
        .find_by_name("analytics", "warehouse")
        .await
        .unwrap()
        .unwrap();
    for record in [&by_id, &by_name] {
        assert_eq!(record.summary(), inserted.summary());
        assert_eq!(record.credentials.expose(), inserted.credentials.expose());
    }
    assert_eq!(by_id.name, "warehouse-resource");
    assert_eq!(by_id.method.as_deref(), Some("username-and-password"));
    assert_eq!(by_id.project.as_deref(), Some("6f1c"));
    assert_eq!(by_id.settings["gatewayId"], Value::Null);
    assert_eq!(by_id.credentials.expose()["port"], json!(1433));
    assert_eq!(by_id.credentials.expose()["password"], json!(CANARY));
    assert_eq!(store.get(Uuid::new_v4()).await.unwrap().map(|r| r.id), None);
    assert!(
        store
            .find_by_name("analytics", "other")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .find_by_name("other", "warehouse")
            .await
            .unwrap()
            .is_none()
    );
    store.close().await;

    let store = f.open(&keys).await.unwrap();
    let reopened = store.get(inserted.id).await.unwrap().unwrap();
    assert_eq!(reopened.summary(), inserted.summary());
    assert_eq!(reopened.credentials.expose(), inserted.credentials.expose());
}

async fn version_moves_only_on_change_and_nothing_is_written_otherwise(f: Fixture) {
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = ts("2026-01-02T00:00:00Z");
    let r = store
        .insert(new_record("ns", "db", CANARY), t0)
        .await
        .unwrap();

    let writes = store.write_count();
    let same = store
        .update(r.id, new_record("ns", "db", CANARY), t1)
        .await
        .unwrap();
    assert_eq!(store.write_count(), writes);
    assert_eq!((same.version, same.updated_at), (1, t0));

    // Content other than credentials counts as a change.
    let mut edited = new_record("ns", "db", CANARY);
    edited.description = Some("edited".into());
    let v2 = store.update(r.id, edited, t1).await.unwrap();
    assert_eq!(store.write_count(), writes + 1);
    assert_eq!((v2.version, v2.updated_at, v2.created_at), (2, t1, t0));
    assert_eq!(v2.description.as_deref(), Some("edited"));

    let v3 = store
        .update(r.id, new_record("ns", "db", CANARY_2), t1)
        .await
        .unwrap();
    assert_eq!(v3.version, 3);
    assert_eq!(
        v3.credentials_hash,
        new_record("", "", CANARY_2).credentials_hash
    );
    let stored = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(stored.version, 3);
    assert_eq!(stored.credentials.expose()["password"], json!(CANARY_2));
    assert_eq!(stored.description.as_deref(), Some("Analytics warehouse"));

    let writes = store.write_count();
    let again = store
        .update(r.id, new_record("ns", "db", CANARY_2), t1)
        .await
        .unwrap();
    assert_eq!((again.version, store.write_count()), (3, writes));

    let missing = store
        .update(Uuid::new_v4(), new_record("ns", "db", CANARY), t1)
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    assert_eq!(store.write_count(), writes);
}

/// Two stores on one file stand for two processes: each queues its own writers, and the
/// version check makes the two take turns.
async fn concurrent_updates_all_land_in_order_of_versions(f: Fixture) {
    let keys = StoreKeys::generate();
    let first = Arc::new(f.open(&keys).await.unwrap());
    let second = Arc::new(f.open(&keys).await.unwrap());
    let now = ts("2026-01-01T00:00:00Z");
    let r = first
        .insert(new_record("ns", "db", "p0"), now)
        .await
        .unwrap();
    let tasks: Vec<_> = (1..=16)
        .map(|i| {
            let store = if i % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            tokio::spawn(async move {
                store
                    .update(r.id, new_record("ns", "db", &format!("p{i}")), now)
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().unwrap().version);
    }
    versions.sort();
    assert_eq!(versions, (2..=17).collect::<Vec<_>>());
    assert_eq!(second.get(r.id).await.unwrap().unwrap().version, 17);
    assert_eq!(first.write_count() + second.write_count(), 17);
}

async fn connection_names_are_unique_per_namespace(f: Fixture) {
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    let now = ts("2026-01-01T00:00:00Z");
    store
        .insert(new_record("a", "db", CANARY), now)
        .await
        .unwrap();
    let writes = store.write_count();
    let err = store
        .insert(new_record("a", "db", CANARY), now)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { namespace, connection_name }
            if namespace == "a" && connection_name == "db"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "a connection named \"db\" already exists in namespace \"a\""
    );
    assert_eq!(store.write_count(), writes);

    let other = store
        .insert(new_record("b", "db", CANARY), now)
        .await
        .unwrap();
    let renamed = store
        .insert(new_record("a", "db2", CANARY), now)
        .await
        .unwrap();
    let err = store
        .update(renamed.id, new_record("a", "db", CANARY), now)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }), "{err:?}");
    assert_eq!(
        store
            .get(renamed.id)
            .await
            .unwrap()
            .unwrap()
            .connection_name,
        "db2"
    );
    assert_eq!(
        store.find_by_name("b", "db").await.unwrap().unwrap().id,
        other.id
    );
}

async fn delete_removes_once_and_frees_the_name(f: Fixture) {
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    let now = ts("2026-01-01T00:00:00Z");
    let r = store
        .insert(new_record("ns", "db", CANARY), now)
        .await
        .unwrap();
    let keep = store
        .insert(new_record("ns", "keep", CANARY), now)
        .await
        .unwrap();
    assert!(store.delete(r.id).await.unwrap());
    let writes = store.write_count();
    assert!(!store.delete(r.id).await.unwrap());
    assert_eq!(
        store.write_count(),
        writes,
        "deleting nothing writes nothing"
    );
    assert!(store.get(r.id).await.unwrap().is_none());
    assert!(store.find_by_name("ns", "db").await.unwrap().is_none());
    assert!(store.get(keep.id).await.unwrap().is_some());
    let again = store
        .insert(new_record("ns", "db", CANARY), now)
        .await
        .unwrap();
    assert_ne!(again.id, r.id);
    assert_eq!(again.version, 1);
}

async fn list_is_ordered_filtered_and_has_no_credentials(f: Fixture) {
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    let now = ts("2026-01-01T00:00:00Z");
    for (ns, name) in [("b", "z"), ("a", "y"), ("b", "a"), ("a", "x")] {
        store
            .insert(new_record(ns, name, CANARY), now)
            .await
            .unwrap();
    }
    let all = store.list(None).await.unwrap();
    let names: Vec<_> = all
        .iter()
        .map(|s| (s.namespace.as_str(), s.connection_name.as_str()))
        .collect();
    assert_eq!(names, [("a", "x"), ("a", "y"), ("b", "a"), ("b", "z")]);
    let b: Vec<_> = store.list(Some("b")).await.unwrap();
    assert_eq!(
        b.iter()
            .map(|s| s.connection_name.as_str())
            .collect::<Vec<_>>(),
        ["a", "z"]
    );
    assert!(store.list(Some("none")).await.unwrap().is_empty());
    let shown = format!("{all:?}");
    assert!(shown.contains("hmac-sha256:"), "{shown}");
    assert!(!shown.contains(CANARY), "{shown}");
}

async fn state_documents_are_written_only_when_they_change(f: Fixture) {
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    assert_eq!(store.load_state("appconn/ns/a").await.unwrap(), None);
    let doc = json!({"status": {"id": "x", "version": 1}, "generation": 2});
    store.save_state("appconn/ns/a", &doc).await.unwrap();
    assert_eq!(store.write_count(), 1);
    store
        .save_state("appconn/ns/a", &doc.clone())
        .await
        .unwrap();
    assert_eq!(store.write_count(), 1, "an equal document is not written");
    let changed = json!({"status": {"id": "x", "version": 2}, "generation": 2});
    store.save_state("appconn/ns/a", &changed).await.unwrap();
    assert_eq!(store.write_count(), 2);
    assert_eq!(
        store.load_state("appconn/ns/a").await.unwrap(),
        Some(changed.clone())
    );

    store.save_state("appconn/ns/b", &json!(1)).await.unwrap();
    store.save_state("appconn/nt/a", &json!(2)).await.unwrap();
    store.save_state("appconm/zz", &json!(3)).await.unwrap();
    store.save_state("appconn/ns", &json!(4)).await.unwrap();
    let listed = store.list_state("appconn/ns/").await.unwrap();
    assert_eq!(
        listed,
        [
            ("appconn/ns/a".to_string(), changed),
            ("appconn/ns/b".to_string(), json!(1))
        ]
    );
    assert_eq!(store.list_state("appconn/").await.unwrap().len(), 4);

    let writes = store.write_count();
    store.delete_state("appconn/ns/a").await.unwrap();
    assert_eq!(store.write_count(), writes + 1);
    store.delete_state("appconn/ns/a").await.unwrap();
    assert_eq!(store.write_count(), writes + 1);
    assert_eq!(store.load_state("appconn/ns/a").await.unwrap(), None);
}

async fn wrong_key_fails_at_open_and_the_right_key_still_reads(f: Fixture) {
    let right = StoreKeys::generate();
    let store = f.open(&right).await.unwrap();
    let r = store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    store.close().await;

    let wrong = StoreKeys::generate();
    let err = f.open(&wrong).await.err().unwrap();
    assert!(matches!(err, StoreError::KeyMismatch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "the key file does not match this store ({}): key k1 cannot decrypt it",
            f.shown()
        )
    );
    // Also when the wrong keys have another active key: k1 is still checked.
    let mut wrong_rotated = wrong.clone();
    wrong_rotated.add_key();
    let err = f.open(&wrong_rotated).await.err().unwrap();
    assert!(matches!(err, StoreError::KeyMismatch { ref key_id, .. } if key_id == "k1"));

    let store = f.open(&right).await.unwrap();
    let back = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(back.credentials.expose()["password"], json!(CANARY));
    // The failed opens registered nothing: k2 of the wrong keys is unknown to the store.
    let mut right_rotated = right.clone();
    right_rotated.add_key();
    store.close().await;
    assert!(f.open(&right_rotated).await.is_ok());
}

async fn missing_key_is_named_at_open(f: Fixture) {
    let k1 = keys_with(&["k1"], "k1");
    let store = f.open(&k1).await.unwrap();
    let r = store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    store.close().await;

    let only_k2 = keys_with(&["k2"], "k2");
    let err = f.open(&only_k2).await.err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "store {} holds records encrypted with key k1, which the installation keys do not \
             contain: restore that key",
            f.shown()
        )
    );
    // Once no record needs k1 any more, it may go.
    let store = f.open(&k1).await.unwrap();
    assert!(store.delete(r.id).await.unwrap());
    store.close().await;
    assert!(f.open(&only_k2).await.is_ok());
}

async fn key_rotation_writes_with_the_new_key_and_reads_the_old(f: Fixture) {
    let mut keys = InstallationKeys::generate();
    let now = Timestamp::now();
    let store = f.open(&keys.store_keys).await.unwrap();
    let old = store
        .insert(new_record("ns", "old", CANARY), now)
        .await
        .unwrap();
    let touched = store
        .insert(new_record("ns", "touched", CANARY), now)
        .await
        .unwrap();
    store.close().await;

    assert_eq!(keys.add_store_key(), "k2");
    let store = f.open(&keys.store_keys).await.unwrap();
    let new = store
        .insert(new_record("ns", "new", CANARY_2), now)
        .await
        .unwrap();
    store
        .update(touched.id, new_record("ns", "touched", CANARY_2), now)
        .await
        .unwrap();
    for (id, password) in [(old.id, CANARY), (new.id, CANARY_2), (touched.id, CANARY_2)] {
        let r = store.get(id).await.unwrap().unwrap();
        assert_eq!(r.credentials.expose()["password"], json!(password));
    }
    store.close().await;
    assert_eq!(f.key_id_of(old.id).await, "k1");
    assert_eq!(f.key_id_of(new.id).await, "k2");
    assert_eq!(f.key_id_of(touched.id).await, "k2");

    // k1 cannot be dropped while a record uses it; after re-encryption it can.
    let k2_only = {
        let json = keys.to_json();
        let mut doc: Value = serde_json::from_slice(json.expose_secret()).unwrap();
        doc["storeKeys"].as_array_mut().unwrap().remove(0);
        InstallationKeys::from_json(doc.to_string().as_bytes())
            .unwrap()
            .store_keys
    };
    let err = f.open(&k2_only).await.err().unwrap();
    assert!(matches!(err, StoreError::UnknownKey { ref key_id, .. } if key_id == "k1"));

    let store = f.open(&keys.store_keys).await.unwrap();
    let version = store.get(old.id).await.unwrap().unwrap().version;
    assert_eq!(store.reencrypt().await.unwrap(), 1);
    assert_eq!(store.reencrypt().await.unwrap(), 0);
    assert_eq!(store.get(old.id).await.unwrap().unwrap().version, version);
    store.close().await;
    assert_eq!(f.key_id_of(old.id).await, "k2");

    let store = f.open(&k2_only).await.unwrap();
    let r = store.get(old.id).await.unwrap().unwrap();
    assert_eq!(r.credentials.expose()["password"], json!(CANARY));
}

#[tokio::test]
async fn garbage_files_are_refused() {
    let dir = Dir::new();
    let keys = StoreKeys::generate();
    let expected = format!(
        "{} is not an appconn store or is corrupt",
        dir.db().display()
    );

    let garbage: Vec<u8> = (0..16384u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.db(), &garbage).unwrap();
    let err = SqliteStore::open(dir.db(), &keys).await.err().unwrap();
    assert_eq!(err.to_string(), expected);
    assert_eq!(
        std::fs::read(dir.db()).unwrap(),
        garbage,
        "a refused file is left untouched"
    );

    std::fs::write(dir.db(), b"hello, not a database\n").unwrap();
    let err = SqliteStore::open(dir.db(), &keys).await.err().unwrap();
    assert_eq!(err.to_string(), expected);
}

#[tokio::test]
async fn damaged_store_is_reported_as_corrupt() {
    let dir = Dir::new();
    let keys = StoreKeys::generate();
    let store = SqliteStore::open(dir.db(), &keys).await.unwrap();
    store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    store.close().await;
    // Overwrite everything after the 100-byte file header: the schema page is gone.
    let mut bytes = std::fs::read(dir.db()).unwrap();
    bytes[100..].fill(0xA5);
    std::fs::write(dir.db(), &bytes).unwrap();
    let err = SqliteStore::open(dir.db(), &keys).await.err().unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

async fn newer_schema_is_refused(f: Fixture) {
    let keys = StoreKeys::generate();
    f.open(&keys).await.unwrap().close().await;
    f.exec("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        .await;
    let err = f.open(&keys).await.err().unwrap();
    assert!(
        err.to_string()
            .contains("written by a newer appconn (schema version 99"),
        "{err}"
    );
}

async fn migrations_upgrade_an_older_store_and_the_older_binary_refuses_it(f: Fixture) {
    let keys = StoreKeys::generate();
    let store = f.open(&keys).await.unwrap();
    let r = store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    store.close().await;

    // The next version adds a column, as a change of the record would.
    let first = &migrations::MIGRATIONS[0];
    let next = [
        Migration { ..*first },
        Migration {
            version: 2,
            sqlite: "ALTER TABLE connections ADD COLUMN owner_uid TEXT;",
            postgres: "ALTER TABLE connections ADD COLUMN owner_uid TEXT;",
        },
    ];
    let upgraded = SqlStore::open_with(&f.location, &keys, &next)
        .await
        .unwrap();
    let back = upgraded.get(r.id).await.unwrap().unwrap();
    assert_eq!(back.credentials.expose()["password"], json!(CANARY));
    upgraded.close().await;
    // Opening again applies nothing twice.
    SqlStore::open_with(&f.location, &keys, &next)
        .await
        .unwrap()
        .close()
        .await;
    f.exec("UPDATE connections SET owner_uid = 'u1'").await;

    let err = f.open(&keys).await.err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "store {} was written by a newer appconn (schema version 2, this version reads up to 1)",
            f.shown()
        )
    );
}

async fn tables_of_something_else_are_refused(f: Fixture) {
    f.exec("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        .await;
    let err = f.open(&StoreKeys::generate()).await.err().unwrap();
    assert_eq!(
        err.to_string(),
        format!("{} is not an appconn store or is corrupt", f.shown())
    );
}

async fn reencryption_runs_in_bounded_batches_and_keys_go_only_when_unused(f: Fixture) {
    let mut keys = InstallationKeys::generate();
    let now = Timestamp::now();
    let store = f.open(&keys.store_keys).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..25 {
        let r = store
            .insert(new_record("ns", &format!("c{i}"), CANARY), now)
            .await
            .unwrap();
        ids.push(r.id);
    }
    let usage = |pairs: &[(&str, u64)]| -> Vec<KeyUsage> {
        pairs
            .iter()
            .map(|(k, n)| KeyUsage {
                key_id: k.to_string(),
                records: *n,
            })
            .collect()
    };
    assert_eq!(store.key_usage().await.unwrap(), usage(&[("k1", 25)]));
    assert_eq!(
        store.reencrypt_batch(10).await.unwrap(),
        0,
        "nothing to move"
    );

    // The running store takes the rotated keys.
    keys.add_store_key();
    store.use_keys(&keys.store_keys).await.unwrap();
    assert_eq!(store.active_key(), "k2");
    assert_eq!(
        store.key_usage().await.unwrap(),
        usage(&[("k1", 25), ("k2", 0)])
    );
    let err = store.forget_key("k1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "key k1 cannot be removed: it still encrypts 25 record(s): wait until re-encryption \
         has moved them (appconn keys status)"
    );
    let err = store.forget_key("k2").await.unwrap_err();
    assert!(err.to_string().contains("it is the current key"), "{err}");

    let writes = store.write_count();
    assert_eq!(store.reencrypt_batch(10).await.unwrap(), 10);
    assert_eq!(store.write_count(), writes + 10);
    assert_eq!(
        store.key_usage().await.unwrap(),
        usage(&[("k1", 15), ("k2", 10)])
    );
    // Half-way, every record reads, whichever key seals it.
    for id in &ids {
        let r = store.get(*id).await.unwrap().unwrap();
        assert_eq!(r.credentials.expose()["password"], json!(CANARY));
        assert_eq!(r.version, 1, "re-encryption is no content change");
    }
    // A record updated meanwhile is sealed with k2 by the update itself.
    let mut on_k1 = None;
    for (i, id) in ids.iter().enumerate() {
        if f.key_id_of(*id).await == "k1" {
            on_k1 = Some((i, *id));
            break;
        }
    }
    let (i, id) = on_k1.unwrap();
    store
        .update(id, new_record("ns", &format!("c{i}"), CANARY_2), now)
        .await
        .unwrap();
    assert_eq!(f.key_id_of(id).await, "k2");
    assert_eq!(store.reencrypt_batch(10).await.unwrap(), 10);
    assert_eq!(store.reencrypt_batch(10).await.unwrap(), 4);
    assert_eq!(store.reencrypt_batch(10).await.unwrap(), 0);
    assert_eq!(
        store.key_usage().await.unwrap(),
        usage(&[("k1", 0), ("k2", 25)])
    );

    store.forget_key("k1").await.unwrap();
    assert_eq!(store.key_usage().await.unwrap(), usage(&[("k2", 25)]));
    store.close().await;
    // Without k1 in the key set the store opens and reads everything.
    let json = keys.to_json();
    let mut doc: Value = serde_json::from_slice(json.expose_secret()).unwrap();
    doc["storeKeys"].as_array_mut().unwrap().remove(0);
    let k2_only = InstallationKeys::from_json(doc.to_string().as_bytes())
        .unwrap()
        .store_keys;
    let store = f.open(&k2_only).await.unwrap();
    for id in &ids {
        assert!(store.get(*id).await.unwrap().is_some());
    }
}

async fn swapped_ciphertexts_do_not_decrypt(f: Fixture) {
    let keys = StoreKeys::generate();
    let store = f.open(&keys).await.unwrap();
    let a = store
        .insert(new_record("ns", "a", CANARY), Timestamp::now())
        .await
        .unwrap();
    store
        .insert(new_record("ns", "b", CANARY_2), Timestamp::now())
        .await
        .unwrap();
    store.close().await;
    f.exec(
        "UPDATE connections SET credentials = \
         (SELECT credentials FROM connections WHERE connection_name = 'b') \
         WHERE connection_name = 'a'",
    )
    .await;
    let store = f.open(&keys).await.unwrap();
    let err = store.get(a.id).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "record {} in store {} cannot be decrypted: it was altered or damaged",
            a.id,
            f.shown()
        )
    );
    assert!(store.find_by_name("ns", "b").await.unwrap().is_some());
}

#[tokio::test]
async fn unusable_paths_give_one_clear_line() {
    let dir = Dir::new();
    let keys = StoreKeys::generate();
    let file = dir.dir.path().join("regular-file");
    std::fs::write(&file, b"x").unwrap();

    let cases = [
        (file.join("appconn.db"), "not a directory"),
        (
            dir.dir.path().join("missing/appconn.db"),
            "no such file or directory",
        ),
        (dir.dir.path().to_path_buf(), "is a directory"),
    ];
    for (path, reason) in cases {
        let err = SqliteStore::open(&path, &keys).await.err().unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot open store {}: {reason}", path.display())
        );
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        let path = locked.join("appconn.db");
        // Privileged users (root in a container) ignore directory modes.
        if std::fs::write(locked.join("probe"), b"").is_err() {
            let err = SqliteStore::open(&path, &keys).await.err().unwrap();
            assert_eq!(
                err.to_string(),
                format!("cannot open store {}: permission denied", path.display())
            );
        } else {
            eprintln!("running privileged: the read-only directory case is not observable");
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[cfg(unix)]
#[tokio::test]
async fn store_file_is_created_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new();
    let store = SqliteStore::open(dir.db(), &StoreKeys::generate())
        .await
        .unwrap();
    store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    for entry in std::fs::read_dir(dir.dir.path()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}: {mode:o}", entry.path().display());
    }
}

fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .collect()
}

#[tokio::test]
async fn credential_values_never_reach_the_files() {
    let dir = Dir::new();
    let store = SqliteStore::open(dir.db(), &StoreKeys::generate())
        .await
        .unwrap();
    let now = Timestamp::now();
    let r = store
        .insert(new_record("ns", "db", CANARY), now)
        .await
        .unwrap();
    store
        .update(r.id, new_record("ns", "db", CANARY_2), now)
        .await
        .unwrap();
    store
        .insert(new_record("ns", "other", CANARY), now)
        .await
        .unwrap();

    // While open, most pages live in the -wal file.
    let wal = PathBuf::from(format!("{}-wal", dir.db().display()));
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    // The search itself works: non-secret fields are there in clear.
    assert!(files_containing(dir.dir.path(), "Analytics warehouse").contains(&wal));
    for needle in [CANARY, CANARY_2] {
        assert_eq!(
            files_containing(dir.dir.path(), needle),
            Vec::<PathBuf>::new(),
            "{needle}"
        );
    }

    let record = store.get(r.id).await.unwrap().unwrap();
    let shown = format!("{record:?} {:?}", store.list(None).await.unwrap());
    assert!(
        shown.contains("password") && !shown.contains("zebra"),
        "{shown}"
    );

    store.close().await;
    assert!(files_containing(dir.dir.path(), "Analytics warehouse").contains(&dir.db()));
    for needle in [CANARY, CANARY_2] {
        assert_eq!(
            files_containing(dir.dir.path(), needle),
            Vec::<PathBuf>::new(),
            "{needle}"
        );
    }
}

async fn errors_never_show_credentials(f: Fixture) {
    let keys = StoreKeys::generate();
    let store = f.open(&keys).await.unwrap();
    let r = store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    let taken = store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap_err();
    let other = store
        .insert(new_record("ns", "x", CANARY), Timestamp::now())
        .await
        .unwrap();
    let collide = store
        .update(other.id, new_record("ns", "db", CANARY), Timestamp::now())
        .await;
    store.close().await;
    let mismatch = f.open(&StoreKeys::generate()).await.err().unwrap();
    let shown = format!(
        "{taken} {taken:?} {collide:?} {mismatch} {mismatch:?} {:?}",
        r.credentials
    );
    assert!(
        shown.contains("NameTaken") && shown.contains("KeyMismatch"),
        "{shown}"
    );
    assert!(!shown.contains("zebra"), "{shown}");
}

async fn rotation_state_is_kept_by_the_engine(f: Fixture) {
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    let schedule = RotationSchedule {
        interval_days: 7,
        hours: 6,
        minutes: 30,
    };
    let with = |password: &str| NewRecord {
        rotation: Some(schedule),
        ..new_record("ns", "db", password)
    };
    let t0 = ts("2026-12-28T20:00:00Z");
    let r = store.insert(with(CANARY), t0).await.unwrap();
    assert_eq!(r.rotation, Some(schedule));
    assert_eq!(
        r.rotation_state.next_rotation_at,
        Some(ts("2027-01-04T06:30:00Z"))
    );
    assert_eq!(r.rotation_state.last_rotation_time, None);
    assert_eq!(
        r.rotation_state.hash_at_last_rotation.as_deref(),
        Some(r.credentials_hash.as_str())
    );

    let t1 = ts("2027-01-03T00:00:00Z");
    let rotated = store.update(r.id, with(CANARY_2), t1).await.unwrap();
    let stored = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(stored.rotation_state, rotated.rotation_state);
    assert_eq!(stored.rotation, Some(schedule));
    assert_eq!(stored.rotation_state.last_rotation_time, Some(t1));
    assert_eq!(
        stored.rotation_state.next_rotation_at,
        Some(ts("2027-01-10T06:30:00Z"))
    );
    assert_eq!(
        stored.rotation_state.hash_at_last_rotation.as_deref(),
        Some(stored.credentials_hash.as_str())
    );

    let off = store
        .update(r.id, new_record("ns", "db", CANARY_2), t1)
        .await
        .unwrap();
    assert_eq!(off.rotation, None);
    let stored = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.rotation, stored.rotation_state),
        (None, Default::default())
    );
}

/// 10,000 records: prints the figures, asserts only what was stored.
/// `cargo test --test store ten_thousand -- --nocapture` shows them for both engines.
async fn ten_thousand_records(f: Fixture) {
    const N: usize = 10_000;
    let store = f.open(&StoreKeys::generate()).await.unwrap();
    let now = Timestamp::now();

    let started = Instant::now();
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let r = store.insert(
            new_record(&format!("ns{}", i % 10), &format!("c{i}"), CANARY),
            now,
        );
        ids.push(r.await.unwrap().id);
    }
    let insert = started.elapsed();

    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let new = new_record(&format!("ns{}", i % 10), &format!("c{i}"), CANARY_2);
        assert_eq!(store.update(*id, new, now).await.unwrap().version, 2);
    }
    let update = started.elapsed();

    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let new = new_record(&format!("ns{}", i % 10), &format!("c{i}"), CANARY_2);
        assert_eq!(store.update(*id, new, now).await.unwrap().version, 2);
    }
    let noop = started.elapsed();
    assert_eq!(store.write_count(), 2 * N as u64);

    let started = Instant::now();
    for i in (0..N).step_by(7) {
        let found = store
            .find_by_name(&format!("ns{}", i % 10), &format!("c{i}"))
            .await
            .unwrap();
        assert_eq!(found.unwrap().id, ids[i]);
    }
    let finds = started.elapsed();

    let started = Instant::now();
    let all = store.list(None).await.unwrap();
    let list = started.elapsed();
    assert_eq!(all.len(), N);
    assert_eq!(store.list(Some("ns3")).await.unwrap().len(), N / 10);

    let rate = |d: std::time::Duration| N as f64 / d.as_secs_f64();
    println!(
        "{}: 10,000 records: insert {insert:.2?} ({:.0}/s), changed update {update:.2?} ({:.0}/s), \
         unchanged update {noop:.2?} ({:.0}/s), {} finds by name {finds:.2?}, list all {list:.2?}",
        f.engine(),
        rate(insert),
        rate(update),
        rate(noop),
        N.div_ceil(7),
    );
}

/// Failures to reach a PostgreSQL store are one line naming the store, never the password.
#[tokio::test]
async fn postgres_connection_failures_give_one_clear_line() {
    let Some(server) = pg::or_skip("postgres_connection_failures_give_one_clear_line") else {
        return;
    };
    let database = server.database();
    let keys = &StoreKeys::generate();
    let port = server.port();
    let open = |url: String| async move {
        let location = StoreLocation::parse(&url).unwrap();
        let shown = location.describe();
        let err = SqlStore::open_location(&location, keys)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot open store {shown}: ")),
            "{message}"
        );
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(!message.contains(server.password()), "{message}");
        assert!(!message.contains("zebra"), "{message}");
        message
    };
    let wrong = open(format!(
        "postgres://postgres:zebra-canary-7781@127.0.0.1:{port}/{}",
        database.name
    ))
    .await;
    assert!(
        wrong.ends_with("password authentication failed for user \"postgres\""),
        "{wrong}"
    );
    let missing = open(format!(
        "postgres://postgres:{}@127.0.0.1:{port}/nope",
        server.password()
    ))
    .await;
    assert!(
        missing.ends_with("database \"nope\" does not exist"),
        "{missing}"
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = free.local_addr().unwrap().port();
    drop(free);
    let refused = open(format!("postgres://postgres@127.0.0.1:{closed}/x")).await;
    assert!(refused.ends_with("connection refused"), "{refused}");
    // sslmode is honoured: this server has no TLS, and `require` will not do without.
    let tls = open(format!(
        "postgres://postgres:{}@127.0.0.1:{port}/{}?sslmode=require",
        server.password(),
        database.name
    ))
    .await;
    assert!(tls.contains("TLS"), "{tls}");
}

#[tokio::test]
async fn the_postgres_password_can_come_from_a_file() {
    let Some(server) = pg::or_skip("the_postgres_password_can_come_from_a_file") else {
        return;
    };
    let database = server.database();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{}\n", server.password())).unwrap();
    let location = StoreLocation::parse(&format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        server.port(),
        database.name
    ))
    .unwrap()
    .with_password_file(&file)
    .unwrap();
    let store = SqlStore::open_location(&location, &StoreKeys::generate())
        .await
        .unwrap();
    assert!(store.is_postgres());
    assert!(
        !store
            .path()
            .display()
            .to_string()
            .contains(server.password())
    );
    store
        .insert(new_record("ns", "db", CANARY), Timestamp::now())
        .await
        .unwrap();
    // What a backup of the database holds: ciphertext only.
    let dump = server.dump(&database);
    assert!(!dump.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()));
    assert!(dump.windows(19).any(|w| w == b"Analytics warehouse"));
}
