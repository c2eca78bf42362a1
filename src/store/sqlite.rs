//! The embedded engine: one SQLite file in WAL mode.
//!
//! Credentials are stored only as AES-256-GCM ciphertext, with the id of the sealing key beside
//! it. The `keys` table holds, per key id, a value sealed with that key: opening the store with
//! different key material fails at once instead of at the first read.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use jiff::Timestamp;
use secrecy::zeroize::Zeroizing;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::crypto::{OpenError, Vault, record_context};
use super::{NewRecord, Record, RecordSummary, RotationState, StoreEngine, StoreError};
use crate::crd::RotationSchedule;
use crate::keys::{StoreKeys, describe_io};
use crate::secret::Credentials;

const FORMAT: &str = "appconn-store";
const SCHEMA_VERSION: i64 = 1;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 4;
/// Optimistic update attempts before reporting the record as busy.
const UPDATE_ATTEMPTS: usize = 8;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('format', 'appconn-store'), ('schema_version', '1');
CREATE TABLE keys (id TEXT PRIMARY KEY, key_check BLOB NOT NULL);
CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    connection_name TEXT NOT NULL,
    app TEXT NOT NULL,
    method TEXT,
    project TEXT,
    description TEXT,
    settings TEXT NOT NULL,
    credentials_hash TEXT NOT NULL,
    version INTEGER NOT NULL,
    rotation_interval_days INTEGER,
    rotation_hours INTEGER,
    rotation_minutes INTEGER,
    last_rotation_time TEXT,
    next_rotation_at TEXT,
    hash_at_last_rotation TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    key_id TEXT NOT NULL,
    credentials BLOB NOT NULL,
    UNIQUE (namespace, connection_name)
);
CREATE INDEX connections_key_id ON connections (key_id);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

/// Columns of a summary, in the order [`summary_from_row`] reads them.
macro_rules! summary_columns {
    () => {
        "id, namespace, name, connection_name, app, method, project, description, settings, \
         credentials_hash, version, rotation_interval_days, rotation_hours, rotation_minutes, \
         last_rotation_time, next_rotation_at, hash_at_last_rotation, created_at, updated_at"
    };
}

/// Selects full records (summary columns, then `key_id` and `credentials`).
macro_rules! select_records {
    ($tail:literal) => {
        concat!(
            "SELECT ",
            summary_columns!(),
            ", key_id, credentials FROM connections ",
            $tail
        )
    };
}

