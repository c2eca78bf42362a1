use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use appconn::cli::keys::{KeyTarget, KeysOptions};
use appconn::cli::{self, Format, StoreOptions, output};
use appconn::controller::leader::LeaseConfig;
use appconn::controller::operator::{self, Maintenance, OperatorOptions};
use appconn::controller::parse_duration;
use appconn::store::StoreLocation;
use appconn::store::tls::TlsFiles;
use appconn::telemetry::{self, LogFormat};
use clap::{Parser, Subcommand};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

/// mimalloc rather than the system allocator: the same allocator on the glibc and the static
/// musl build, whose own malloc is slow under many threads, and a resident size close to the
/// live heap (glibc keeps freed memory in per-thread arenas).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// appconn: AppConnection resources turned into real connections.
#[derive(Parser)]
#[command(name = "appconn", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// SQLite file of the built-in store.
    #[arg(long, env = "APPCONN_STORE", default_value = "appconn.db")]
    store: PathBuf,
    /// Key file of the store (created with mode 0600 when absent); default: the store path with
    /// the extension `.key`.
    #[arg(long, env = "APPCONN_KEY_FILE")]
    key_file: Option<PathBuf>,
}

impl StoreArgs {
    fn options(&self) -> StoreOptions {
        StoreOptions {
            store: self.store.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

/// What `apply` and `delete` read and print.
#[derive(clap::Args)]
struct FileArgs {
    /// A manifest file, or a directory read recursively.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Print the plan (create/update/noop/delete per connection) and change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

/// Flags of `appconn run`; each has an environment variable too.
#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig file; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only these namespaces (comma-separated); all when empty.
    #[arg(long, env = "APPCONN_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Namespace of the operator: its key Secret and leader Lease live there. Default: the
    /// ServiceAccount's namespace in a cluster, else the kubeconfig context's, else `default`.
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,
    /// Connections reconciled at once.
    #[arg(long, env = "APPCONN_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// The built-in store: a SQLite file, or a PostgreSQL URL
    /// (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=verify-full&...]).
    #[arg(
        long,
        env = "APPCONN_STORE",
        default_value = "/var/lib/appconn/appconn.db",
        hide_env_values = true
    )]
    store: String,
    /// A file whose first line is the PostgreSQL password (a mounted Secret key).
    #[arg(long, env = "APPCONN_STORE_PASSWORD_FILE")]
    store_password_file: Option<PathBuf>,
    /// Secret holding the installation keys, created on first start.
    #[arg(long, env = "APPCONN_KEY_SECRET", default_value = "appconn-store-key")]
    key_secret: String,
    /// A key file instead of the Secret.
    #[arg(long, env = "APPCONN_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, env = "APPCONN_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Address of the store read API for consumers.
    #[arg(long, env = "APPCONN_STORE_API_ADDR", default_value = "0.0.0.0:8081")]
    store_api_addr: SocketAddr,
    /// Serve the store read API over HTTPS with `tls.crt` and `tls.key` from this directory
    /// (a mounted kubernetes.io/tls Secret, as cert-manager writes it), read again when they
    /// change.
    #[arg(
        long,
        env = "APPCONN_STORE_API_TLS_DIR",
        conflicts_with = "store_api_plain_http"
    )]
    store_api_tls_dir: Option<PathBuf>,
    /// Serve the store read API over plain HTTP: credentials cross the network in clear.
    #[arg(long, env = "APPCONN_STORE_API_PLAIN_HTTP")]
    store_api_plain_http: bool,
    /// How often the installation keys and the read API's certificate are read again.
    #[arg(long, env = "APPCONN_RELOAD_INTERVAL", default_value = "10s", value_parser = duration)]
    reload_interval: std::time::Duration,
    /// Records moved to the current key per batch after a key rotation.
    #[arg(long, env = "APPCONN_REENCRYPT_BATCH", default_value_t = 100)]
    reencrypt_batch: usize,
    /// Pause between two re-encryption batches.
    #[arg(long, env = "APPCONN_REENCRYPT_PAUSE", default_value = "100ms", value_parser = duration)]
    reencrypt_pause: std::time::Duration,
    /// Only one replica reconciles, holding a Lease.
    #[arg(long, env = "APPCONN_LEADER_ELECT")]
    leader_elect: bool,
    #[arg(long, env = "APPCONN_LEASE_NAME", default_value = "appconn-leader")]
    lease_name: String,
    /// Default drift-check interval of connections that set no refreshInterval.
    #[arg(long, env = "APPCONN_REFRESH_INTERVAL", default_value = "10m", value_parser = duration)]
    refresh_interval: std::time::Duration,
    #[arg(long, env = "APPCONN_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration like 10m or 1h30m"))
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against a Kubernetes API.
    Run(Box<RunArgs>),
    /// Reconcile AppConnection, ConnectionBackend and Secret manifests from files, with no
    /// cluster, and print each connection's resulting status.
    Apply {
        #[command(flatten)]
        files: FileArgs,
        /// Also read every backend object to catch drift, even where nothing changed.
        #[arg(long)]
        verify: bool,
    },
    /// Delete the AppConnections named in the files, honouring their deletionPolicy.
    Delete {
        #[command(flatten)]
        files: FileArgs,
    },
    /// Show applied connections and their status (never a secret value).
    Get {
        /// Only this AppConnection.
        name: Option<String>,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Rotate, list and remove the store's encryption keys.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Copy the built-in store.
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Print the CustomResourceDefinitions, or write one file per CRD into a directory.
    Crds {
        /// Write `<name>.yaml` files here instead of printing (how `crds/` is made).
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a new encryption key and make it current. With --store the records are re-encrypted
    /// here and now; otherwise the running operator re-encrypts them once it reads the keys.
    Rotate {
        #[command(flatten)]
        keys: KeyArgs,
        /// Records re-encrypted per batch (with --store).
        #[arg(long, default_value_t = cli::keys::DEFAULT_BATCH)]
        batch_size: usize,
    },
    /// List the keys, which one is current, and (with --store) how many records each encrypts.
    Status {
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Remove an old key once no record of the store (--store) uses it.
    Remove {
        /// The key id, as `keys status` lists it (k1, k2, ...).
        id: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write a consistent copy of a SQLite store to FILE while the operator keeps running.
    /// (A PostgreSQL store is copied with pg_dump.)
    Backup {
        /// The copy to create; it must not exist.
        file: PathBuf,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

/// The keys (a key file, or the operator's key Secret) and, where needed, the store.
#[derive(clap::Args)]
struct KeyArgs {
    /// The store: a SQLite file, or a PostgreSQL URL.
    #[arg(long, env = "APPCONN_STORE", hide_env_values = true)]
    store: Option<String>,
    /// A file whose first line is the PostgreSQL password.
    #[arg(long, env = "APPCONN_STORE_PASSWORD_FILE")]
    store_password_file: Option<PathBuf>,
    /// The key file; default: the SQLite store's path with the extension `.key`.
    #[arg(long, conflicts_with = "key_secret")]
    key_file: Option<PathBuf>,
    /// The operator's key Secret instead of a key file (read and updated through the
    /// Kubernetes API).
    #[arg(long)]
    key_secret: Option<String>,
    /// Namespace of the key Secret; default: the kubeconfig context's.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Kubeconfig for the key Secret.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

impl KeyArgs {
    fn options(&self) -> Result<KeysOptions, String> {
        let store = self
            .store
            .as_deref()
            .map(|s| store_location(s, self.store_password_file.as_deref()))
            .transpose()?;
        let keys = match (&self.key_secret, &self.key_file, &store) {
            (Some(name), _, _) => KeyTarget::Secret {
                kubeconfig: self.kubeconfig.clone(),
                namespace: self.namespace.clone(),
                name: name.clone(),
            },
            (None, Some(path), _) => KeyTarget::File(path.clone()),
            (None, None, Some(StoreLocation::Sqlite(path))) => {
                KeyTarget::File(path.with_extension("key"))
            }
            (None, None, _) => {
                return Err(
                    "name the keys: --key-file PATH, or --key-secret NAME for the operator's Secret"
                        .into(),
                );
            }
        };
        Ok(KeysOptions { keys, store })
    }
}

/// `--store` as a location; errors never repeat a password.
fn store_location(
    text: &str,
    password_file: Option<&std::path::Path>,
) -> Result<StoreLocation, String> {
    let location = StoreLocation::parse(text).map_err(|e| e.to_string())?;
    match password_file {
        Some(file) => location.with_password_file(file).map_err(|e| e.to_string()),
        None => Ok(location),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli));
    // Work still running (a request to an API that does not answer) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Run(args) => run_operator(*args).await,
        Command::Apply { files, verify } => {
            let store = files.store.options();
            let result = cli::apply(&files.file, &store, files.dry_run, verify).await;
            report(result, files.output)
        }
        Command::Delete { files } => {
            let store = files.store.options();
            report(
                cli::delete(&files.file, &store, files.dry_run).await,
                files.output,
            )
        }
        Command::Get {
            name,
            namespace,
            store,
            output,
        } => {
            let rows = cli::get(&store.options(), namespace.as_deref(), name.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if rows.is_empty() && name.is_some() {
                return Err(format!(
                    "AppConnection {:?} not found",
                    name.unwrap_or_default()
                ));
            }
            print!("{}", output::render(&rows, output));
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { action } => keys_command(action).await,
        Command::Store {
            action: StoreCommand::Backup { file, keys },
        } => {
            let opts = keys.options()?;
            cli::keys::backup(&opts, &file)
                .await
                .map_err(|e| e.to_string())?;
            println!("wrote {}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Crds { output_dir } => {
            for (file, yaml) in appconn::crd::crds_yaml() {
                match &output_dir {
                    Some(dir) => std::fs::write(dir.join(&file), yaml)
                        .map_err(|e| format!("cannot write {}: {e}", dir.join(&file).display()))?,
                    None => print!("---\n{yaml}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn keys_command(action: KeysCommand) -> Result<ExitCode, String> {
    match action {
        KeysCommand::Rotate { keys, batch_size } => {
            let opts = keys.options()?;
            let done = cli::keys::rotate(&opts, batch_size)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{}: {} is now the current key ({} is kept for reading)",
                done.target, done.new_key, done.previous
            );
            match done.reencrypted {
                Some(n) => println!(
                    "re-encrypted {n} record(s) with {}; remove old keys with `appconn keys remove ID`",
                    done.new_key
                ),
                None => println!(
                    "the running operator re-encrypts the records in the background; follow it with `appconn keys status --store ...`"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Status { keys } => {
            let rows = cli::keys::status(&keys.options()?)
                .await
                .map_err(|e| e.to_string())?;
            println!("{:<12} {:<10} RECORDS", "KEY", "STATE");
            for row in rows {
                let records = row.records.map_or("-".to_string(), |n| n.to_string());
                println!("{:<12} {:<10} {records}", row.id, row.state);
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Remove { id, keys } => {
            let opts = keys.options()?;
            cli::keys::remove(&opts, &id)
                .await
                .map_err(|e| e.to_string())?;
            println!("removed key {id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How long `appconn run` may take to stop once told to: in-flight reconciles finish and the
/// Lease is released within it; whatever still runs after it is abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn run_operator(args: RunArgs) -> Result<ExitCode, String> {
    telemetry::init(args.log_format);
    // Installed before anything else, so a signal during start-up is never lost.
    let shutdown = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let stopping = shutdown.clone();
    let overdue = async move {
        stopping.await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = start_operator(args, shutdown) => result,
        () = overdue => {
            tracing::warn!(
                grace_secs = SHUTDOWN_GRACE.as_secs(),
                "not stopped within the grace period; exiting"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn start_operator(
    args: RunArgs,
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> Result<ExitCode, String> {
    let store = store_location(&args.store, args.store_password_file.as_deref())?;
    let store_api_tls = match (&args.store_api_tls_dir, args.store_api_plain_http) {
        (Some(dir), _) => Some(TlsFiles::in_dir(dir)),
        (None, true) => None,
        (None, false) => {
            return Err(
                "the store read API serves HTTPS: give --store-api-tls-dir DIR (tls.crt and \
                 tls.key, e.g. a mounted cert-manager Secret), or --store-api-plain-http to serve \
                 plain HTTP"
                    .into(),
            );
        }
    };
    let (client, context_namespace) = cli::keys::kube_client(args.kubeconfig.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let operator_namespace = args
        .operator_namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(context_namespace);
    let version = client.apiserver_version().await.map_err(|e| {
        format!(
            "cannot reach the Kubernetes API server: {}",
            appconn::kube_error::describe(&e)
        )
    })?;
    tracing::info!(server = %version.git_version, "connected to the Kubernetes API");
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.admin_addr))?;
    let store_api = tokio::net::TcpListener::bind(args.store_api_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.store_api_addr))?;
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("appconn-{}", std::process::id()));
    let opts = OperatorOptions {
        namespaces: args
            .namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        lease: LeaseConfig::new(&operator_namespace, &args.lease_name, identity),
        operator_namespace,
        concurrency: args.concurrency.max(1),
        store,
        key_secret: args.key_secret,
        key_file: args.key_file,
        admin,
        store_api,
        store_api_tls,
        maintenance: Maintenance {
            reload_every: args.reload_interval,
            reencrypt_batch: args.reencrypt_batch,
            reencrypt_pause: args.reencrypt_pause,
        },
        leader_elect: args.leader_elect,
        default_refresh: args.refresh_interval,
    };
    operator::run(client, opts, shutdown)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// A future that resolves once SIGTERM or Ctrl-C arrives. The handlers are installed now, not
/// when the future is first polled.
fn shutdown_signal() -> std::io::Result<Shared<BoxFuture<'static, ()>>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        let _ = tx.send(());
    });
    Ok(async move {
        let _ = rx.await;
    }
    .boxed()
    .shared())
}

/// Prints what `apply` or `delete` did; the exit code says whether every connection is Ready.
fn report(result: Result<cli::Report, cli::CliError>, format: Format) -> Result<ExitCode, String> {
    let report = result.map_err(|e| e.to_string())?;
    for skipped in &report.skipped {
        eprintln!("warning: {skipped}");
    }
    print!("{}", output::render(&report.rows, format));
    Ok(ExitCode::from(report.exit_code() as u8))
}
