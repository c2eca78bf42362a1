//! The scale benchmark of DESIGN.md section 7: a driver makes Secrets and AppConnections the way
//! users make them, then the real operator (`appconn run`'s code, built-in store on a temporary
//! SQLite file) runs as a child process of its own over them, against the Kubernetes API test
//! server in this process or, through a kubeconfig, a real cluster.
//!
//! ```text
//! cargo bench --bench scale                                  # 10,000 connections, test server
//! cargo bench --bench scale -- --connections 1000
//! cargo bench --bench scale -- --kubeconfig ~/.kube/config   # the same on a real cluster
//! cargo bench --bench scale -- --slope 1000,10000,30000      # memory per connection
//! cargo bench --bench scale --features heap-profile -- --heap   # + heap breakdown
//! ```
//!
//! Options: `--connections N` (10000), `--style plain|kubectl|server-side|helm|mixed` (mixed),
//! `--changes N` Secret changes timed one at a time (200), `--concurrency N` driver requests in
//! flight (32), `--steady-secs N` steady-state window (15), `--refresh-secs N` the drift-check
//! interval after the restart (20), `--throttled N` connections on a throttling Infisical (200;
//! 0 skips it), `--kubeconfig PATH` (or `APPCONN_TEST_KUBECONFIG`), `--server-cost-ms W[,R]`
//! the test server spends W ms of CPU on each write and R (0) on each get or list, to cost
//! what a real server costs (about 10 ms per write for the 175 writes/s of a real
//! kube-apiserver with etcd on 2 cores). The operator reconciles 16
//! connections at once, `appconn run`'s default, or `APPCONN_CONCURRENCY` as for `appconn run`.
//!
//! Every figure is printed with its target and PASS or FAIL; a miss never aborts the run.
//! Write-rate figures are read against the raw rate of the benchmark's own driver in the same
//! run: the test server takes writes about ten times faster than a real one. The raw rate is
//! measured just before the operator starts and again just after all are Ready (in a namespace
//! the operator does not watch), and the mean of the two is the reference: a shared machine's
//! speed drifts over a run.

mod heap;
mod objects;
mod operator;
mod report;
mod store;
mod target;
mod tracker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use appconn::crd::{AppConnection, ConnectionBackend};
use appconn::keys::InstallationKeys;
use appconn::store::{SqliteStore, StoreEngine};
use appconn_testkit::fake::infisical::FakeInfisical;
use appconn_testkit::fake::server::RateLimit;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use objects::{Kind, Style};
use operator::{ChildArgs, ChildOperator};
use report::{MIB, Percentiles, Report};
use store::StoreCommits;
use target::{Requests, Server, Target};
use tracker::Tracker;

#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The operator binary's allocator (src/main.rs), so that the child's memory is the operator's.
#[cfg(not(feature = "heap-profile"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The memory target on the benchmark (a real cluster's objects are a little larger: < 100 MiB).
const MEMORY_TARGET_MIB: f64 = 80.0;