/// The SQLite engine. Cheap to share behind an `Arc`; the pool inside is the concurrency limit.
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    vault: Vault,
    writes: AtomicU64,
    write_lock: tokio::sync::Mutex<()>,
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file (mode 0600) and its schema when absent, and
    /// checks that `keys` can decrypt what is in it.
    ///
    /// Several processes opening one new file at once (replicas starting together) contend for
    /// the schema and journal-mode setup, where SQLite's busy timeout does not apply: a busy
    /// open is retried for a few seconds.
    pub async fn open(path: impl AsRef<Path>, keys: &StoreKeys) -> Result<Self, StoreError> {
        let mut attempt = 0u32;
        loop {
            match Self::open_once(path.as_ref(), keys).await {
                Err(StoreError::Busy { .. }) if attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                result => return result,
            }
        }
    }

    async fn open_once(path: &Path, keys: &StoreKeys) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        // Creating the file ourselves gives an io::ErrorKind to report, where SQLite only says
        // "unable to open database file"; it also sets the mode that SQLite copies to -wal/-shm.
        let mut file = OpenOptions::new();
        file.read(true).write(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        file.open(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: describe_io(&e),
        })?;

        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            // 512 KiB of page cache per pooled connection: the store's working set is small
            // and SQLite's default (2 MiB each) is a large share of the operator's memory.
            .pragma("cache_size", "-512");
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(|e| open_error(&path, e))?;
        let store = Self {
            pool,
            path,
            vault: Vault::new(keys),
            writes: AtomicU64::new(0),
            write_lock: tokio::sync::Mutex::new(()),
        };
        let checked = async {
            store.init_schema().await?;
            store.check_keys().await
        };
        if let Err(e) = checked.await {
            store.pool.close().await;
            return Err(e);
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection; SQLite then folds the WAL back into the database file.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Re-encrypts every record sealed with an older key under the active one, so that old keys
    /// can be dropped from the installation keys. Returns how many records moved.
    pub async fn reencrypt(&self) -> Result<u64, StoreError> {
        let stale: Vec<String> = sqlx::query_scalar("SELECT id FROM connections WHERE key_id <> ?")
            .bind(self.vault.active_id())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        let mut moved = 0;
        for id in stale {
            let row = sqlx::query("SELECT key_id, credentials FROM connections WHERE id = ?")
                .bind(&id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
            let Some(row) = row else { continue };
            let uuid = Uuid::parse_str(&id).map_err(|_| self.corrupt())?;
            let key_id: String = row.try_get("key_id").map_err(|_| self.corrupt())?;
            let sealed: Vec<u8> = row.try_get("credentials").map_err(|_| self.corrupt())?;
            let context = record_context(uuid);
            let plaintext = self.open_sealed(uuid, &key_id, &sealed)?;
            let resealed = self.vault.seal(&plaintext, &context);
            // Compare-and-swap on the old ciphertext: a concurrent update already re-sealed it.
            let done = sqlx::query(
                "UPDATE connections SET key_id = ?, credentials = ? \
                 WHERE id = ? AND key_id = ? AND credentials = ?",
            )
            .bind(self.vault.active_id())
            .bind(resealed)
            .bind(&id)
            .bind(&key_id)
            .bind(&sealed)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
            if done.rows_affected() > 0 {
                self.count_write();
                moved += 1;
            }
        }
        Ok(moved)
    }

    async fn init_schema(&self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.error(e))?;
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        if tables.iter().any(|t| t == "meta") {
            let meta: BTreeMap<String, String> =
                sqlx::query_as::<_, (String, String)>("SELECT key, value FROM meta")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?
                    .into_iter()
                    .collect();
            if meta.get("format").map(String::as_str) != Some(FORMAT) {
                return Err(self.corrupt());
            }
            let version: i64 = meta
                .get("schema_version")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| self.corrupt())?;
            if version > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    path: self.path.clone(),
                    found: version,
                    supported: SCHEMA_VERSION,
                });
            }
        } else if tables.is_empty() {
            sqlx::raw_sql(SCHEMA)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        } else {
            return Err(self.corrupt());
        }
        tx.commit().await.map_err(|e| self.error(e))
    }

    /// Verifies every key the store knows against the installation keys, then registers the
    /// active key.
    async fn check_keys(&self) -> Result<(), StoreError> {
        let known: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, key_check FROM keys ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        for (key_id, check) in &known {
            match self.vault.verify_key_check(key_id, check) {
                Ok(()) => {}
                Err(OpenError::Failed) => return Err(self.key_mismatch(key_id)),
                Err(OpenError::UnknownKey) => {
                    // A dropped key is fine once no record needs it any more.
                    let used: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM connections WHERE key_id = ?)",
                    )
                    .bind(key_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                    if used {
                        return Err(StoreError::UnknownKey {
                            path: self.path.clone(),
                            key_id: key_id.clone(),
                        });
                    }
                }
            }
        }
        let active = self.vault.active_id();
        if !known.iter().any(|(id, _)| id == active) {
            sqlx::query("INSERT OR IGNORE INTO keys (id, key_check) VALUES (?, ?)")
                .bind(active)
                .bind(self.vault.active_key_check())
                .execute(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
            // Another process may have registered different material under the same id first.
            let check: Vec<u8> = sqlx::query_scalar("SELECT key_check FROM keys WHERE id = ?")
                .bind(active)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
            if self.vault.verify_key_check(active, &check).is_err() {
                return Err(self.key_mismatch(active));
            }
        }
        Ok(())
    }

    fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, e: sqlx::Error) -> StoreError {
        classify(&self.path, e)
    }

    fn corrupt(&self) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
        }
    }

    fn key_mismatch(&self, key_id: &str) -> StoreError {
        StoreError::KeyMismatch {
            path: self.path.clone(),
            key_id: key_id.to_string(),
        }
    }

    fn open_sealed(
        &self,
        id: Uuid,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.vault
            .open(key_id, sealed, &record_context(id))
            .map_err(|e| match e {
                OpenError::UnknownKey => StoreError::UnknownKey {
                    path: self.path.clone(),
                    key_id: key_id.to_string(),
                },
                OpenError::Failed => StoreError::Undecryptable {
                    path: self.path.clone(),
                    id,
                },
            })
    }

    fn record_from_row(&self, row: &SqliteRow) -> Result<Record, StoreError> {
        let summary = summary_from_row(row).map_err(|_| self.corrupt())?;
        let key_id: String = row.try_get("key_id").map_err(|_| self.corrupt())?;
        let sealed: Vec<u8> = row.try_get("credentials").map_err(|_| self.corrupt())?;
        let plaintext = self.open_sealed(summary.id, &key_id, &sealed)?;
        let fields: BTreeMap<String, Value> =
            serde_json::from_slice(&plaintext).map_err(|_| self.corrupt())?;
        Ok(summary.with_credentials(Credentials::new(fields)))
    }

    fn seal_credentials(&self, record: &Record) -> Vec<u8> {
        let plaintext = Zeroizing::new(
            serde_json::to_vec(record.credentials.expose())
                .expect("a map of JSON values always serialises"),
        );
        self.vault.seal(&plaintext, &record_context(record.id))
    }

    /// Binds every column but `id`, in [`summary_columns`] order, then `key_id` and `credentials`.
    fn bind_content<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
        r: &Record,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
        let state = &r.rotation_state;
        query
            .bind(r.namespace.clone())
            .bind(r.name.clone())
            .bind(r.connection_name.clone())
            .bind(r.app.clone())
            .bind(r.method.clone())
            .bind(r.project.clone())
            .bind(r.description.clone())
            .bind(serde_json::to_string(&r.settings).expect("JSON values always serialise"))
            .bind(r.credentials_hash.clone())
            .bind(r.version)
            .bind(r.rotation.map(|s| i64::from(s.interval_days)))
            .bind(r.rotation.map(|s| i64::from(s.hours)))
            .bind(r.rotation.map(|s| i64::from(s.minutes)))
            .bind(state.last_rotation_time.map(|t| t.to_string()))
            .bind(state.next_rotation_at.map(|t| t.to_string()))
            .bind(state.hash_at_last_rotation.clone())
            .bind(r.created_at.to_string())
            .bind(r.updated_at.to_string())
            .bind(self.vault.active_id().to_string())
            .bind(self.seal_credentials(r))
    }

    fn write_error(&self, e: sqlx::Error, r: &Record) -> StoreError {
        match &e {
            sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation => {
                StoreError::NameTaken {
                    namespace: r.namespace.clone(),
                    connection_name: r.connection_name.clone(),
                }
            }
            _ => self.error(e),
        }
    }
}

