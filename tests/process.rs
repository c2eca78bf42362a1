//! `appconn run` as a process, the way a Deployment runs it: its operator namespace, its exit on
//! SIGTERM from any state, and its JSON log lines. Only against the test API server (each test
//! needs a server without CRDs or an API that it controls).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appconn_testkit::apiserver::TestApiServer;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::json;

/// Longest acceptable time from SIGTERM to exit: the operator's grace period (5 s) plus a margin
/// for a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(9);

/// A running `appconn run` whose stderr lines are collected.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Process {
    /// `appconn run` against `server`, whose kubeconfig context names `context_namespace`.
    fn start(server: &TestApiServer, context_namespace: &str, extra: &[&str]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = server.write_kubeconfig(dir.path(), context_namespace);
        let mut command = Command::new(env!("CARGO_BIN_EXE_appconn"));
        command
            .arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--store")
            .arg(dir.path().join("appconn.db"))
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--store-api-addr", "127.0.0.1:0", "--store-api-plain-http"])
            .args(extra)
            .env_remove("POD_NAMESPACE")
            .env(
                "RUST_LOG",
                std::env::var("APPCONN_TEST_OPERATOR_LOG").unwrap_or_default(),
            )
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("appconn runs");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            lines,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a log line containing `text`.
    async fn wait_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.lines().iter().any(|l| l.contains(text)) {
            assert!(
                Instant::now() < deadline,
                "no log line with {text:?}; got:\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and returns how long the process took to exit, with its status.
    async fn terminate(&mut self) -> (Duration, ExitStatus) {
        let sent = Instant::now();
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -TERM failed");
        self.wait_exit(sent).await
    }

    async fn wait_exit(&mut self, since: Instant) -> (Duration, ExitStatus) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (since.elapsed(), status);
            }
            if since.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!(
                    "still running 30 s after SIGTERM; log:\n{}",
                    self.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts a prompt, clean exit after SIGTERM, and that every log line was valid JSON with
    /// unique keys. `graceful`: everything stopped by itself, without the grace period's cut.
    async fn assert_stops(&mut self, when: &str, graceful: bool) {
        let (took, status) = self.terminate().await;
        assert!(
            took < EXIT_WITHIN,
            "{when}: exit took {took:?}; log:\n{}",
            self.lines().join("\n")
        );
        assert!(status.success(), "{when}: exit status {status}");
        let cut = self
            .lines()
            .iter()
            .any(|l| l.contains("not stopped within the grace period"));
        assert_eq!(
            cut,
            !graceful,
            "{when}: cut by the grace period: {cut}; log:\n{}",
            self.lines().join("\n")
        );
        assert_json_lines(&self.lines());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn create_namespace(client: &Client, name: &str) {
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
        .unwrap();
}

async fn server_with_crds() -> TestApiServer {
    let server = TestApiServer::start().await;
    appconn_testkit::crds::install(
        &server.client(),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"),
        "appconn-tests",
    )
    .await;
    server
}

/// A JSON value that refuses an object with a repeated key, as strict log pipelines do.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

fn assert_json_lines(lines: &[String]) {
    assert!(!lines.is_empty(), "the operator logged nothing");
    for line in lines {
        if let Err(e) = serde_json::from_str::<Strict>(line) {
            panic!("log line is not JSON with unique keys ({e}): {line}");
        }
        assert!(
            !line.contains("Status {"),
            "an API error reached the log as a Debug dump: {line}"
        );
    }
}

#[test]
fn the_strict_parser_refuses_repeated_keys() {
    assert!(serde_json::from_str::<Strict>(r#"{"a":1,"b":{"c":[{"d":2}]}}"#).is_ok());
    assert!(serde_json::from_str::<Strict>(r#"{"a":1,"a":2}"#).is_err());
    assert!(serde_json::from_str::<Strict>(r#"{"span":{"name":"r","name":"x"}}"#).is_err());
    assert!(serde_json::from_str::<Strict>("not json").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_namespace_is_the_context_namespace_and_a_missing_one_is_one_line() {
    let server = server_with_crds().await;
    let client = server.client();

    // The context names a namespace that does not exist; the keys live in a Secret there.
    let mut missing = Process::start(&server, "nowhere", &[]);
    let (_, status) = missing.wait_exit(Instant::now()).await;
    assert_eq!(status.code(), Some(2), "{}", missing.lines().join("\n"));
    let last = missing.lines().last().cloned().unwrap_or_default();
    assert_eq!(
        last,
        "error: namespace \"nowhere\" does not exist: create it, or pass --operator-namespace \
         (POD_NAMESPACE) naming the namespace of the operator's key Secret and leader Lease"
    );

    // The same with leader election: the Lease's namespace is checked before the election.
    let mut missing = Process::start(&server, "nowhere", &["--leader-elect"]);
    let (_, status) = missing.wait_exit(Instant::now()).await;
    assert_eq!(status.code(), Some(2));
    assert!(
        missing
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("error: namespace \"nowhere\" does not exist")),
        "{}",
        missing.lines().join("\n")
    );

    // An existing context namespace holds the key Secret the operator creates.
    create_namespace(&client, "team-ops").await;
    let mut running = Process::start(&server, "team-ops", &[]);
    running
        .wait_log("watches synced; ready", Duration::from_secs(20))
        .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "team-ops");
    assert!(
        secrets
            .get_opt("appconn-store-key")
            .await
            .unwrap()
            .is_some()
    );
    running.assert_stops("steady state", true).await;

    // The flag wins over the context.
    create_namespace(&client, "flagged").await;
    let mut flagged = Process::start(&server, "team-ops", &["--operator-namespace", "flagged"]);
    flagged
        .wait_log("watches synced; ready", Duration::from_secs(20))
        .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "flagged");
    assert!(
        secrets
            .get_opt("appconn-store-key")
            .await
            .unwrap()
            .is_some()
    );
    flagged.assert_stops("steady state, flag", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_start_up_and_while_waiting_for_crds() {
    let server = TestApiServer::start().await;
    // At once: the signal may come before the handlers exist (then the default action ends the
    // process) or just after; either way it ends promptly.
    let mut early = Process::start(&server, "default", &[]);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (took, _) = early.terminate().await;
    assert!(took < EXIT_WITHIN, "start-up: exit took {took:?}");

    // No CRDs on this server: the operator waits for them.
    let mut waiting = Process::start(&server, "default", &[]);
    waiting
        .wait_log("CRD is not installed yet", Duration::from_secs(20))
        .await;
    waiting.assert_stops("waiting for the CRDs", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_standing_by_for_the_lease() {
    let server = server_with_crds().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let held: Lease = serde_json::from_value(json!({
        "metadata": {"name": "appconn-leader", "namespace": "default"},
        "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600,
                 "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &held).await.unwrap();
    let mut standby = Process::start(&server, "default", &["--leader-elect"]);
    standby
        .wait_log(
            "the lease is held by another identity",
            Duration::from_secs(20),
        )
        .await;
    standby
        .assert_stops("standing by for the Lease", true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_initial_list_of_three_thousand_connections() {
    let server = server_with_crds().await;
    let client = server.client();
    create_namespace(&client, "busy").await;
    let connections: Api<appconn::crd::AppConnection> = Api::namespaced(client.clone(), "busy");
    let writes = (0..3000).map(|i| {
        let connections = connections.clone();
        async move {
            let conn = serde_json::from_value(json!({
                "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
                "metadata": {"name": format!("c{i}"), "namespace": "busy"},
                "spec": {"app": "postgres", "credentials": {"host": {"value": "db"}}},
            }))
            .unwrap();
            connections
                .create(&PostParams::default(), &conn)
                .await
                .unwrap();
        }
    });
    futures::stream::iter(writes)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;

    for delay in [
        Duration::ZERO,
        Duration::from_millis(20),
        Duration::from_millis(60),
        Duration::from_millis(150),
        Duration::from_millis(300),
        Duration::from_millis(1500),
    ] {
        let mut process = Process::start(&server, "busy", &[]);
        process
            .wait_log("connected to the Kubernetes API", Duration::from_secs(20))
            .await;
        tokio::time::sleep(delay).await;
        process
            .assert_stops(&format!("{delay:?} after connecting"), true)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_backend_does_not_answer() {
    let server = server_with_crds().await;
    let client = server.client();
    create_namespace(&client, "stuck").await;
    // A backend that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(0usize));
    let count = accepted.clone();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            *count.lock().unwrap() += 1;
            held.push(socket);
        }
    });
    let params = PatchParams::apply("appconn-tests");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "stuck");
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mi"},
        "stringData": {"clientId": "id", "clientSecret": "secret"},
    }))
    .unwrap();
    secrets
        .patch("mi", &params, &Patch::Apply(&secret))
        .await
        .unwrap();
    let backends: Api<appconn::crd::ConnectionBackend> = Api::namespaced(client.clone(), "stuck");
    let backend = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "ConnectionBackend",
        "metadata": {"name": "silent"},
        "spec": {"infisical": {"url": url, "auth": {"universalAuth": {
            "clientId": {"secretKeyRef": {"name": "mi", "key": "clientId"}},
            "clientSecret": {"secretKeyRef": {"name": "mi", "key": "clientSecret"}}}}}},
    }))
    .unwrap();
    backends
        .create(&PostParams::default(), &backend)
        .await
        .unwrap();
    let connections: Api<appconn::crd::AppConnection> = Api::namespaced(client.clone(), "stuck");
    let conn = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": "warehouse"},
        "spec": {"backendRef": {"kind": "ConnectionBackend", "name": "silent"},
                 "app": "mssql", "method": "username-and-password",
                 "credentials": {"host": {"value": "db"}}},
    }))
    .unwrap();
    connections
        .create(&PostParams::default(), &conn)
        .await
        .unwrap();

    let mut process = Process::start(&server, "stuck", &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while *accepted.lock().unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "the operator never called the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The backend check's login hangs; the connection's reconcile waits behind it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The request in flight is abandoned when the grace period ends.
    process
        .assert_stops("a request to the backend in flight", false)
        .await;
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_reach_the_log_as_the_servers_message_and_code() {
    let server = server_with_crds().await;
    let client = server.client();
    create_namespace(&client, "errors").await;
    // The finalizer patch fails with 404, then 409; the status write with 403. Each failure is
    // logged; the reconcile retries and the connection ends Ready.
    server.fail_next("patch", "appconnections", 404);
    server.fail_next("patch", "appconnections", 409);
    server.fail_next("patch", "appconnections/status", 403);
    let connections: Api<appconn::crd::AppConnection> = Api::namespaced(client.clone(), "errors");
    let conn = serde_json::from_value(json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": "warehouse"},
        "spec": {"app": "postgres", "credentials": {"host": {"value": "db"}}},
    }))
    .unwrap();
    connections
        .create(&PostParams::default(), &conn)
        .await
        .unwrap();
    let mut process = Process::start(&server, "errors", &[]);
    for code in [
        "(HTTP 404 NotFound)",
        "(HTTP 409 Conflict)",
        "(HTTP 403 Forbidden)",
    ] {
        process.wait_log(code, Duration::from_secs(30)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let conn = connections.get("warehouse").await.unwrap();
        let ready = conn
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not Ready after the injected failures"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failures: Vec<String> = process
        .lines()
        .into_iter()
        .filter(|l| l.contains("reconcile failed"))
        .collect();
    assert_eq!(failures.len(), 3, "{failures:#?}");
    for line in &failures {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let error = entry["error"].as_str().unwrap();
        assert!(error.contains("warehouse"), "{error}");
        assert!(!error.contains("ApiError"), "{error}");
    }
    process.assert_stops("after the failures", true).await;
}
