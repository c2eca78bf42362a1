//! The scale benchmark of DESIGN.md section 7, in one process on loopback: the Kubernetes API
//! test server, the real operator (`operator::run`, built-in store on a temporary SQLite file)
//! and a driver.
//!
//! ```text
//! cargo bench --bench scale                      # 10,000 connections
//! cargo bench --bench scale -- --connections 1000
//! ```
//!
//! Options: `--connections N` (10000), `--changes N` Secret changes timed one at a time (200),
//! `--concurrency N` driver requests in flight (32), `--steady-secs N` steady-state window (15),
//! `--refresh-secs N` drift-check interval during the steady state (5).
//!
//! It reports and never aborts on a missed target: each figure is printed with its target and
//! PASS or FAIL. In-process memory figures are the whole process's, test server included, so the
//! difference made by the operator is only an upper bound; the memory target is judged on the
//! same binary re-run as a child process holding the operator alone (`--operator-only`), over
//! the same server and store. To profile that process, name a wrapper for it:
//! `APPCONN_BENCH_CHILD_PREFIX="heaptrack -o /tmp/operator" cargo bench --bench scale`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appconn::controller::leader::LeaseConfig;
use appconn::controller::operator::{self, OperatorOptions};
use appconn::crd::AppConnection;
use appconn::keys::InstallationKeys;
use appconn::store::{SqliteStore, StoreEngine};
use appconn_testkit::apiserver::{RequestRecord, TestApiServer};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::{Notify, oneshot};

const NAMESPACE: &str = "bench";
/// Unwatched by the operator: where the raw AppConnection create rate is measured.
const RAW_NAMESPACE: &str = "bench-raw";
const MIB: f64 = 1024.0 * 1024.0;

struct Args {
    /// Internal: run only the operator against this API server URL and store directory, until
    /// stdin closes (the parent measures this process's memory).
    operator_only: Option<(String, PathBuf)>,
    connections: usize,
    changes: usize,
    concurrency: usize,
    steady: Duration,
    refresh: Duration,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            operator_only: None,
            connections: 10_000,
            changes: 200,
            concurrency: 32,
            steady: Duration::from_secs(15),
            refresh: Duration::from_secs(5),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut number = |name: &str| -> u64 {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{name} needs a number"))
            };
            match arg.as_str() {
                "--connections" => args.connections = number("--connections").max(1) as usize,
                "--changes" => args.changes = number("--changes") as usize,
                "--concurrency" => args.concurrency = number("--concurrency").max(1) as usize,
                "--steady-secs" => args.steady = Duration::from_secs(number("--steady-secs")),
                "--refresh-secs" => {
                    args.refresh = Duration::from_secs(number("--refresh-secs").max(1));
                }
                "--operator-only" => {
                    let url = it.next().expect("--operator-only URL DIR");
                    let dir = it.next().expect("--operator-only URL DIR");
                    args.operator_only = Some((url, dir.into()));
                }
                // cargo bench passes --bench; filters and other harness flags mean nothing here.
                _ => {}
            }
        }
        args.changes = args.changes.min(args.connections);
        args
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match args.operator_only.clone() {
        Some((url, dir)) => runtime.block_on(operator_only(url, dir)),
        None => runtime.block_on(run(args)),
    }
    // Blocking work left behind by stopped clients must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// One figure of the report.
struct Row {
    figure: String,
    value: String,
    target: String,
    pass: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, figure: impl Into<String>, value: impl Into<String>) {
        self.rows.push(Row {
            figure: figure.into(),
            value: value.into(),
            target: String::new(),
            pass: None,
        });
    }

    fn judged(
        &mut self,
        figure: impl Into<String>,
        value: impl Into<String>,
        target: &str,
        pass: bool,
    ) {
        self.rows.push(Row {
            figure: figure.into(),
            value: value.into(),
            target: target.into(),
            pass: Some(pass),
        });
    }

    fn print(&self, args: &Args) {
        let w0 = self.rows.iter().map(|r| r.figure.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
        let w2 = self.rows.iter().map(|r| r.target.len()).max().unwrap_or(0);
        println!();
        println!(
            "appconn scale benchmark: {} connections, {} Secret changes, driver concurrency {}, \
             {} cores",
            args.connections,
            args.changes,
            args.concurrency,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let line = "-".repeat(w0 + w1 + w2 + 16);
        println!("{line}");
        println!(
            "{:w0$} | {:w1$} | {:w2$} | result",
            "figure", "measured", "target"
        );
        println!("{line}");
        for r in &self.rows {
            let result = match r.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "",
            };
            println!(
                "{:w0$} | {:w1$} | {:w2$} | {result}",
                r.figure, r.value, r.target
            );
        }
        println!("{line}");
        for note in &self.notes {
            println!("note: {note}");
        }
        let failed = self.rows.iter().filter(|r| r.pass == Some(false)).count();
        let judged = self.rows.iter().filter(|r| r.pass.is_some()).count();
        println!("{} of {judged} targets met", judged - failed);
    }
}

