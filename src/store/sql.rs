//! The store engine, shared by SQLite and PostgreSQL through sqlx's `Any` driver: one set of
//! statements, one row mapping, one encryption path. [`Dialect`] holds what differs.
//!
//! Credentials are stored only as AES-256-GCM ciphertext, with the id of the sealing key beside
//! it. The `keys` table holds, per key id, a value sealed with that key: opening the store with
//! different key material fails at once instead of at the first read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use jiff::Timestamp;
use secrecy::zeroize::Zeroizing;
use serde_json::Value;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, AnyPool, Row};
use uuid::Uuid;

use super::crypto::{OpenError, Vault, record_context};
use super::dialect::{Dialect, connect_postgres, connect_sqlite};
use super::migrations::{self, MIGRATIONS, Migration};
use super::{
    NewRecord, Record, RecordSummary, RotationState, StoreEngine, StoreError, StoreLocation,
};
use crate::crd::RotationSchedule;
use crate::keys::{StoreKeys, describe_io};
use crate::secret::Credentials;

const FORMAT: &str = "appconn-store";

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

type Query<'q> = sqlx::query::Query<'q, Any, AnyArguments>;

/// How many records one store key encrypts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    pub records: u64,
}

/// The store on either engine. Cheap to share behind an `Arc`; the pool inside is the
/// concurrency limit.
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    /// The file, or the URL without its password: what errors name.
    path: PathBuf,
    /// Swapped whole when the installation keys change under a running store.
    vault: RwLock<Arc<Vault>>,
    writes: AtomicU64,
    write_lock: tokio::sync::Mutex<()>,
}

impl SqlStore {
    /// Opens the SQLite store at `path`, creating the file (mode 0600) and its schema when
    /// absent, and checks that `keys` can decrypt what is in it.
    pub async fn open(path: impl AsRef<Path>, keys: &StoreKeys) -> Result<Self, StoreError> {
        let location = StoreLocation::Sqlite(path.as_ref().to_path_buf());
        Self::open_with(&location, keys, MIGRATIONS).await
    }

    /// Opens the store at `location`, on the engine it names, migrating its schema to this
    /// version's.
    pub async fn open_location(
        location: &StoreLocation,
        keys: &StoreKeys,
    ) -> Result<Self, StoreError> {
        Self::open_with(location, keys, MIGRATIONS).await
    }

