//! What differs between the engines: how to connect, placeholders, locking for migrations, the
//! schema's tables, and how errors read. Everything else is shared in `sql.rs`.

use std::borrow::Cow;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{AnyPool, AssertSqlSafe, Executor};
use sqlx::{ConnectOptions, Connection};
use url::Url;

use super::StoreError;
use crate::keys::describe_io;

const SQLITE_MAX_CONNECTIONS: u32 = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const POSTGRES_MAX_CONNECTIONS: u32 = 8;
/// How long a PostgreSQL connection may take before the store counts as unreachable.
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A statement written with `?` placeholders, as this dialect takes it.
    pub(crate) fn sql(self, text: &'static str) -> AssertSqlSafe<Cow<'static, str>> {
        match self {
            Dialect::Sqlite => AssertSqlSafe(Cow::Borrowed(text)),
            Dialect::Postgres => {
                let mut out = String::with_capacity(text.len() + 16);
                let mut n = 0;
                for c in text.chars() {
                    if c == '?' {
                        n += 1;
                        out.push('$');
                        out.push_str(&n.to_string());
                    } else {
                        out.push(c);
                    }
                }
                AssertSqlSafe(Cow::Owned(out))
            }
        }
    }

    /// The statement that opens a transaction no other migrator can enter.
    pub(crate) fn begin_exclusive(self) -> &'static str {
        match self {
            // Takes the write lock at once instead of at the first write.
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }

    /// Run first inside the exclusive transaction.
    pub(crate) fn lock_schema(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => None,
            // Held to the end of the transaction; the number only has to be ours.
            Dialect::Postgres => Some("SELECT CAST(pg_advisory_xact_lock(7301245901) AS TEXT)"),
        }
    }

    /// Names of the tables where the store's own would be.
    pub(crate) fn tables(self) -> &'static str {
        match self {
            Dialect::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            }
            Dialect::Postgres => {
                "SELECT CAST(tablename AS TEXT) FROM pg_tables WHERE schemaname = current_schema()"
            }
        }
    }

    /// Classifies an error while running. Messages come from the database or sqlx and hold no
    /// bound values.
    pub(crate) fn classify(self, path: &Path, e: sqlx::Error) -> StoreError {
        let path = path.to_path_buf();
        match &e {
            sqlx::Error::Database(db) => {
                let reason = db.message().to_string();
                match self {
                    Dialect::Sqlite => classify_sqlite(path, sqlite_code(&e), reason),
                    Dialect::Postgres => classify_postgres(path, db.code().as_deref(), reason),
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
            sqlx::Error::Tls(tls) => StoreError::Io {
                path,
                reason: format!("TLS: {tls}"),
            },
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => StoreError::Io {
                path,
                reason: "the connection to the database was lost".into(),
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

    /// Classifies an error while opening: anything about reaching the store is an open failure.
    pub(crate) fn open_error(self, path: &Path, e: sqlx::Error) -> StoreError {
        let open = |reason: String| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        match (&e, self) {
            (sqlx::Error::Io(io), _) => open(describe_io(io)),
            (sqlx::Error::Tls(tls), _) => open(format!("TLS: {tls}")),
            (sqlx::Error::Configuration(c), _) => open(c.to_string()),
            (sqlx::Error::PoolTimedOut, Dialect::Postgres) => {
                open("the database server did not answer in time".into())
            }
            (sqlx::Error::Database(db), Dialect::Sqlite)
                if matches!(
                    sqlite_code(&e),
                    Some(code::CANTOPEN | code::READONLY | code::PERM | code::IOERR)
                ) =>
            {
                open(db.message().to_string())
            }
            // Connection, authentication, missing database, role or permission.
            (sqlx::Error::Database(db), Dialect::Postgres)
                if db.code().is_some_and(|c| {
                    ["08", "28", "3D", "42501"].iter().any(|p| c.starts_with(p))
                }) =>
            {
                open(db.message().to_string())
            }
            _ => self.classify(path, e),
        }
    }
}

/// Opens a pool on the SQLite file at `path`, creating it (mode 0600) when absent.
pub(crate) async fn connect_sqlite(path: &Path) -> Result<AnyPool, StoreError> {
    // Creating the file ourselves gives an io::ErrorKind to report, where SQLite only says
    // "unable to open database file"; it also sets the mode that SQLite copies to -wal/-shm.
    let mut file = OpenOptions::new();
    file.read(true).write(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    file.open(path).map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        reason: describe_io(&e),
    })?;
    // The journal mode is kept in the file: one typed connection sets it, and reports a file
    // that is no database at once (a pool would retry a failing connection until it times out).
    let setup = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT);
    setup
        .connect()
        .await
        .map_err(|e| Dialect::Sqlite.open_error(path, e))?
        .close()
        .await
        .map_err(|e| Dialect::Sqlite.open_error(path, e))?;
    let url = format!("sqlite://{}?mode=rw", encode_path(path));
    let options: AnyConnectOptions = url
        .parse()
        .map_err(|e| Dialect::Sqlite.open_error(path, e))?;
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(SQLITE_MAX_CONNECTIONS)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // Settings of this connection only. A failure here would have the pool retry
                // until it times out; the same failure surfaces at the first statement instead.
                // 512 KiB of page cache per pooled connection: the store's working set is small
                // and SQLite's default (2 MiB each) is a large share of the operator's memory.
                let _ = conn
                    .execute(
                        "PRAGMA busy_timeout = 5000; PRAGMA synchronous = NORMAL; \
                         PRAGMA cache_size = -512;",
                    )
                    .await;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| Dialect::Sqlite.open_error(path, e))
}

/// Opens a pool on the PostgreSQL database of `url` (`sslmode` and the other libpq parameters
/// are honoured as the URL gives them). `shown` is the URL without its password.
pub(crate) async fn connect_postgres(url: &Url, shown: &Path) -> Result<AnyPool, StoreError> {
    let options =
        AnyConnectOptions::from_url(url).map_err(|e| Dialect::Postgres.open_error(shown, e))?;
    sqlx::any::install_default_drivers();
    // One connection first: a pool retries a refused connection until it times out, and would
    // report the timeout instead of the cause.
    tokio::time::timeout(
        POSTGRES_CONNECT_TIMEOUT,
        sqlx::AnyConnection::connect_with(&options),
    )
    .await
    .map_err(|_| Dialect::Postgres.open_error(shown, sqlx::Error::PoolTimedOut))?
    .map_err(|e| Dialect::Postgres.open_error(shown, e))?
    .close()
    .await
    .map_err(|e| Dialect::Postgres.open_error(shown, e))?;
    AnyPoolOptions::new()
        .max_connections(POSTGRES_MAX_CONNECTIONS)
        .acquire_timeout(POSTGRES_CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| Dialect::Postgres.open_error(shown, e))
}

/// Percent-encodes what a `sqlite://` URL would read as something else.
fn encode_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'-' | b'~' => {
                out.push(*b as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
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

fn sqlite_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code()?.parse::<i32>().ok().map(|c| c & 0xff),
        _ => None,
    }
}

fn classify_sqlite(path: PathBuf, code: Option<i32>, reason: String) -> StoreError {
    match code {
        Some(code::BUSY | code::LOCKED) => StoreError::Busy { path, reason },
        Some(code::CORRUPT | code::NOTADB) => StoreError::Corrupt { path },
        Some(code::READONLY | code::IOERR | code::FULL | code::CANTOPEN | code::PERM) => {
            StoreError::Io { path, reason }
        }
        _ => StoreError::Database { path, reason },
    }
}

/// By SQLSTATE class: what a retry can fix is busy or I/O, the rest is for a person.
fn classify_postgres(path: PathBuf, code: Option<&str>, reason: String) -> StoreError {
    let code = code.unwrap_or_default();
    match code {
        // Serialization failure, deadlock, lock not available, query cancelled.
        "40001" | "40P01" | "55P03" | "57014" => StoreError::Busy { path, reason },
        // Connection exceptions, insufficient resources, server shutting down, system errors.
        _ if ["08", "53", "57P", "58"]
            .iter()
            .any(|p| code.starts_with(p)) =>
        {
            StoreError::Io { path, reason }
        }
        _ => StoreError::Database { path, reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_dialect() {
        let text = "UPDATE t SET a = ?, b = ? WHERE id = ?";
        assert_eq!(Dialect::Sqlite.sql(text).0, text);
        assert_eq!(
            Dialect::Postgres.sql(text).0,
            "UPDATE t SET a = $1, b = $2 WHERE id = $3"
        );
    }

    #[test]
    fn postgres_errors_are_classified_by_sqlstate() {
        let p = || PathBuf::from("postgres://appconn@db/appconn");
        let r = || "x".to_string();
        assert!(matches!(
            classify_postgres(p(), Some("40001"), r()),
            StoreError::Busy { .. }
        ));
        assert!(matches!(
            classify_postgres(p(), Some("08006"), r()),
            StoreError::Io { .. }
        ));
        assert!(matches!(
            classify_postgres(p(), Some("57P01"), r()),
            StoreError::Io { .. }
        ));
        assert!(matches!(
            classify_postgres(p(), Some("53100"), r()),
            StoreError::Io { .. }
        ));
        assert!(classify_postgres(p(), Some("08006"), r()).is_transient());
        assert!(matches!(
            classify_postgres(p(), Some("42P01"), r()),
            StoreError::Database { .. }
        ));
        assert!(!classify_postgres(p(), None, r()).is_transient());
    }

    #[test]
    fn paths_survive_the_sqlite_url() {
        assert_eq!(
            encode_path(Path::new("/tmp/a b/x?y#z%.db")),
            "/tmp/a%20b/x%3Fy%23z%25.db"
        );
    }
}