struct Args {
    connections: usize,
    style: Style,
    changes: usize,
    concurrency: usize,
    steady: Duration,
    refresh: Duration,
    throttled: usize,
    kubeconfig: Option<PathBuf>,
    slope: Vec<usize>,
    heap: bool,
    /// CPU the test server spends on each write and on each get or list.
    server_cost: Option<(Duration, Duration)>,
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Args {
        let mut args = Args {
            connections: 10_000,
            style: Style::Mixed,
            changes: 200,
            concurrency: 32,
            steady: Duration::from_secs(15),
            refresh: Duration::from_secs(20),
            throttled: 200,
            kubeconfig: std::env::var_os("APPCONN_TEST_KUBECONFIG").map(PathBuf::from),
            slope: Vec::new(),
            heap: false,
            server_cost: None,
        };
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .unwrap_or_else(|| fail(&format!("{name} needs a value")))
            };
            let number = |name: &str, text: String| -> u64 {
                text.parse()
                    .unwrap_or_else(|_| fail(&format!("{name} needs a number, not {text:?}")))
            };
            match arg.as_str() {
                "--connections" => {
                    args.connections = number(&arg, value(&arg)).max(1) as usize;
                }
                "--style" => {
                    let text = value(&arg);
                    args.style = Style::parse(&text).unwrap_or_else(|| {
                        fail(&format!(
                            "--style is one of plain, kubectl, server-side, helm, mixed; not {text:?}"
                        ))
                    });
                }
                "--changes" => args.changes = number(&arg, value(&arg)) as usize,
                "--concurrency" => args.concurrency = number(&arg, value(&arg)).max(1) as usize,
                "--steady-secs" => args.steady = Duration::from_secs(number(&arg, value(&arg))),
                "--refresh-secs" => {
                    args.refresh = Duration::from_secs(number(&arg, value(&arg)).max(1));
                }
                "--throttled" => args.throttled = number(&arg, value(&arg)) as usize,
                "--kubeconfig" => args.kubeconfig = Some(value(&arg).into()),
                "--slope" => {
                    args.slope = value(&arg)
                        .split(',')
                        .map(|n| number("--slope", n.trim().to_string()) as usize)
                        .collect();
                    args.slope.sort_unstable();
                }
                "--heap" => args.heap = true,
                "--server-cost-ms" => {
                    let text = value(&arg);
                    let mut ms = text
                        .split(',')
                        .map(|n| Duration::from_millis(number(&arg, n.trim().to_string())));
                    let write = ms.next().unwrap_or_default();
                    args.server_cost = Some((write, ms.next().unwrap_or_default()));
                }
                // cargo bench passes --bench; filters and other harness flags mean nothing here.
                _ => {}
            }
        }
        if args.heap && !cfg!(feature = "heap-profile") {
            fail(
                "--heap needs the heap-profile feature: cargo bench --bench scale --features heap-profile -- --heap",
            );
        }
        if args.server_cost.is_some() && args.kubeconfig.is_some() {
            fail("--server-cost-ms is for the test server; a real cluster has costs of its own");
        }
        args.changes = args.changes.min(args.connections);
        args
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2);
}

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    let child = argv.peek().is_some_and(|a| a == "--operator-only");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if child {
        argv.next();
        runtime.block_on(operator::child_main(ChildArgs::from_args(&mut argv)));
    } else {
        let args = Args::parse(argv);
        if args.slope.is_empty() {
            runtime.block_on(run(args));
        } else {
            runtime.block_on(slope(args));
        }
    }
    // Blocking work left behind by stopped clients must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(5));
}

