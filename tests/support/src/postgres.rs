//! A real PostgreSQL server for tests: Debian's `postgresql` package, started with `initdb` and
//! `pg_ctl` in a temporary directory, listening on a free loopback port (and a unix socket in
//! that directory). One server per test process, one fresh database per test.
//!
//! The server outlives no test process: a detached watchdog stops it (`pg_ctl stop -m
//! immediate`) and removes its directory as soon as the process that started it is gone,
//! however it ended (a panic, `exit`, `SIGKILL`).
//!
//! Without the binaries the tests that need them are skipped, each saying why; with
//! `APPCONN_TEST_REQUIRE_POSTGRES=1` (CI) a missing server fails them instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs each named test once per engine, as `sqlite::NAME` and `postgres::NAME`: each NAME is an
/// `async fn NAME(f: Fixture)` of the calling file, whose `Fixture` has `sqlite()` and
/// `postgres(test_name) -> Option<Fixture>` (`None` when the test is skipped).
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(fixture) = super::Fixture::postgres(stringify!($name)) {
                        super::$name(fixture).await
                    }
                }
            )*
        }
    };
}

/// The superuser the harness creates, and its password (host connections need it).
pub const USER: &str = "postgres";

/// A database of the test server.
pub struct Database {
    pub name: String,
    /// With the password, on the loopback port.
    pub url: String,
}

pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
}

static SERVER: OnceLock<Result<Postgres, String>> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The process's server, started on first use; `Err` says why there is none.
pub fn server() -> Result<&'static Postgres, String> {
    let server = SERVER.get_or_init(Postgres::start).as_ref();
    match server {
        Ok(server) => Ok(server),
        Err(reason) if std::env::var_os("APPCONN_TEST_REQUIRE_POSTGRES").is_some() => {
            panic!("PostgreSQL is required (APPCONN_TEST_REQUIRE_POSTGRES) but {reason}")
        }
        Err(reason) => Err(reason.clone()),
    }
}

/// The server, or `None` after printing why the calling test is skipped.
pub fn or_skip(test: &str) -> Option<&'static Postgres> {
    match server() {
        Ok(server) => Some(server),
        Err(reason) => {
            // Straight to the process's stderr: the test harness hides what a passing test
            // prints with eprintln!, and a skip must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test} on PostgreSQL: {reason}");
            None
        }
    }
}

impl Postgres {
    fn start() -> Result<Postgres, String> {
        let bin = find_bin()?;
        let as_root = is_root();
        let dir = std::env::temp_dir().join(format!(
            "appconn-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let password = format!("pw-{:016x}", rand::random::<u64>());
        let started = (|| {
            std::fs::write(dir.join("pwfile"), &password).map_err(|e| e.to_string())?;
            if as_root {
                // initdb and postgres refuse to run as root.
                run(Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir))?;
            }
            let server = Postgres {
                bin,
                dir: dir.clone(),
                port: 0,
                password: password.clone(),
            };
            run(server
                .command("initdb")
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-U", USER, "-E", "UTF8", "--no-sync"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", dir.join("pwfile").display())))?;
            watchdog(&server.bin, &dir, as_root)?;
            // A free port may be taken between the probe and the start: try a few.
            let mut last = String::new();
            for _ in 0..5 {
                let port = free_port()?;
                let started = run(server
                    .command("pg_ctl")
                    .arg("-D")
                    .arg(dir.join("data"))
                    .arg("-l")
                    .arg(dir.join("server.log"))
                    .args(["-w", "-t", "30", "-o"])
                    .arg(format!(
                        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
                        dir.display()
                    ))
                    .arg("start"));
                match started {
                    Ok(()) => return Ok(Postgres { port, ..server }),
                    Err(e) => last = e,
                }
            }
            Err(format!("pg_ctl start failed: {last}"))
        })();
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    /// A server binary, as the user that owns the data directory.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// A new, empty database.
    pub fn database(&self) -> Database {
        let name = format!(
            "appconn_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        Database {
            url: self.url(&name),
            name,
        }
    }

    /// A backup and restore as the README describes them: `pg_dump` of `from`, replayed by
    /// `psql` into a new database.
    pub fn dump_and_restore(&self, from: &Database) -> Database {
        let dump = self.dump(from);
        let to = self.database();
        let mut psql = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", &to.name])
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql runs");
        std::io::Write::write_all(&mut psql.stdin.take().unwrap(), &dump).expect("feeding psql");
        let restored = psql.wait_with_output().expect("psql ends");
        assert!(
            restored.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&restored.stderr)
        );
        to
    }

    /// `pg_dump`'s plain SQL output of a database: everything a backup would hold.
    pub fn dump(&self, database: &Database) -> Vec<u8> {
        let dump = Command::new(self.bin.join("pg_dump"))
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                &database.name,
            ])
            .output()
            .expect("pg_dump runs");
        assert!(
            dump.status.success(),
            "{}",
            String::from_utf8_lossy(&dump.stderr)
        );
        dump.stdout
    }

    /// The URL of `database` as the superuser, with the password.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{database}?sslmode=disable",
            self.password, self.port
        )
    }

    /// Runs SQL with psql over the unix socket; returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `APPCONN_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian's layout), else
/// `initdb` on PATH.
fn find_bin() -> Result<PathBuf, String> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    if let Some(dir) = std::env::var_os("APPCONN_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "APPCONN_TEST_PG_BIN={} holds no initdb, pg_ctl and psql",
                dir.display()
            ))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_tools(dir))
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb, pg_ctl, psql) in /usr/lib/postgresql/*/bin \
             or on PATH: install Debian's postgresql package (apt-get install postgresql) or set \
             APPCONN_TEST_PG_BIN"
                .to_string()
        })
}

fn free_port() -> Result<u16, String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(probe.local_addr().map_err(|e| e.to_string())?.port())
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed: {}{}",
            command.get_program(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A detached shell that waits for this process to end, then stops the server and removes its
/// directory. Detached (its own session), so a signal to the test's process group spares it.
fn watchdog(bin: &Path, dir: &Path, as_root: bool) -> Result<(), String> {
    let as_owner = if as_root {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         {as_owner}'{pg_ctl}' -D '{data}' stop -m immediate -w -t 20 >/dev/null 2>&1; \
         rm -rf '{dir}'",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = dir.join("data").display(),
        dir = dir.display(),
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("cannot start the clean-up watchdog: {e}"))
}