#[async_trait]
impl StoreEngine for SqliteStore {
    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(select_records!("WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        row.map(|row| self.record_from_row(&row)).transpose()
    }

    async fn find_by_name(
        &self,
        namespace: &str,
        connection_name: &str,
    ) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(select_records!(
            "WHERE namespace = ? AND connection_name = ?"
        ))
        .bind(namespace)
        .bind(connection_name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.map(|row| self.record_from_row(&row)).transpose()
    }

    async fn insert(&self, new: NewRecord, now: Timestamp) -> Result<Record, StoreError> {
        let record = Record::inserted(new, Uuid::new_v4(), now);
        let query = sqlx::query(concat!(
            "INSERT INTO connections (",
            "namespace, name, connection_name, app, method, project, description, settings, \
             credentials_hash, version, rotation_interval_days, rotation_hours, \
             rotation_minutes, last_rotation_time, next_rotation_at, hash_at_last_rotation, \
             created_at, updated_at, key_id, credentials, id",
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ));
        self.bind_content(query, &record)
            .bind(record.id.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.write_error(e, &record))?;
        self.count_write();
        Ok(record)
    }

    async fn update(&self, id: Uuid, new: NewRecord, now: Timestamp) -> Result<Record, StoreError> {
        let current = self.get(id).await?.ok_or(StoreError::NotFound)?;
        if current.same_content(&new) {
            return Ok(current);
        }
        // SQLite has one writer at a time anyway; queueing here spares this process's writers
        // from retrying against each other. The version check guards against other processes.
        let _writing = self.write_lock.lock().await;
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.get(id).await?.ok_or(StoreError::NotFound)?;
            let Some(next) = current.updated(new.clone(), now) else {
                return Ok(current);
            };
            // Optimistic: only applies if nobody wrote the record since it was read.
            let query = sqlx::query(
                "UPDATE connections SET namespace = ?, name = ?, connection_name = ?, app = ?, \
                 method = ?, project = ?, description = ?, settings = ?, credentials_hash = ?, \
                 version = ?, rotation_interval_days = ?, rotation_hours = ?, \
                 rotation_minutes = ?, last_rotation_time = ?, next_rotation_at = ?, \
                 hash_at_last_rotation = ?, created_at = ?, updated_at = ?, key_id = ?, \
                 credentials = ? WHERE id = ? AND version = ?",
            );
            let done = self
                .bind_content(query, &next)
                .bind(id.to_string())
                .bind(current.version)
                .execute(&self.pool)
                .await
                .map_err(|e| self.write_error(e, &next))?;
            if done.rows_affected() > 0 {
                self.count_write();
                return Ok(next);
            }
        }
        Err(StoreError::Busy {
            path: self.path.clone(),
            reason: format!("record {id} kept changing under updates from another process"),
        })
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM connections WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        let deleted = done.rows_affected() > 0;
        if deleted {
            self.count_write();
        }
        Ok(deleted)
    }