fn title(args: &Args, n: usize) -> String {
    format!(
        "appconn scale benchmark: {n} connections + {n} Secrets ({}), {}, driver concurrency {}, \
         {} cores",
        args.style.name(),
        server(args),
        args.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// What runs in the benchmark's own process besides the report.
fn own_process(args: &Args) -> &'static str {
    match &args.kubeconfig {
        Some(_) => "driver and watcher",
        None => "test server, driver and watcher",
    }
}

fn server(args: &Args) -> String {
    match &args.kubeconfig {
        Some(path) => format!("real cluster ({})", path.display()),
        None => match args.server_cost {
            Some((write, read)) => format!(
                "test API server spending {} ms of CPU per write and {} ms per read",
                write.as_millis(),
                read.as_millis()
            ),
            None => "test API server".into(),
        },
    }
}

/// How long to wait for `n` connections to be reconciled: generous, for slow real servers.
fn patience(n: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(50) * n as u32
}

async fn run(args: Args) {
    let mut report = Report::default();
    let dir = tempfile::tempdir().expect("temporary directory");
    let target = Target::start(args.kubeconfig.clone(), dir.path()).await;
    if let (Server::Test(server), Some((write, read))) = (&target.server, args.server_cost) {
        server.set_request_cost(write, read);
    }
    let (client, ns) = (target.client.clone(), target.namespace.clone());
    let n = args.connections;

    // 1. The ceiling: the driver's own write rate, making exactly the objects the operator
    //    will work on, with nothing watching them.
    eprintln!("[1/6] raw write rate: {n} Secrets, then {n} AppConnections");
    let raw_rate = |namespace: &str, kind: Kind, count: usize| {
        let (client, namespace) = (client.clone(), namespace.to_string());
        async move {
            let took = objects::create(
                &client,
                &namespace,
                args.style,
                kind,
                0..count,
                args.concurrency,
            )
            .await;
            (count as f64 / took.as_secs_f64(), took)
        }
    };
    let (raw_secrets, _) = raw_rate(&ns, Kind::Secret, n).await;
    let held = target.write_lock_held();
    let (raw, took) = raw_rate(&ns, Kind::Connection, n).await;
    let raw_held = target.write_lock_held_since(held);
    report.row(
        "1. raw write rate of the driver: Secrets | AppConnections",
        format!(
            "{raw_secrets:.0} | {raw:.0} writes/s ({:.1} s for the AppConnections)",
            took.as_secs_f64()
        ),
    );

    // 2. The operator starts over them and makes every one Ready.
    eprintln!("[2/6] the operator starts over {n} new connections");
    let tracker = Tracker::start(&client, &ns).await;
    let before = target.requests().await;
    let held = target.write_lock_held();
    let own_cpu = report::cpu_time("self");
    let op = ChildOperator::start(&target, dir.path(), Duration::from_secs(3600), None).await;
    let all_ready = tracker.wait(patience(n), |t| t.ready >= n).await;
    let elapsed = op.started.elapsed();
    let op_held = target.write_lock_held_since(held);
    let at_ready = op.memory();
    let (op_cpu, own_cpu) = (
        report::cpu_time(&op.pid.to_string()),
        report::cpu_time("self").saturating_sub(own_cpu),
    );
    // Writes that trail the last Ready (an Event after a status) belong to the phase too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let catch_up = target.requests().await.since(&before);
    let secs = elapsed.as_secs_f64();
    let ready_rate = n as f64 / secs;
    report.row(
        format!("2. operator start -> all {n} Ready"),
        if all_ready {
            format!("{secs:.1} s")
        } else {
            format!("timed out: {}/{n} Ready after {secs:.0} s", tracker.ready())
        },
    );
    // 2b. The ceiling again, now, in a namespace nobody watches: the machine's speed drifts
    //     over a run (it is shared), so the operator's phase is read against the mean of the
    //     raw rates measured just before and just after it.
    let again = (n / 2).max(100);
    let (raw_after, _) = raw_rate(&target.quiet_namespace, Kind::Connection, again).await;
    let raw_around = (raw + raw_after) / 2.0;
    report.row(
        "   raw write rate of the driver again, right after",
        format!(
            "{raw_after:.0} writes/s ({again} AppConnections in a namespace nobody watches); \
             mean with the first: {raw_around:.0}"
        ),
    );
    if let Some(first) = tracker.first_change() {
        report.row(
            "   operator start -> first change seen",
            format!(
                "{:.2} s",
                first.saturating_duration_since(op.started).as_secs_f64()
            ),
        );
    }
    report.judged(
        "   Ready/s vs a third of the raw rate (the mean)",
        format!(
            "{ready_rate:.0}/s = {:.0}% of {:.0} (of the first alone: {:.0}%)",
            100.0 * ready_rate / (raw_around / 3.0),
            raw_around / 3.0,
            100.0 * ready_rate / (raw / 3.0),
        ),
        ">= 95%",
        all_ready && ready_rate >= 0.95 * raw_around / 3.0,
    );
    let op_rate = catch_up.writes() as f64 / secs;
    report.judged(
        "   operator write rate / raw rate (the mean)",
        format!(
            "{op_rate:.0} / {raw_around:.0} writes/s = {:.2} (to the first alone: {:.2})",
            op_rate / raw_around,
            op_rate / raw
        ),
        ">= 0.95",
        op_rate >= 0.95 * raw_around,
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    report.row(
        format!("   CPU until all Ready: operator | {}", own_process(&args)),
        format!(
            "{:.1} s ({:.2} ms per connection) | {:.1} s, of {:.1} s on {cores} cores",
            op_cpu.as_secs_f64(),
            op_cpu.as_secs_f64() * 1000.0 / n as f64,
            own_cpu.as_secs_f64(),
            secs * cores as f64,
        ),
    );
    if let (Some(raw_held), Some(op_held)) = (raw_held, op_held) {
        // Writes during the phase, the trailing Events aside: close enough for a per-write mean.
        let op_writes = catch_up.writes().max(1) as f64;
        report.row(
            "   test server's write lock (one write at a time): per write, raw | operator",
            format!(
                "{:.0} | {:.0} us; held {:.0}% of the raw phase | {:.0}% of the operator's",
                raw_held.as_secs_f64() * 1e6 / n as f64,
                op_held.as_secs_f64() * 1e6 / op_writes,
                100.0 * raw_held.as_secs_f64() / took.as_secs_f64(),
                100.0 * op_held.as_secs_f64() / secs,
            ),
        );
    }
    describe_requests(&mut report, &catch_up, n);
    report.judged(
        format!("   operator memory at {n} Ready"),
        at_ready.show(),
        &format!("< {MEMORY_TARGET_MIB:.0} MiB"),
        at_ready.rss > 0 && (at_ready.hwm as f64 / MIB) < MEMORY_TARGET_MIB,
    );

    // 3. Secret changes, one at a time, timed to the store row and to the status.
    eprintln!("[3/6] timing {} Secret changes", args.changes);
    let keys = InstallationKeys::read_file(&operator::key_file(dir.path()))
        .expect("the operator's key file");
    let store = SqliteStore::open(operator::store_path(dir.path()), &keys.store_keys)
        .await
        .expect("the operator's store");
    let before = target.requests().await;
    let (mut to_store, mut to_status, mut missed) = (Vec::new(), Vec::new(), 0);
    for k in 0..args.changes {
        let i = k * n / args.changes.max(1);
        let name = format!("c{i}");
        let Some(record) = store.find_by_name(&ns, &name).await.expect("store read") else {
            missed += 1;
            continue;
        };
        let status_version = tracker.version(&name);
        let written = Instant::now();
        objects::change_secret(&client, &ns, i, &format!("changed-{k}")).await;
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
    let changes = target.requests().await.since(&before);
    let store_latency = Percentiles::of(&mut to_store);
    report.judged(
        format!(
            "3. Secret change -> store updated ({} changes)",
            args.changes
        ),
        store_latency.show(),
        "p99 < 100 ms",
        missed == 0 && store_latency.p99 < Duration::from_millis(100),
    );
    let status_latency = Percentiles::of(&mut to_status);
    report.judged(
        "   Secret change -> status.version",
        status_latency.show(),
        "p99 < 100 ms",
        to_status.len() == args.changes && status_latency.p99 < Duration::from_millis(100),
    );
    if missed > 0 {
        report.note(format!(
            "{missed} Secret changes did not reach the store within 10 s"
        ));
    }
    report.row(
        "   operator requests per change",
        changes.per(args.changes).join(", "),
    );

    // 4. Steady state: nothing moves, nothing is written.
    eprintln!("[4/6] steady state for {:?}", args.steady);
    let commits = StoreCommits::start(&operator::store_path(dir.path())).await;
    let before = (target.requests().await, commits.fingerprint().await);
    tokio::time::sleep(args.steady).await;
    let steady = target.requests().await.since(&before.0);
    let after = commits.fingerprint().await;
    report.judged(
        format!("4. steady {:?}: API writes | store commits", args.steady),
        format!("{} | {}", steady.writes(), after.commits - before.1.commits),
        "0 | 0",
        steady.writes() == 0 && after == before.1,
    );
    let catch_up_peak = op.memory();
    op.stop().await;

    // 5. A restart over the Ready connections with a short drift-check interval.
    eprintln!(
        "[5/6] restart over {n} Ready connections, drift check every {:?}",
        args.refresh
    );
    // Kept after the run, for dhat's viewer (dh_view.html).
    let heap_file = args.heap.then(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/appconn-dhat-heap.json")
    });
    let before = (target.requests().await, commits.fingerprint().await);
    let mut op = ChildOperator::start(&target, dir.path(), args.refresh, heap_file.clone()).await;
    let first_pass = op
        .wait_reconciles(n as u64, patience(n))
        .await
        .map(|at| at - op.started);
    let pass = target.requests().await.since(&before.0);
    let drift_in_pass = op.store_reads().await;
    let after_pass = commits.fingerprint().await;
    report.judged(
        format!("5. restart: first pass over {n} | API writes | store commits"),
        format!(
            "{} | {} | {}",
            first_pass.map_or("not finished".into(), |d| format!(
                "{:.1} s",
                d.as_secs_f64()
            )),
            pass.writes(),
            after_pass.commits - before.1.commits
        ),
        "- | 0 | 0",
        first_pass.is_some() && pass.writes() == 0 && after_pass == before.1,
    );
    report.row(
        "   first pass requests per connection",
        pass.per(n).join(", "),
    );
    // Spread: in a first pass of t seconds, about n * t / interval drift reads are due.
    let expected = first_pass.map_or(0.0, |d| {
        n as f64 * d.as_secs_f64() / args.refresh.as_secs_f64()
    });
    report.judged(
        "   drift reads during the first pass",
        format!("{drift_in_pass} (spread evenly: ~{expected:.0}; all at start: {n})"),
        "spread",
        (drift_in_pass as f64) < (expected * 2.0 + 20.0).min(n as f64 / 2.0),
    );
    let window_start = (op.store_reads().await, Instant::now());
    tokio::time::sleep(args.refresh).await;
    let window = (
        op.store_reads().await - window_start.0,
        window_start.1.elapsed(),
    );
    let steady_after = target.requests().await.since(&before.0);
    let commits_after = commits.fingerprint().await;
    report.judged(
        format!(
            "   the next {:?}: drift reads | API writes | store commits",
            args.refresh
        ),
        format!(
            "{} ({:.0}/s; {:.0}/s spreads {n} over the interval) | {} | {}",
            window.0,
            window.0 as f64 / window.1.as_secs_f64(),
            n as f64 / args.refresh.as_secs_f64(),
            steady_after.writes(),
            commits_after.commits - before.1.commits
        ),
        "- | 0 | 0",
        steady_after.writes() == 0 && commits_after == before.1,
    );
    let restarted = op.memory();
    report.judged(
        format!("   operator memory after the restart, {n} Ready"),
        restarted.show(),
        &format!("< {MEMORY_TARGET_MIB:.0} MiB"),
        restarted.rss > 0 && (restarted.hwm as f64 / MIB) < MEMORY_TARGET_MIB,
    );
    report.row(
        "   operator memory at the end of phase 4 (first process)",
        catch_up_peak.show(),
    );
    if let Some(path) = &heap_file {
        if op.write_heap_profile().await {
            for line in heap::breakdown(path) {
                report.note(format!("heap: {line}"));
            }
            report.note(format!("heap: the whole profile: {}", path.display()));
        } else {
            report.note("the heap profile could not be written");
        }
    }

    // 6. A backend that throttles.
    if args.throttled > 0 {
        eprintln!(
            "[6/6] {} connections on an Infisical that allows 10 requests/s",
            args.throttled
        );
        throttled(&mut report, &target, args.throttled).await;
    }
    op.stop().await;

    tracker.stop();
    commits.stop().await;
    store.close().await;
    target.cleanup().await;
    report.note(
        "memory is the operator process alone (this binary re-run as a child holding only the \
         operator), RSS and peak RSS from /proc; requests are counted by the test server per \
         client, or on a real cluster by its apiserver_request_total for appconnections, \
         secrets, events and connectionbackends less the driver's own requests (other clients' \
         requests to those count too)",
    );
    report.print(&title(&args, n));
    dir.close().expect("removing the temporary directory");
}

/// Phase 2's requests per connection, and the judged ones.
fn describe_requests(report: &mut Report, requests: &Requests, n: usize) {
    let on_object =
        requests.writes_to("appconnections") + requests.writes_to("appconnections/status");
    let per = |count: u64| format!("{:.2} ({count})", count as f64 / n as f64);
    report.judged(
        "   API writes per new connection: on the object | Events",
        format!("{} | {}", per(on_object), per(requests.writes_to("events"))),
        "2 | 1",
        on_object <= 2 * n as u64 && requests.writes_to("events") <= n as u64,
    );
    report.judged(
        "   GETs per new connection: its Secret | its own object",
        format!(
            "{} | {}",
            per(requests.gets_of("secrets")),
            per(requests.gets_of("appconnections"))
        ),
        "1 | 0",
        requests.gets_of("secrets") <= n as u64 && requests.gets_of("appconnections") == 0,
    );
    report.row("   all requests per connection", requests.per(n).join(", "));
}

/// `count` connections on an Infisical whose server answers 429 to requests less than 100 ms
/// apart: the time to all Ready against what the limit alone needs, and the share of 429s.
async fn throttled(report: &mut Report, target: &Target, count: usize) {
    let fake = FakeInfisical::start().await;
    let (client_id, client_secret) = (
        "5a0c4f0e-7d8b-4a55-9d3e-2f1b6c7d8e9f",
        "bench-client-secret",
    );
    fake.add_identity(client_id, client_secret);
    fake.set_rate_limit(Some(RateLimit::Spacing {
        min_gap: Duration::from_millis(100),
        retry_after_secs: 1,
    }));
    let ns = &target.namespace;
    let secrets: Api<Secret> = Api::namespaced(target.client.clone(), ns);
    for (name, data) in [
        (
            "infisical-identity",
            json!({"clientId": client_id, "clientSecret": client_secret}),
        ),
        ("databricks-sp", json!({"clientSecret": "bench-sp-secret"})),
    ] {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data,
        }))
        .expect("a Secret");
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("a Secret");
    }
    let backend: ConnectionBackend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
        "metadata": {"name": "throttled"},
        "spec": {"infisical": {
            "url": fake.url(), "projectId": "6f1c2a9e-0b1d-4c55-9a57-3d1f1f1b2c3d",
            "auth": {"universalAuth": {
                "clientId": {"secretKeyRef": {"name": "infisical-identity", "key": "clientId"}},
                "clientSecret": {"secretKeyRef": {"name": "infisical-identity", "key": "clientSecret"}}}},
        }},
    }))
    .expect("a ConnectionBackend");
    Api::<ConnectionBackend>::namespaced(target.client.clone(), ns)
        .create(&PostParams::default(), &backend)
        .await
        .expect("the ConnectionBackend");
    let before = target.requests().await;
    let started = Instant::now();
    let conns: Api<AppConnection> = Api::namespaced(target.client.clone(), ns);
    futures::stream::iter(0..count)
        .map(|i| {
            let conns = conns.clone();
            async move {
                let conn: AppConnection = serde_json::from_value(json!({
                    "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
                    "metadata": {"name": format!("lake-{i}")},
                    "spec": {
                        "backendRef": {"kind": "ConnectionBackend", "name": "throttled"},
                        "app": "databricks", "method": "service-principal",
                        "refreshInterval": "1h",
                        "credentials": {
                            "clientId": {"value": "6c2ab7d4-1f0e-4b8a-9d57-0c3f2e1a9b10"},
                            "workspaceUrl": {"value": "https://adb-1.azuredatabricks.net"},
                            "clientSecret": {"secretKeyRef": {"name": "databricks-sp", "key": "clientSecret"}},
                        },
                    },
                }))
                .expect("an AppConnection");
                conns.create(&PostParams::default(), &conn).await.expect("an AppConnection");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let limit_alone = Duration::from_millis(100) * count as u32;
    let deadline = started + limit_alone * 4 + Duration::from_secs(30);
    let ready = loop {
        let list = conns.list(&ListParams::default()).await.expect("listing");
        let ready = list
            .items
            .iter()
            .filter(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("lake-"))
            })
            .filter(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == count || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests = target.requests().await.since(&before);
    let calls = fake.requests();
    let throttled = calls.iter().filter(|r| r.status == 429).count();
    let logins = calls.iter().filter(|r| r.is_login()).count();
    report.judged(
        format!("6. throttled backend (429 below 100 ms spacing): {count} Ready"),
        format!(
            "{ready}/{count} in {:.1} s (the limit alone needs {:.0} s)",
            took.as_secs_f64(),
            limit_alone.as_secs_f64()
        ),
        "< 2x the limit alone",
        ready == count && took < limit_alone * 2,
    );
    report.judged(
        "   backend requests answered 429 | logins",
        format!(
            "{throttled} of {} ({:.1}%) | {logins}",
            calls.len(),
            100.0 * throttled as f64 / calls.len().max(1) as f64
        ),
        "< 10% | 1",
        (throttled as f64) < 0.10 * calls.len() as f64 && logins == 1,
    );
    let on_object =
        requests.writes_to("appconnections") + requests.writes_to("appconnections/status");
    report.judged(
        "   API writes per new connection on the object (remote backend)",
        format!("{:.2}", on_object as f64 / count as f64),
        "2",
        on_object <= 2 * count as u64,
    );
}

/// Memory per connection: the operator's resident size over 1,000, 10,000 and 30,000 Ready
/// connections (each level measured in a fresh process after its first pass, as after a
/// restart), and the slope between levels.
async fn slope(args: Args) {
    let mut report = Report::default();
    let dir = tempfile::tempdir().expect("temporary directory");
    let target = Target::start(args.kubeconfig.clone(), dir.path()).await;
    let (client, ns) = (target.client.clone(), target.namespace.clone());
    let tracker = Tracker::start(&client, &ns).await;
    let mut made = 0;
    let mut levels: Vec<(usize, f64)> = Vec::new();
    for &level in &args.slope {
        eprintln!("[slope] {level} connections");
        objects::create(
            &client,
            &ns,
            args.style,
            Kind::Secret,
            made..level,
            args.concurrency,
        )
        .await;
        objects::create(
            &client,
            &ns,
            args.style,
            Kind::Connection,
            made..level,
            args.concurrency,
        )
        .await;
        made = level;
        let op = ChildOperator::start(&target, dir.path(), Duration::from_secs(3600), None).await;
        let all_ready = tracker.wait(patience(level), |t| t.ready >= level).await;
        let catch_up = op.memory();
        op.stop().await;
        let op = ChildOperator::start(&target, dir.path(), Duration::from_secs(3600), None).await;
        let settled = op
            .wait_reconciles(level as u64, patience(level))
            .await
            .is_some();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let memory = op.memory();
        op.stop().await;
        let rss = memory.rss as f64 / MIB;
        report.row(
            format!("{level} Ready connections + {level} Secrets"),
            format!(
                "{} after a restart{}; peak {:.1} MiB while making them Ready",
                memory.show(),
                if all_ready && settled {
                    ""
                } else {
                    " (NOT all Ready)"
                },
                catch_up.hwm as f64 / MIB
            ),
        );
        if let Some(&(previous, previous_rss)) = levels.last() {
            report.row(
                format!("   slope {previous} -> {level}"),
                format!(
                    "{:.2} KiB per connection + Secret",
                    (rss - previous_rss) * 1024.0 / (level - previous) as f64
                ),
            );
        }
        levels.push((level, rss));
    }
    tracker.stop();
    target.cleanup().await;
    report.print(&format!(
        "appconn memory slope ({}): {}",
        args.style.name(),
        server(&args)
    ));
    dir.close().expect("removing the temporary directory");
}
