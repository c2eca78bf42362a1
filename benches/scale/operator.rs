//! The operator under test: this same binary re-run as a child process holding the operator
//! and nothing else (`appconn run`'s code path, built-in store on a SQLite file), so its memory
//! is its own. It prints its admin URL, writes its heap profile when told to on stdin, and
//! stops gracefully when stdin closes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use appconn::controller::leader::LeaseConfig;
use appconn::controller::operator::{self, OperatorOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};

use crate::report::Memory;
use crate::target::{OPERATOR_AGENT, Target, client_for};

/// What the child is told on its command line.
pub struct ChildArgs {
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub dir: PathBuf,
    pub refresh: Duration,
    /// Where to write a heap profile (needs the `heap-profile` feature).
    pub heap: Option<PathBuf>,
}

impl ChildArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--operator-only".to_string(),
            self.kubeconfig.display().to_string(),
            self.namespace.clone(),
            self.dir.display().to_string(),
            self.refresh.as_millis().to_string(),
        ];
        if let Some(heap) = &self.heap {
            args.push(heap.display().to_string());
        }
        args
    }

    /// The inverse of [`to_args`](Self::to_args), after `--operator-only`.
    pub fn from_args(args: &mut impl Iterator<Item = String>) -> ChildArgs {
        let mut next = |what: &str| {
            args.next()
                .unwrap_or_else(|| panic!("--operator-only needs {what}"))
        };
        ChildArgs {
            kubeconfig: next("a kubeconfig").into(),
            namespace: next("a namespace"),
            dir: next("a directory").into(),
            refresh: Duration::from_millis(next("a refresh").parse().expect("milliseconds")),
            heap: args.next().map(PathBuf::from),
        }
    }
}

/// The allocator setting of the operator's image (Dockerfile), so that the child's memory is
/// the image's; one already in the environment is passed on instead.
const IMAGE_ENV: &[(&str, &str)] = &[("MIMALLOC_PURGE_DELAY", "0")];

pub fn store_path(dir: &Path) -> PathBuf {
    dir.join("appconn.db")
}

pub fn key_file(dir: &Path) -> PathBuf {
    dir.join("appconn.key")
}

/// The child's main: the operator for one namespace until stdin closes.
pub async fn child_main(args: ChildArgs) {
    #[cfg(feature = "heap-profile")]
    let profiler = std::sync::Mutex::new(args.heap.as_ref().map(|path| {
        dhat::Profiler::builder()
            .file_name(path)
            .trim_backtraces(Some(48))
            .build()
    }));
    #[cfg(not(feature = "heap-profile"))]
    if args.heap.is_some() {
        eprintln!("a heap profile needs the heap-profile feature");
        std::process::exit(2);
    }
    let client = client_for(&args.kubeconfig, Some(OPERATOR_AGENT))
        .await
        .expect("a client for the cluster");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("admin port");
    println!("http://{}", admin.local_addr().expect("admin address"));
    let opts = OperatorOptions {
        namespaces: vec![args.namespace.clone()],
        operator_namespace: args.namespace.clone(),
        // `appconn run`'s default, or its environment variable.
        concurrency: std::env::var("APPCONN_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16),
        store: appconn::store::StoreLocation::Sqlite(store_path(&args.dir)),
        key_secret: "appconn-store-key".into(),
        key_file: Some(key_file(&args.dir)),
        admin,
        store_api: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("store API port"),
        store_api_tls: None,
        maintenance: Default::default(),
        leader_elect: false,
        lease: LeaseConfig::new(&args.namespace, "appconn-leader", "bench"),
        default_refresh: args.refresh,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "heap" {
                // Dropping the profiler writes the profile of what is live now.
                #[cfg(feature = "heap-profile")]
                drop(profiler.lock().expect("profiler lock").take());
                println!("heap written");
            }
        }
        let _ = stop.send(());
    });
    if let Err(e) = operator::run(client, opts, async move {
        let _ = stopped.await;
    })
    .await
    {
        eprintln!("the operator stopped: {e}");
    }
}

/// A running child operator.
pub struct ChildOperator {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    pub pid: u32,
    pub admin: String,
    pub started: Instant,
}

impl ChildOperator {
    /// Starts the operator over `target`'s namespace; returns once its admin server answers.
    pub async fn start(
        target: &Target,
        dir: &Path,
        refresh: Duration,
        heap: Option<PathBuf>,
    ) -> ChildOperator {
        let args = ChildArgs {
            kubeconfig: target.kubeconfig.clone(),
            namespace: target.namespace.clone(),
            dir: dir.to_path_buf(),
            refresh,
            heap,
        };
        let exe = std::env::current_exe().expect("the benchmark's own executable");
        let started = Instant::now();
        let mut child = tokio::process::Command::new(exe)
            .args(args.to_args())
            .envs(
                IMAGE_ENV
                    .iter()
                    .filter(|(name, _)| std::env::var_os(name).is_none())
                    .copied(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the operator process");
        let pid = child.id().expect("a running child");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("the child's stdout");
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let admin = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .ok()
            .flatten()
            .filter(|l| l.starts_with("http://"))
            .expect("the operator process prints its admin URL");
        let operator = ChildOperator {
            child,
            stdin,
            lines,
            pid,
            admin,
            started,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if reqwest::get(format!("{}/livez", operator.admin))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        operator
    }

    pub fn memory(&self) -> Memory {
        Memory::of(self.pid)
    }

    /// The sum of the admin server's series of `metric` whose labels contain `labels`.
    pub async fn metric(&self, metric: &str, labels: &str) -> u64 {
        let Ok(response) = reqwest::get(format!("{}/metrics", self.admin)).await else {
            return 0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Reconciles so far, of any result.
    pub async fn reconciles(&self) -> u64 {
        self.metric("appconn_reconciles_total", "").await
    }

    /// Reads of built-in store records (drift checks and adoption lookups).
    pub async fn store_reads(&self) -> u64 {
        self.metric(
            "appconn_backend_requests_total",
            "backend=\"builtin\",operation=\"get\"",
        )
        .await
    }

    /// Waits until `n` reconciles have run; when the `n`th was seen (None on timeout).
    pub async fn wait_reconciles(&self, n: u64, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.reconciles().await >= n {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Has the child write its heap profile of what is live now.
    pub async fn write_heap_profile(&mut self) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        if stdin.write_all(b"heap\n").await.is_err() {
            return false;
        }
        let _ = stdin.flush().await;
        tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = self.lines.recv().await {
                if line == "heap written" {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }

    /// Closes its stdin (a graceful stop); killed if it has not ended within 20 s.
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