    async fn list(&self, namespace: Option<&str>) -> Result<Vec<RecordSummary>, StoreError> {
        let rows = match namespace {
            Some(ns) => {
                sqlx::query(concat!(
                    "SELECT ",
                    summary_columns!(),
                    " FROM connections WHERE namespace = ? ORDER BY connection_name"
                ))
                .bind(ns)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    summary_columns!(),
                    " FROM connections ORDER BY namespace, connection_name"
                ))
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| summary_from_row(row).map_err(|_| self.corrupt()))
            .collect()
    }

    async fn load_state(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let text: Option<String> = sqlx::query_scalar("SELECT value FROM state WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        text.map(|t| serde_json::from_str(&t).map_err(|_| self.corrupt()))
            .transpose()
    }

    async fn save_state(&self, key: &str, value: &Value) -> Result<(), StoreError> {
        if self.load_state(key).await?.as_ref() == Some(value) {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO state (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value.to_string())
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        self.count_write();
        Ok(())
    }

    async fn delete_state(&self, key: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM state WHERE key = ?")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        if done.rows_affected() > 0 {
            self.count_write();
        }
        Ok(())
    }

    async fn list_state(&self, prefix: &str) -> Result<Vec<(String, Value)>, StoreError> {
        // A range scan from the prefix, stopped at the first key past it.
        let mut rows = sqlx::query_as::<_, (String, String)>(
            "SELECT key, value FROM state WHERE key >= ? ORDER BY key",
        )
        .bind(prefix)
        .fetch(&self.pool);
        let mut found = Vec::new();
        while let Some((key, value)) = rows.try_next().await.map_err(|e| self.error(e))? {
            if !key.starts_with(prefix) {
                break;
            }
            let value = serde_json::from_str(&value).map_err(|_| self.corrupt())?;
            found.push((key, value));
        }
        Ok(found)
    }

    fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

/// Any column that does not decode means the file was not written by this code.
struct BadRow;

fn summary_from_row(row: &SqliteRow) -> Result<RecordSummary, BadRow> {
    fn get<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
        row: &'r SqliteRow,
        column: &str,
    ) -> Result<T, BadRow> {
        row.try_get(column).map_err(|_| BadRow)
    }
    fn time(text: Option<String>) -> Result<Option<Timestamp>, BadRow> {
        text.map(|t| t.parse().map_err(|_| BadRow)).transpose()
    }
    let rotation = match (
        get::<Option<i64>>(row, "rotation_interval_days")?,
        get::<Option<i64>>(row, "rotation_hours")?,
        get::<Option<i64>>(row, "rotation_minutes")?,
    ) {
        (Some(days), Some(hours), Some(minutes)) => Some(RotationSchedule {
            interval_days: days.try_into().map_err(|_| BadRow)?,
            hours: hours.try_into().map_err(|_| BadRow)?,
            minutes: minutes.try_into().map_err(|_| BadRow)?,
        }),
        (None, None, None) => None,
        _ => return Err(BadRow),
    };
    let settings: String = get(row, "settings")?;
    Ok(RecordSummary {
        id: Uuid::parse_str(&get::<String>(row, "id")?).map_err(|_| BadRow)?,
        namespace: get(row, "namespace")?,
        name: get(row, "name")?,
        connection_name: get(row, "connection_name")?,
        app: get(row, "app")?,
        method: get(row, "method")?,
        project: get(row, "project")?,
        description: get(row, "description")?,
        settings: serde_json::from_str(&settings).map_err(|_| BadRow)?,
        credentials_hash: get(row, "credentials_hash")?,
        version: get(row, "version")?,
        rotation,
        rotation_state: RotationState {
            last_rotation_time: time(get(row, "last_rotation_time")?)?,
            next_rotation_at: time(get(row, "next_rotation_at")?)?,
            hash_at_last_rotation: get(row, "hash_at_last_rotation")?,
        },
        created_at: time(Some(get(row, "created_at")?))?.ok_or(BadRow)?,
        updated_at: time(Some(get(row, "updated_at")?))?.ok_or(BadRow)?,
    })
}