    /// [`Self::open_location`] with a given list of migrations (tests show upgrades with it).
    ///
    /// Several processes opening one new SQLite file at once (replicas starting together)
    /// contend for the schema and journal-mode setup, where SQLite's busy timeout does not
    /// apply: a busy open is retried for a few seconds.
    pub async fn open_with(
        location: &StoreLocation,
        keys: &StoreKeys,
        migrations: &[Migration],
    ) -> Result<Self, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => {
                let mut attempt = 0u32;
                loop {
                    let opened = async {
                        let pool = connect_sqlite(path).await?;
                        Self::start(pool, Dialect::Sqlite, path.clone(), keys, migrations).await
                    };
                    match opened.await {
                        Err(StoreError::Busy { .. }) if attempt < 50 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        result => return result,
                    }
                }
            }
            StoreLocation::Postgres(url) => {
                let shown = PathBuf::from(location.describe());
                let pool = connect_postgres(url, &shown).await?;
                Self::start(pool, Dialect::Postgres, shown, keys, migrations).await
            }
        }
    }

    async fn start(
        pool: AnyPool,
        dialect: Dialect,
        path: PathBuf,
        keys: &StoreKeys,
        migrations: &[Migration],
    ) -> Result<Self, StoreError> {
        let store = Self {
            pool,
            dialect,
            path,
            vault: RwLock::new(Arc::new(Vault::new(keys))),
            writes: AtomicU64::new(0),
            write_lock: tokio::sync::Mutex::new(()),
        };
        let checked = async {
            store.migrate(migrations).await?;
            store.use_keys(keys).await
        };
        if let Err(e) = checked.await {
            store.pool.close().await;
            return Err(e);
        }
        Ok(store)
    }

    /// The file, or the URL without its password.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_postgres(&self) -> bool {
        self.dialect == Dialect::Postgres
    }

    /// Closes every connection; SQLite then folds the WAL back into the database file.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn vault(&self) -> Arc<Vault> {
        self.vault.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The id of the key new writes use.
    pub fn active_key(&self) -> String {
        self.vault().active_id().to_string()
    }

    /// Verifies every key the store knows against `keys`, registers their active key, and from
    /// then on seals with it. This is how a running store takes a rotated key set.
    pub async fn use_keys(&self, keys: &StoreKeys) -> Result<(), StoreError> {
        let vault = Vault::new(keys);
        let known: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, key_check FROM keys ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        for (key_id, check) in &known {
            match vault.verify_key_check(key_id, check) {
                Ok(()) => {}
                Err(OpenError::Failed) => return Err(self.key_mismatch(key_id)),
                // A dropped key is fine once no record needs it any more.
                Err(OpenError::UnknownKey) if self.records_sealed_with(key_id).await? > 0 => {
                    return Err(StoreError::UnknownKey {
                        path: self.path.clone(),
                        key_id: key_id.clone(),
                    });
                }
                Err(OpenError::UnknownKey) => {}
            }
        }
        let active = vault.active_id();
        if !known.iter().any(|(id, _)| id == active) {
            sqlx::query(
                self.sql(
                    "INSERT INTO keys (id, key_check) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                ),
            )
            .bind(active.to_string())
            .bind(vault.active_key_check())
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
            // Another process may have registered different material under the same id first.
            let check: Vec<u8> =
                sqlx::query_scalar(self.sql("SELECT key_check FROM keys WHERE id = ?"))
                    .bind(active.to_string())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
            if vault.verify_key_check(active, &check).is_err() {
                return Err(self.key_mismatch(active));
            }
        }
        *self.vault.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(vault);
        Ok(())
    }

    /// Every key the store has registered, oldest id first, with the records each encrypts.
    pub async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT k.id, COUNT(c.id) FROM keys k LEFT JOIN connections c ON c.key_id = k.id \
             GROUP BY k.id ORDER BY k.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(key_id, n)| KeyUsage {
                key_id,
                records: n.max(0) as u64,
            })
            .collect())
    }

    async fn records_sealed_with(&self, key_id: &str) -> Result<u64, StoreError> {
        let n: i64 =
            sqlx::query_scalar(self.sql("SELECT COUNT(*) FROM connections WHERE key_id = ?"))
                .bind(key_id.to_string())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        Ok(n.max(0) as u64)
    }

    /// Forgets a key that encrypts no record and is not the active one, so it can leave the
    /// installation keys.
    pub async fn forget_key(&self, key_id: &str) -> Result<(), StoreError> {
        let in_use = |reason: String| StoreError::KeyInUse {
            key_id: key_id.to_string(),
            reason,
        };
        if self.vault().active_id() == key_id {
            return Err(in_use(
                "it is the current key: rotate to a new key first (appconn keys rotate)".into(),
            ));
        }
        // Under the schema lock, so no record can be sealed with it between check and delete:
        // only the active key seals, and it is not this one.
        let mut tx = self.begin_exclusive().await?;
        let n: i64 =
            sqlx::query_scalar(self.sql("SELECT COUNT(*) FROM connections WHERE key_id = ?"))
                .bind(key_id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        if n > 0 {
            return Err(in_use(format!(
                "it still encrypts {n} record(s): wait until re-encryption has moved them \
                 (appconn keys status)"
            )));
        }
        let done = sqlx::query(self.sql("DELETE FROM keys WHERE id = ?"))
            .bind(key_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        if done.rows_affected() > 0 {
            self.count_write();
        }
        Ok(())
    }

    /// Re-encrypts up to `limit` records sealed with an older key under the active one; returns
    /// how many moved. Each record moves in its own statement, so a crash leaves every record
    /// sealed with one key or the other, both still known.
    pub async fn reencrypt_batch(&self, limit: usize) -> Result<u64, StoreError> {
        let vault = self.vault();
        let active = vault.active_id().to_string();
        let stale: Vec<(String, String, Vec<u8>)> = sqlx::query_as(self.sql(
            "SELECT id, key_id, credentials FROM connections WHERE key_id <> ? ORDER BY id LIMIT ?",
        ))
        .bind(active.clone())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let mut moved = 0;
        for (id, key_id, sealed) in stale {
            let uuid = Uuid::parse_str(&id).map_err(|_| self.corrupt())?;
            let plaintext = self.open_sealed(&vault, uuid, &key_id, &sealed)?;
            let resealed = vault.seal(&plaintext, &record_context(uuid));
            // Compare-and-swap on the old ciphertext: a concurrent update already re-sealed it.
            let done = sqlx::query(self.sql(
                "UPDATE connections SET key_id = ?, credentials = ? \
                 WHERE id = ? AND key_id = ? AND credentials = ?",
            ))
            .bind(active.clone())
            .bind(resealed)
            .bind(id)
            .bind(key_id)
            .bind(sealed)
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

    /// Re-encrypts every record sealed with an older key. Returns how many records moved.
    pub async fn reencrypt(&self) -> Result<u64, StoreError> {
        let mut moved = 0;
        loop {
            let n = self.reencrypt_batch(500).await?;
            if n == 0 {
                return Ok(moved);
            }
            moved += n;
        }
    }

    /// A consistent copy of a SQLite store at `dest` (mode 0600), taken while others keep
    /// writing: `VACUUM INTO` reads one snapshot. `dest` must not exist.
    pub async fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        if self.dialect != Dialect::Sqlite {
            return Err(StoreError::Unsupported(
                "a PostgreSQL store is backed up with pg_dump (see the README)".into(),
            ));
        }
        let failed = |reason: String| StoreError::Open {
            path: dest.to_path_buf(),
            reason,
        };
        if std::fs::symlink_metadata(dest).is_ok() {
            return Err(failed("it exists already: name a new file".into()));
        }
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(".appconn-backup-{}.tmp", Uuid::new_v4().simple()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&tmp).map_err(|e| failed(describe_io(&e)))?;
        let copied = async {
            sqlx::query("VACUUM INTO ?")
                .bind(tmp.to_string_lossy().into_owned())
                .execute(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| failed(describe_io(&e)))?;
            // A hard link refuses a `dest` created meanwhile, where a rename would replace it.
            std::fs::hard_link(&tmp, dest).map_err(|e| failed(describe_io(&e)))
        };
        let result = copied.await;
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Applies the migrations this store lacks, under a lock no other migrator passes.
    async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        let supported = migrations::latest(migrations);
        let mut tx = self.begin_exclusive().await?;
        let tables: Vec<String> = sqlx::query_scalar(self.dialect.tables())
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        let found = if tables.iter().any(|t| t == "meta") {
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
            meta.get("schema_version")
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| self.corrupt())?
        } else if tables.is_empty() {
            0
        } else {
            return Err(self.corrupt());
        };
        if found > supported {
            return Err(StoreError::NewerSchema {
                path: self.path.clone(),
                found,
                supported,
            });
        }
        if found == supported {
            return Ok(());
        }
        for m in migrations.iter().filter(|m| m.version > found) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql(self.dialect)))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        for (key, value) in [
            ("format", FORMAT.to_string()),
            ("schema_version", supported.to_string()),
        ] {
            sqlx::query(self.sql(
                "INSERT INTO meta (key, value) VALUES (?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ))
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        tracing::info!(store = %self.path.display(), from = found, to = supported, "store schema migrated");
        Ok(())
    }

    async fn begin_exclusive(&self) -> Result<sqlx::Transaction<'static, Any>, StoreError> {
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_exclusive())
            .await
            .map_err(|e| self.error(e))?;
        if let Some(lock) = self.dialect.lock_schema() {
            sqlx::query(lock)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        Ok(tx)
    }

    fn sql(&self, text: &'static str) -> sqlx::AssertSqlSafe<std::borrow::Cow<'static, str>> {
        self.dialect.sql(text)
    }

    fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, e: sqlx::Error) -> StoreError {
        self.dialect.classify(&self.path, e)
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
        vault: &Vault,
        id: Uuid,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        vault
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

    fn record_from_row(&self, row: &AnyRow) -> Result<Record, StoreError> {
        let summary = summary_from_row(row).map_err(|_| self.corrupt())?;
        let key_id: String = row.try_get("key_id").map_err(|_| self.corrupt())?;
        let sealed: Vec<u8> = row.try_get("credentials").map_err(|_| self.corrupt())?;
        let plaintext = self.open_sealed(&self.vault(), summary.id, &key_id, &sealed)?;
        let fields: BTreeMap<String, Value> =
            serde_json::from_slice(&plaintext).map_err(|_| self.corrupt())?;
        Ok(summary.with_credentials(Credentials::new(fields)))
    }

    /// Binds every column but `id`, in [`summary_columns`] order, then `key_id` and `credentials`.
    fn bind_content<'q>(&self, query: Query<'q>, r: &Record) -> Query<'q> {
        let state = &r.rotation_state;
        let vault = self.vault();
        let plaintext = Zeroizing::new(
            serde_json::to_vec(r.credentials.expose())
                .expect("a map of JSON values always serialises"),
        );
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
            .bind(vault.active_id().to_string())
            .bind(vault.seal(&plaintext, &record_context(r.id)))
    }

    /// Writes `next` over the record if it is still at `version`; `false` when it was not.
    async fn write_update<'c, E>(
        &self,
        executor: E,
        next: &Record,
        version: i64,
    ) -> Result<bool, StoreError>
    where
        E: sqlx::Executor<'c, Database = Any>,
    {
        let query = sqlx::query(self.sql(
            "UPDATE connections SET namespace = ?, name = ?, connection_name = ?, app = ?, \
             method = ?, project = ?, description = ?, settings = ?, credentials_hash = ?, \
             version = ?, rotation_interval_days = ?, rotation_hours = ?, \
             rotation_minutes = ?, last_rotation_time = ?, next_rotation_at = ?, \
             hash_at_last_rotation = ?, created_at = ?, updated_at = ?, key_id = ?, \
             credentials = ? WHERE id = ? AND version = ?",
        ));
        let done = self
            .bind_content(query, next)
            .bind(next.id.to_string())
            .bind(version)
            .execute(executor)
            .await
            .map_err(|e| self.write_error(e, next))?;
        Ok(done.rows_affected() > 0)
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
impl StoreEngine for SqlStore {
    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(self.sql(select_records!("WHERE id = ?")))
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
        let row = sqlx::query(self.sql(select_records!(
            "WHERE namespace = ? AND connection_name = ?"
        )))
        .bind(namespace.to_string())
        .bind(connection_name.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.map(|row| self.record_from_row(&row)).transpose()
    }

    async fn insert(&self, new: NewRecord, now: Timestamp) -> Result<Record, StoreError> {
        let record = Record::inserted(new, Uuid::new_v4(), now);
        let query = sqlx::query(self.sql(concat!(
            "INSERT INTO connections (",
            "namespace, name, connection_name, app, method, project, description, settings, \
             credentials_hash, version, rotation_interval_days, rotation_hours, \
             rotation_minutes, last_rotation_time, next_rotation_at, hash_at_last_rotation, \
             created_at, updated_at, key_id, credentials, id",
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )));
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
        // SQLite takes one writer at a time: queueing this process's writers here spares them
        // retrying against each other.
        let writing = match self.dialect {
            Dialect::Sqlite => Some(self.write_lock.lock().await),
            Dialect::Postgres => None,
        };
        // A writer of this process queued ahead may have changed the record meanwhile.
        let current = if writing.is_some() {
            self.get(id).await?.ok_or(StoreError::NotFound)?
        } else {
            current
        };
        // First the short way: one statement that writes only if the record is still at the
        // version read, so that the database is locked only while it writes.
        let Some(next) = current.updated(new.clone(), now) else {
            return Ok(current);
        };
        if self
            .write_update(&self.pool, &next, current.version)
            .await?
        {
            self.count_write();
            return Ok(next);
        }
        // Another process or replica wrote in between. Now the record stays locked from the
        // read to the write (SQLite's write lock from BEGIN IMMEDIATE, PostgreSQL's row lock
        // from FOR UPDATE), so nothing can slip in again and there is nothing more to retry.
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_exclusive())
            .await
            .map_err(|e| self.error(e))?;
        let select = match self.dialect {
            Dialect::Sqlite => self.sql(select_records!("WHERE id = ?")),
            Dialect::Postgres => self.sql(select_records!("WHERE id = ? FOR UPDATE")),
        };
        let row = sqlx::query(select)
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        let current = row
            .map(|row| self.record_from_row(&row))
            .transpose()?
            .ok_or(StoreError::NotFound)?;
        let Some(next) = current.updated(new, now) else {
            return Ok(current);
        };
        if !self.write_update(&mut *tx, &next, current.version).await? {
            // Only a writer that ignores the lock (not this code) can get here.
            return Err(StoreError::Busy {
                path: self.path.clone(),
                reason: format!("record {id} changed while it was locked for an update"),
            });
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        self.count_write();
        Ok(next)
    }

    async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql("DELETE FROM connections WHERE id = ?"))
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
                sqlx::query(self.sql(concat!(
                    "SELECT ",
                    summary_columns!(),
                    " FROM connections WHERE namespace = ? ORDER BY connection_name"
                )))
                .bind(ns.to_string())
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
        let text: Option<String> =
            sqlx::query_scalar(self.sql("SELECT value FROM state WHERE key = ?"))
                .bind(key.to_string())
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
        sqlx::query(self.sql(
            "INSERT INTO state (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        ))
        .bind(key.to_string())
        .bind(value.to_string())
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        self.count_write();
        Ok(())
    }

    async fn delete_state(&self, key: &str) -> Result<(), StoreError> {
        let done = sqlx::query(self.sql("DELETE FROM state WHERE key = ?"))
            .bind(key.to_string())
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
            self.sql("SELECT key, value FROM state WHERE key >= ? ORDER BY key"),
        )
        .bind(prefix.to_string())
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

/// Any column that does not decode means the store was not written by this code.
struct BadRow;

fn summary_from_row(row: &AnyRow) -> Result<RecordSummary, BadRow> {
    fn get<'r, T: sqlx::Decode<'r, Any> + sqlx::Type<Any>>(
        row: &'r AnyRow,
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

#[cfg(test)]
mod tests {
    use sqlx::SqlitePool;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

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
        let classify = |e| Dialect::Sqlite.classify(&path, e);

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
        let busy = classify(busy);
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
        let err = classify(err);
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert!(err.is_transient());

        let err = sqlx::query("SELECT nope FROM t")
            .execute(&pool)
            .await
            .unwrap_err();
        let err = classify(err);
        assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
        assert!(!err.is_transient());

        let err = classify(sqlx::Error::PoolTimedOut);
        assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let err = Dialect::Sqlite.open_error(&path, sqlx::Error::Io(io));
        assert_eq!(
            err.to_string(),
            format!("cannot open store {}: permission denied", path.display())
        );
    }
}