async fn run(args: Args) {
    if std::env::var_os("RUST_LOG").is_some() {
        appconn::telemetry::init(appconn::telemetry::LogFormat::Plain);
    }
    let mut report = Report::default();
    let dir = tempfile::tempdir().expect("temporary directory");
    let bench = Bench::start().await;
    let n = args.connections;

    // 1. The ceiling: the same server taking plain creates with the driver's concurrency. The
    //    Secrets are the ones the connections read later.
    eprintln!("[1/5] raw write rate: creating {n} Secrets");
    let started = Instant::now();
    bench.create_secrets(n, args.concurrency).await;
    let raw_elapsed = started.elapsed();
    let raw_rate = n as f64 / raw_elapsed.as_secs_f64();
    report.row(
        format!("1. raw API write rate ({n} Secret creates)"),
        format!(
            "{raw_rate:.0} writes/s ({:.1} s)",
            raw_elapsed.as_secs_f64()
        ),
    );
    let raw_crs = (n / 5).max(1);
    let started = Instant::now();
    bench
        .create_connections(RAW_NAMESPACE, raw_crs, args.concurrency)
        .await;
    let raw_cr_rate = raw_crs as f64 / started.elapsed().as_secs_f64();
    report.row(
        format!("   raw AppConnection create rate ({raw_crs}, unwatched)"),
        format!("{raw_cr_rate:.0} writes/s"),
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = memory();

    // 2. 10,000 connections from the first create to all Ready.
    eprintln!("[2/5] creating {n} AppConnections with the operator running");
    let operator = Operator::start(&bench, dir.path(), Duration::from_secs(600)).await;
    let tracker = Tracker::start(&bench.client).await;
    let before = bench.counts();
    let started = Instant::now();
    bench
        .create_connections(NAMESPACE, n, args.concurrency)
        .await;
    let created = started.elapsed();
    let all_ready = tracker
        .wait(Duration::from_secs(300), |t| t.ready >= n)
        .await;
    let elapsed = started.elapsed();
    let at_ready = bench.counts();
    // Writes that trail the last Ready (an Event after a status) belong to the phase too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = bench.counts();
    let ready_now = tracker.ready();
    report.judged(
        format!("2. {n} AppConnections: first create -> all Ready"),
        if all_ready {
            format!("{:.1} s", elapsed.as_secs_f64())
        } else {
            format!(
                "timed out, {ready_now}/{n} Ready after {:.0} s",
                elapsed.as_secs_f64()
            )
        },
        &format!("< {:.0} s", 60.0 * n as f64 / 10_000.0),
        all_ready && elapsed.as_secs_f64() < 60.0 * n as f64 / 10_000.0,
    );
    report.row(
        "   driver creates done after",
        format!(
            "{:.1} s ({:.0} creates/s)",
            created.as_secs_f64(),
            n as f64 / created.as_secs_f64()
        ),
    );
    let mark = (after.connections - before.connections).saturating_sub(n as u64);
    let status = after.status - before.status;
    let events = after.events - before.events;
    let other = (after.total - before.total).saturating_sub(mark + status + events + n as u64);
    let operator_writes = mark + status + events + other;
    let per = |w: u64| w as f64 / n as f64;
    report.row(
        "   operator API writes per connection",
        format!(
            "{:.2} (metadata {:.2}, status {:.2}, events {:.2}, other {:.2})",
            per(operator_writes),
            per(mark),
            per(status),
            per(events),
            per(other)
        ),
    );
    let phase_secs = elapsed.as_secs_f64();
    let op_rate = (at_ready.total - before.total).saturating_sub(n as u64) as f64 / phase_secs;
    let all_rate = (at_ready.total - before.total) as f64 / phase_secs;
    report.row(
        "   API writes/s in the phase (operator | +driver)",
        format!(
            "{op_rate:.0} | {all_rate:.0} = {:.0}% of the raw Secret rate, {:.0}% of the raw \
             AppConnection rate",
            100.0 * all_rate / raw_rate,
            100.0 * all_rate / raw_cr_rate
        ),
    );
    report.row(
        "   connections Ready per second",
        format!("{:.0}", n as f64 / phase_secs),
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_scale = memory();

    // 3. Secret change -> store row updated, one change at a time.
    eprintln!("[3/5] timing {} Secret changes", args.changes);
    let keys = InstallationKeys::read_file(&operator.key_file).expect("the operator's key file");
    let store = SqliteStore::open(&operator.store, &keys.store_keys)
        .await
        .expect("the operator's store");
    let before_changes = bench.counts();
    let mut to_store = Vec::new();
    let mut to_status = Vec::new();
    let mut missed = 0;
    for k in 0..args.changes {
        let i = k * n / args.changes.max(1);
        let name = format!("c{i}");
        let Some(record) = store
            .find_by_name(NAMESPACE, &name)
            .await
            .expect("store read")
        else {
            missed += 1;
            continue;
        };
        let status_version = tracker.version(&name);
        let written = Instant::now();
        bench
            .change_secret(&format!("s{i}"), &format!("changed-{k}"))
            .await;
        let deadline = written + Duration::from_secs(10);
        let mut seen = false;
        while Instant::now() < deadline {
            let now = store.get(record.id).await.expect("store read");
            if now.is_some_and(|r| r.version > record.version) {
                to_store.push(written.elapsed());
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !seen {
            missed += 1;
            continue;
        }
        let updated = tracker
            .wait(Duration::from_secs(10), |t| {
                t.versions.get(&name).copied().unwrap_or(0) > status_version
            })
            .await;
        if updated {
            to_status.push(written.elapsed());
        }
    }
    let after_changes = bench.counts();
    let store_latency = Percentiles::of(&mut to_store);
    report.judged(
        format!(
            "3. Secret change -> store updated ({} changes)",
            to_store.len()
        ),
        store_latency.show(),
        "p99 < 1 s",
        missed == 0 && store_latency.p99 < Duration::from_secs(1),
    );
    report.row(
        "   Secret change -> status.version updated",
        Percentiles::of(&mut to_status).show(),
    );
    if missed > 0 {
        report.notes.push(format!(
            "{missed} Secret changes did not reach the store within 10 s"
        ));
    }
    let change_writes =
        (after_changes.total - before_changes.total).saturating_sub(args.changes as u64);
    report.row(
        "   operator API writes per change",
        format!(
            "{:.2} (status {:.2}, events {:.2})",
            change_writes as f64 / args.changes.max(1) as f64,
            (after_changes.status - before_changes.status) as f64 / args.changes.max(1) as f64,
            (after_changes.events - before_changes.events) as f64 / args.changes.max(1) as f64,
        ),
    );

    // 5. (measured here, at full scale with the first operator still running; reported last)
    let after_changes_mem = memory();

    // 4. Steady state: a fresh operator with a short drift-check interval over the same store
    //    and resources. Its first pass verifies every connection; after it, nothing may write.
    eprintln!(
        "[4/5] steady state: restarting the operator with a {:?} drift check",
        args.refresh
    );
    operator.stop().await;
    let commits = StoreCommits::start(&bench_store_path(dir.path())).await;
    let restart_before = (bench.counts(), commits.fingerprint().await);
    let restarted = Instant::now();
    let operator = Operator::start(&bench, dir.path(), args.refresh).await;
    let first_pass = operator
        .wait_reconciles(n as u64, Duration::from_secs(180))
        .await
        .map(|at| at - restarted);
    let window_before = (bench.counts(), commits.fingerprint().await);
    let reconciles_before = operator.reconciles().await;
    eprintln!("      watching for {:?}", args.steady);
    tokio::time::sleep(args.steady).await;
    let window_after = (bench.counts(), commits.fingerprint().await);
    let reconciles = operator
        .reconciles()
        .await
        .saturating_sub(reconciles_before);
    operator.stop().await;
    let restart_writes = window_before.0.total - restart_before.0.total;
    report.judged(
        format!("4. restart over {n} Ready: API writes | store commits"),
        format!(
            "{restart_writes} | {} ({})",
            window_before.1.commits - restart_before.1.commits,
            match first_pass {
                Some(took) => format!("first pass over all {:.1} s", took.as_secs_f64()),
                None => "first pass not finished".into(),
            }
        ),
        "0 | 0",
        restart_writes == 0 && window_before.1 == restart_before.1,
    );
    let api_writes = window_after.0.total - window_before.0.total;
    let store_commits = window_after.1.commits - window_before.1.commits;
    let store_changed = window_after.1 != window_before.1;
    report.judged(
        format!(
            "   steady {:?} (drift check every {:?}): API | store writes",
            args.steady, args.refresh
        ),
        format!(
            "{api_writes} | {store_commits}{}",
            if store_changed && store_commits == 0 {
                " (content changed)"
            } else {
                ""
            }
        ),
        "0 | 0",
        api_writes == 0 && !store_changed,
    );
    report.row(
        "   reconciles in the steady window",
        format!(
            "{reconciles} ({:.0}/s; {:.0}/s would verify all {n} every interval)",
            reconciles as f64 / args.steady.as_secs_f64(),
            n as f64 / args.refresh.as_secs_f64()
        ),
    );

    eprintln!("[5/5] memory: the operator alone, in a child process, over the {n} connections");
    let alone = operator_alone(&bench, dir.path(), n).await;

    let operator_share = at_scale.rss.saturating_sub(baseline.rss);
    report.row(
        "5. process RSS before the operator (server + Secrets)",
        format!(
            "{:.1} MiB (HWM {:.1} MiB)",
            baseline.rss as f64 / MIB,
            baseline.hwm as f64 / MIB
        ),
    );
    report.row(
        format!("   process RSS at {n} Ready | after the changes"),
        format!(
            "{:.1} MiB | {:.1} MiB (HWM {:.1} MiB)",
            at_scale.rss as f64 / MIB,
            after_changes_mem.rss as f64 / MIB,
            after_changes_mem.hwm as f64 / MIB
        ),
    );
    report.row(
        "   operator's share (RSS difference, upper bound)",
        format!("{:.1} MiB", operator_share as f64 / MIB),
    );
    match alone {
        Some((memory, writes, settled)) => report.judged(
            format!("   operator alone at {n} + {n} Secrets: RSS | HWM"),
            format!(
                "{:.1} MiB | {:.1} MiB (API writes {writes}{})",
                memory.rss as f64 / MIB,
                memory.hwm as f64 / MIB,
                if settled {
                    ""
                } else {
                    "; first pass not finished"
                }
            ),
            "< 100 MiB",
            memory.rss > 0 && (memory.rss as f64 / MIB) < 100.0,
        ),
        None => report
            .notes
            .push("the operator could not be run alone in a child process".into()),
    }

    // Reads and writes by kind during phase 2, from the server's request log; read last, as
    // copying the log takes memory of its own.
    let requests = bench.server.requests();
    describe_requests(&mut report, &requests, n);
    drop(requests);

    tracker.stop();
    commits.stop().await;
    store.close().await;
    drop(bench);
    report.notes.push(
        "the in-process RSS difference counts the test API server's growth while the operator \
         runs (AppConnections with status, Events, watch history, its request log) as the \
         operator's; the target is judged on the operator alone in a child process, measured \
         after its first pass over every connection (a restart over a Ready cluster)"
            .into(),
    );
    report.print(&args);
    dir.close().expect("removing the temporary directory");
}

fn bench_store_path(dir: &Path) -> PathBuf {
    dir.join("appconn.db")
}

/// Phase 2's requests: from the first AppConnection create in the watched namespace to the
/// first Secret change of phase 3.
fn describe_requests(report: &mut Report, requests: &[RequestRecord], n: usize) {
    let in_ns = |r: &RequestRecord| r.namespace.as_deref() == Some(NAMESPACE);
    let Some(start) = requests
        .iter()
        .position(|r| in_ns(r) && r.verb == "create" && r.resource == "appconnections")
    else {
        return;
    };
    let end = requests[start..]
        .iter()
        .position(|r| in_ns(r) && r.verb == "patch" && r.resource == "secrets")
        .map_or(requests.len(), |i| start + i);
    let mut counts: HashMap<String, u64> = HashMap::new();
    for r in &requests[start..end] {
        let resource = if r.subresource.is_empty() {
            r.resource.clone()
        } else {
            format!("{}/{}", r.resource, r.subresource)
        };
        *counts.entry(format!("{} {resource}", r.verb)).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, (kind, count)) in counts.iter().take(8).enumerate() {
        let figure = if i == 0 {
            "   phase 2 API requests per connection"
        } else {
            ""
        };
        report.row(figure, format!("{kind}: {:.2}", *count as f64 / n as f64));
    }
}

/// The test server with the CRDs installed and the benchmark's namespaces.
struct Bench {
    server: TestApiServer,
    client: Client,
}

/// Write counters of the test server.
#[derive(Clone, Copy, Debug)]
struct Counts {
    connections: u64,
    status: u64,
    events: u64,
    total: u64,
}

impl Bench {
    async fn start() -> Bench {
        let server = TestApiServer::start().await;
        let client = server.client();
        appconn_testkit::crds::install(
            &client,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"),
            "appconn-bench",
        )
        .await;
        for name in [NAMESPACE, RAW_NAMESPACE] {
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await
                .expect("namespace");
        }
        Bench { server, client }
    }

    fn counts(&self) -> Counts {
        Counts {
            connections: self.server.writes("appconnections"),
            status: self.server.writes("appconnections/status"),
            events: self.server.writes("events"),
            total: self.server.total_writes(),
        }
    }

    async fn create_secrets(&self, n: usize, concurrency: usize) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(format!("s{i}")),
                            ..Default::default()
                        },
                        data: Some(
                            [
                                ("username".to_string(), ByteString(b"app".to_vec())),
                                (
                                    "password".to_string(),
                                    ByteString(format!("initial-{i}").into_bytes()),
                                ),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    };
                    api.create(&PostParams::default(), &secret).await
                }
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await
            .expect("creating Secrets");
    }

    async fn create_connections(&self, namespace: &str, n: usize, concurrency: usize) {
        let api: Api<AppConnection> = Api::namespaced(self.client.clone(), namespace);
        stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let conn: AppConnection = serde_json::from_value(json!({
                        "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
                        "metadata": {"name": format!("c{i}")},
                        "spec": {
                            "app": "mssql",
                            "method": "username-and-password",
                            "credentials": {
                                "host": {"value": "sql.internal"},
                                "port": {"value": 1433},
                                "username": {"secretKeyRef": {"name": format!("s{i}"), "key": "username"}},
                                "password": {"secretKeyRef": {"name": format!("s{i}"), "key": "password"}},
                            }
                        }
                    }))
                    .expect("a valid AppConnection");
                    api.create(&PostParams::default(), &conn).await
                }
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await
            .expect("creating AppConnections");
    }

    async fn change_secret(&self, name: &str, password: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        let patch = json!({"data": {"password": base64_encode(password.as_bytes())}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("changing a Secret");
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `appconn run`'s options for the benchmark namespace, and the admin server's URL.
async fn options(dir: &Path, refresh: Duration) -> (OperatorOptions, String) {
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("admin port");
    let admin_url = format!("http://{}", admin.local_addr().expect("admin address"));
    let opts = OperatorOptions {
        namespaces: vec![NAMESPACE.into()],
        operator_namespace: NAMESPACE.into(),
        concurrency: 16,
        store: appconn::store::StoreLocation::Sqlite(bench_store_path(dir)),
        key_secret: "appconn-store-key".into(),
        key_file: Some(dir.join("appconn.key")),
        admin,
        store_api: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("store API port"),
        store_api_tls: None,
        maintenance: Default::default(),
        leader_elect: false,
        lease: LeaseConfig::new(NAMESPACE, "appconn-leader", "bench"),
        default_refresh: refresh,
    };
    (opts, admin_url)
}

/// The child process of [`operator_alone`]: the operator and nothing else, until stdin closes.
async fn operator_only(url: String, dir: PathBuf) {
    let mut config = kube::Config::new(url.parse().expect("the API server URL"));
    config.default_namespace = NAMESPACE.into();
    let client = Client::try_from(config).expect("a client for the API server");
    let (opts, admin) = options(&dir, Duration::from_secs(600)).await;
    println!("{admin}");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while stdin.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        let _ = tx.send(());
    });
    if let Err(e) = operator::run(client, opts, async move {
        let _ = rx.await;
    })
    .await
    {
        eprintln!("the operator stopped: {e}");
    }
}

/// What the operator alone holds at `n` Ready connections: the same binary re-run as a child
/// process with only the operator in it, over this server and store, measured once its first
/// pass over every connection has finished. Returns its memory and API writes (None when it
/// could not be run).
async fn operator_alone(bench: &Bench, dir: &Path, n: usize) -> Option<(Memory, u64, bool)> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().ok()?;
    let before = bench.counts();
    let mut command = match std::env::var("APPCONN_BENCH_CHILD_PREFIX") {
        Ok(prefix) => {
            let mut words = prefix.split_whitespace();
            let mut c = tokio::process::Command::new(words.next()?);
            c.args(words).arg(exe);
            c
        }
        Err(_) => tokio::process::Command::new(exe),
    };
    let mut child = command
        .arg("--operator-only")
        .arg(bench.server.url())
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let pid = child.id()?;
    let stdout = child.stdout.take()?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // The child prints its admin URL first; a profiler wrapping it may print before that.
    let admin = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("http://") {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()??;
    let settled = wait_reconciles(&admin, n as u64, Duration::from_secs(180))
        .await
        .is_some();
    // Transient buffers of the first pass are freed by now; what stays is the steady footprint.
    let memory = memory_of(&format!("/proc/{pid}/status"));
    let writes = bench.counts().total - before.total;
    // Closing stdin stops it gracefully; killed if it does not end.
    drop(child.stdin.take());
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Some((memory, writes, settled))
}

/// The operator running in-process, as `appconn run` would.
struct Operator {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    admin: String,
    store: PathBuf,
    key_file: PathBuf,
}

impl Operator {
    async fn start(bench: &Bench, dir: &Path, refresh: Duration) -> Operator {
        let (opts, admin_url) = options(dir, refresh).await;
        let store = bench_store_path(dir);
        let key_file = dir.join("appconn.key");
        let (tx, rx) = oneshot::channel::<()>();
        let client = bench.client.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = operator::run(client, opts, async move {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("the operator stopped: {e}");
            }
        });
        let operator = Operator {
            stop: tx,
            task,
            admin: admin_url,
            store,
            key_file,
        };
        // Ready once the watches have listed; the store and key file exist by then.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = reqwest::get(format!("{}/readyz", operator.admin))
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        operator
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(15), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }

    async fn reconciles(&self) -> u64 {
        reconciles(&self.admin).await
    }

    async fn wait_reconciles(&self, n: u64, timeout: Duration) -> Option<Instant> {
        wait_reconciles(&self.admin, n, timeout).await
    }
}

/// Reconciles so far, of any result, from the admin server's `/metrics`.
async fn reconciles(admin: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("{admin}/metrics")).await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("appconn_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until `n` reconciles have run, then a second more for the stragglers; returns when
/// the `n`th was seen (None on timeout).
async fn wait_reconciles(admin: &str, n: u64, timeout: Duration) -> Option<Instant> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if reconciles(admin).await >= n {
            let reached = Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Some(reached);
        }
    }
    None
}

/// What the driver's own watch of the AppConnections has seen.
#[derive(Default)]
struct Seen {
    /// How many are Ready now.
    ready: usize,
    /// name -> Ready
    readiness: HashMap<String, bool>,
    /// name -> status.version
    versions: HashMap<String, i64>,
}

struct Tracker {
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Tracker {
    /// Watches the benchmark namespace's AppConnections; returns once the watch has listed.
    async fn start(client: &Client) -> Tracker {
        let api: Api<AppConnection> = Api::namespaced(client.clone(), NAMESPACE);
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let (listed_tx, listed_rx) = oneshot::channel::<()>();
        let task = {
            let seen = seen.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut listed = Some(listed_tx);
                let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
                while let Some(event) = events.next().await {
                    let conn = match event {
                        Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => c,
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = listed.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    let name = conn.name_any();
                    let status = conn.status.as_ref();
                    let ready = status.is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                    let version = status.and_then(|s| s.version).unwrap_or(0);
                    let mut seen = seen.lock().expect("tracker lock");
                    let was = seen.readiness.insert(name.clone(), ready).unwrap_or(false);
                    match (was, ready) {
                        (false, true) => seen.ready += 1,
                        (true, false) => seen.ready -= 1,
                        _ => {}
                    }
                    seen.versions.insert(name, version);
                    drop(seen);
                    changed.notify_waiters();
                }
            })
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), listed_rx).await;
        Tracker {
            seen,
            changed,
            task,
        }
    }

    fn ready(&self) -> usize {
        self.seen.lock().expect("tracker lock").ready
    }

    /// The last `status.version` seen for a connection (0 before any).
    fn version(&self, name: &str) -> i64 {
        let seen = self.seen.lock().expect("tracker lock");
        seen.versions.get(name).copied().unwrap_or(0)
    }

    /// Waits until `done` holds for what the watch has seen; false on timeout.
    async fn wait(&self, timeout: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(&self.seen.lock().expect("tracker lock")) {
                return true;
            }
            // Bounded waits: a notification between the check and the wait is not lost for long.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            let _ = tokio::time::timeout_at(wake, notified).await;
            if tokio::time::Instant::now() >= deadline {
                return done(&self.seen.lock().expect("tracker lock"));
            }
        }
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// Commits to the store by any other connection, seen through SQLite's `data_version`, which
/// changes whenever another connection commits; polled often, so the count is a lower bound
/// and zero means none. The fingerprint also catches a change between two polls.
struct StoreCommits {
    commits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<SqliteConnection>,
    stop: oneshot::Sender<()>,
    reader: tokio::sync::Mutex<SqliteConnection>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Fingerprint {
    commits: u64,
    rows: i64,
    versions: i64,
    state_rows: i64,
}

impl StoreCommits {
    async fn start(path: &Path) -> StoreCommits {
        let options = SqliteConnectOptions::new().filename(path).read_only(true);
        let mut poller = SqliteConnection::connect_with(&options)
            .await
            .expect("opening the store read-only");
        let reader = SqliteConnection::connect_with(&options)
            .await
            .expect("opening the store read-only");
        let commits = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let counted = commits.clone();
        let task = tokio::spawn(async move {
            let mut last: Option<i64> = None;
            loop {
                let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                    .fetch_one(&mut poller)
                    .await
                    .expect("reading data_version");
                if last.is_some_and(|l| l != version) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                last = Some(version);
                tokio::select! {
                    _ = &mut stopped => return poller,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        });
        StoreCommits {
            commits,
            task,
            stop,
            reader: tokio::sync::Mutex::new(reader),
        }
    }

    async fn fingerprint(&self) -> Fingerprint {
        let mut reader = self.reader.lock().await;
        let (rows, versions): (i64, i64) =
            sqlx::query_as("SELECT count(*), coalesce(sum(version), 0) FROM connections")
                .fetch_one(&mut *reader)
                .await
                .expect("reading the store");
        let state_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM state")
            .fetch_one(&mut *reader)
            .await
            .expect("reading the store");
        Fingerprint {
            commits: self.commits.load(Ordering::Relaxed),
            rows,
            versions,
            state_rows,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        if let Ok(poller) = self.task.await {
            let _ = poller.close().await;
        }
        let _ = self.reader.into_inner().close().await;
    }
}

/// Resident memory from /proc/PID/status (bytes; 0 where unavailable).
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss: u64,
    hwm: u64,
}

fn memory() -> Memory {
    memory_of("/proc/self/status")
}

fn memory_of(status_file: &str) -> Memory {
    let text = std::fs::read_to_string(status_file).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Memory {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
    }
}

struct Percentiles {
    count: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    fn of(samples: &mut [Duration]) -> Percentiles {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1]
        };
        Percentiles {
            count: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    fn show(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}