/// Primary SQLite result codes (the low byte of an extended code).
mod code {
    pub const PERM: i32 = 3;
    pub const BUSY: i32 = 5;
    pub const LOCKED: i32 = 6;
    pub const READONLY: i32 = 8;
    pub const IOERR: i32 = 10;
    pub const CORRUPT: i32 = 11;
    pub const FULL: i32 = 13;
    pub const CANTOPEN: i32 = 14;
    pub const NOTADB: i32 = 26;
}

fn primary_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code()?.parse::<i32>().ok().map(|c| c & 0xff),
        _ => None,
    }
}

/// Classifies an error while opening: anything about reaching the file is an open failure.
fn open_error(path: &Path, e: sqlx::Error) -> StoreError {
    match (&e, primary_code(&e)) {
        (sqlx::Error::Io(io), _) => StoreError::Open {
            path: path.to_path_buf(),
            reason: describe_io(io),
        },
        (
            sqlx::Error::Database(db),
            Some(code::CANTOPEN | code::READONLY | code::PERM | code::IOERR),
        ) => StoreError::Open {
            path: path.to_path_buf(),
            reason: db.message().to_string(),
        },
        _ => classify(path, e),
    }
}

/// Classifies a SQLite error. Messages come from SQLite or sqlx and hold no bound values.
fn classify(path: &Path, e: sqlx::Error) -> StoreError {
    let path = path.to_path_buf();
    match &e {
        sqlx::Error::Database(db) => {
            let reason = db.message().to_string();
            match primary_code(&e) {
                Some(code::BUSY | code::LOCKED) => StoreError::Busy { path, reason },
                Some(code::CORRUPT | code::NOTADB) => StoreError::Corrupt { path },
                Some(code::READONLY | code::IOERR | code::FULL | code::CANTOPEN | code::PERM) => {
                    StoreError::Io { path, reason }
                }
                _ => StoreError::Database { path, reason },
            }
        }
        sqlx::Error::PoolTimedOut => StoreError::Busy {
            path,
            reason: "timed out waiting for a free connection".into(),
        },
        sqlx::Error::Io(io) => StoreError::Io {
            path,
            reason: describe_io(io),
        },
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::RowNotFound => StoreError::Corrupt { path },
        other => StoreError::Database {
            path,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn raw_pool(path: &Path, read_only: bool) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .read_only(read_only)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::ZERO);
        SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn real_sqlite_errors_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.db");
        let pool = raw_pool(&path, false).await;
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&pool)
            .await
            .unwrap();

        // Another writer holds the lock and this one does not wait.
        let mut holder = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *holder)
            .await
            .unwrap();
        let other = raw_pool(&path, false).await;
        let busy = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&other)
            .await
            .unwrap_err();
        let busy = classify(&path, busy);
        assert!(matches!(busy, StoreError::Busy { .. }), "{busy:?}");
        assert!(busy.is_transient());
        assert!(
            busy.to_string().contains("is busy: database is locked"),
            "{busy}"
        );
        holder.commit().await.unwrap();

        let read_only = raw_pool(&path, true).await;
        let err = sqlx::query("INSERT INTO t VALUES (3)")
            .execute(&read_only)
            .await
            .unwrap_err();
        let err = classify(&path, err);
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert!(err.is_transient());

        let err = sqlx::query("SELECT nope FROM t")
            .execute(&pool)
            .await
            .unwrap_err();
        let err = classify(&path, err);
        assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
        assert!(!err.is_transient());

        let err = classify(&path, sqlx::Error::PoolTimedOut);
        assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let err = open_error(&path, sqlx::Error::Io(io));
        assert_eq!(
            err.to_string(),
            format!("cannot open store {}: permission denied", path.display())
        );
    }
}
