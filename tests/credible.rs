//! The Credible backend against the fake Credible server, over real HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use appconn::backend::credible::{CredibleBackend, CredibleConfig};
use appconn::backend::http::Timeouts;
use appconn::backend::{Backend, BackendError, Desired, Remote, Target};
use appconn::crd::RateLimit;
use appconn::metrics::Metrics;
use appconn::secret::{Credentials, SecretString};
use appconn_testkit::fake::credible::{ErrorShape, FakeCredible};
use appconn_testkit::logs::{self, Capture};
use serde_json::{Value, json};

const PROJECT: &str = "analytics";
/// A value that must never appear in an error or a log line, whatever fails.
const CANARY: &str = "zebra-canary-7781";
const TOKEN: &str = "credible-api-token-0042";

async fn fake() -> FakeCredible {
    let fake = FakeCredible::start().await;
    fake.add_project(PROJECT);
    fake
}

/// The fake's URL and project, no token, and a rate limit high enough not to slow tests down.
fn config(fake: &FakeCredible) -> CredibleConfig {
    let mut config = CredibleConfig::new(fake.url(), PROJECT);
    config.rate_limit = Some(RateLimit {
        requests_per_second: 1000,
        burst: Some(1000),
        min_requests_per_second: None,
    });
    config.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        total: Duration::from_secs(5),
    };
    config
}

fn backend(config: CredibleConfig) -> CredibleBackend {
    CredibleBackend::new(config, Arc::new(Metrics::default())).expect("valid config")
}

fn desired(app: &str, name: &str, credentials: Value) -> Desired {
    let fields: BTreeMap<String, Value> = credentials
        .as_object()
        .expect("an object")
        .clone()
        .into_iter()
        .collect();
    Desired {
        target: Target {
            namespace: "analytics".into(),
            resource_name: name.into(),
            connection_name: name.into(),
            app: app.into(),
            method: None,
            project: None,
        },
        description: None,
        credentials: Credentials::new(fields),
        settings: BTreeMap::new(),
        rotation: None,
        credentials_hash: "hmac-sha256:test".into(),
    }
}

fn postgres(name: &str, password: &str) -> Desired {
    desired(
        "postgres",
        name,
        json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
               "userName": "etl", "password": password}),
    )
}

/// One connection of each type, with the block it must arrive as.
fn every_type() -> Vec<(Desired, Value)> {
    let key = r#"{"type":"service_account","private_key":"k"}"#;
    let attached = json!([{"name": "lake", "type": "gcs",
                           "gcsConnection": {"keyId": "GOOG1E", "secret": "gcs-secret-1"}}]);
    vec![
        (
            postgres("warehouse", "pg-secret-1"),
            json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
                   "userName": "etl", "password": "pg-secret-1"}),
        ),
        (
            desired(
                "bigquery",
                "lake",
                json!({"defaultProjectId": "acme", "location": "EU",
                       "serviceAccountKeyJson": key, "maximumBytesBilled": 1000000}),
            ),
            json!({"defaultProjectId": "acme", "location": "EU",
                   "serviceAccountKeyJson": key, "maximumBytesBilled": "1000000"}),
        ),
        (
            desired(
                "snowflake",
                "snow",
                json!({"account": "acme-xy12345", "username": "ANALYST", "password": "sf-secret-1",
                       "warehouse": "COMPUTE_WH", "responseTimeoutMilliseconds": "30000"}),
            ),
            json!({"account": "acme-xy12345", "username": "ANALYST", "password": "sf-secret-1",
                   "warehouse": "COMPUTE_WH", "responseTimeoutMilliseconds": 30000}),
        ),
        (
            desired(
                "trino",
                "trino_main",
                json!({"server": "https://trino.internal", "port": 443, "catalog": "hive",
                       "user": "etl", "password": "trino-secret-1"}),
            ),
            json!({"server": "https://trino.internal", "port": 443, "catalog": "hive",
                   "user": "etl", "password": "trino-secret-1"}),
        ),
        (
            desired(
                "mysql",
                "shop",
                json!({"host": "mysql.internal", "port": "3306", "database": "shop",
                       "user": "reader", "password": "mysql-secret-1"}),
            ),
            json!({"host": "mysql.internal", "port": 3306, "database": "shop",
                   "user": "reader", "password": "mysql-secret-1"}),
        ),
        (
            desired(
                "duckdb",
                "local_duck",
                json!({"attachedDatabases": attached}),
            ),
            json!({"attachedDatabases": attached}),
        ),
        (
            desired(
                "motherduck",
                "md",
                json!({"accessToken": "md-token-1", "database": "analytics"}),
            ),
            json!({"accessToken": "md-token-1", "database": "analytics"}),
        ),
    ]
}

/// The same connection with one credential field changed.
fn with_credential(desired: &Desired, field: &str, value: Value) -> Desired {
    let mut fields = desired.credentials.expose().clone();
    fields.insert(field.into(), value);
    Desired {
        credentials: Credentials::new(fields),
        ..desired.clone()
    }
}

fn id(name: &str) -> String {
    format!("projects/{PROJECT}/connections/{name}")
}

#[tokio::test]
async fn every_type_round_trips() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    for (desired, block) in every_type() {
        let (app, name) = (&desired.target.app, &desired.target.connection_name);
        let created = backend.create(&desired).await.unwrap();
        assert_eq!(created.id, id(name), "{app}: the path is the identity");
        assert_eq!(&created.connection_name, name);
        let stored = fake.stored(PROJECT, name).expect("stored under its name");
        assert_eq!(
            stored["name"],
            name.as_str(),
            "{app}: body name is the path name"
        );
        assert_eq!(stored["type"], app.as_str());
        assert_eq!(stored[format!("{app}Connection")], block, "{app}");
        assert_eq!(
            stored["resource"],
            format!("/api/v0/projects/{PROJECT}/connections/{name}"),
            "{app}: resource is the server's"
        );

        let got = backend.get(&created.id, &desired.target).await.unwrap();
        let got = got.expect("get finds it");
        assert_eq!((&got.id, &got.connection_name), (&created.id, name));
        assert_eq!(
            backend.content_differs(&desired, &got),
            Some(false),
            "{app}: read back as written"
        );
        let found = backend.find(&desired.target).await.unwrap().unwrap();
        assert_eq!(found, got, "{app}: find");

        backend.delete(&created.id, &desired.target).await.unwrap();
        assert!(fake.stored(PROJECT, name).is_none(), "{app}: deleted");
        assert!(
            backend
                .get(&created.id, &desired.target)
                .await
                .unwrap()
                .is_none()
        );
        backend
            .delete(&created.id, &desired.target)
            .await
            .expect("a connection already gone counts as deleted");
    }
    assert_eq!(fake.count("POST", "/api/v0/projects/"), 7);
}

#[tokio::test]
async fn a_patch_carries_the_whole_block() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let first = postgres("warehouse", "first-password");
    let created = backend.create(&first).await.unwrap();
    // Someone adds a field and changes the host: the PATCH replaces the whole block.
    fake.edit_connection(
        PROJECT,
        "warehouse",
        json!({"postgresConnection": {"host": "elsewhere", "connectionString": "postgres://x"}}),
    );
    let second = with_credential(&first, "password", json!("second-password"));
    let updated = backend.update(&created.id, &second).await.unwrap();
    assert_eq!(updated.id, created.id);
    let stored = fake.stored(PROJECT, "warehouse").unwrap();
    assert_eq!(
        stored["postgresConnection"],
        json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
               "userName": "etl", "password": "second-password"})
    );
    let got = backend
        .get(&created.id, &second.target)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(backend.content_differs(&second, &got), Some(false));
    assert_eq!(
        backend.content_differs(&first, &got),
        Some(true),
        "the old password is a difference"
    );

    fake.delete_connection(PROJECT, "warehouse");
    let err = backend.update(&created.id, &second).await.unwrap_err();
    assert!(matches!(err, BackendError::NotFound), "{err:?}");
}

#[tokio::test]
async fn drift_is_read_from_the_content_and_stripped_secrets_are_no_drift() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    for (desired, _) in every_type() {
        let app = desired.target.app.clone();
        let created = backend.create(&desired).await.unwrap();
        let read = || async {
            backend
                .get(&created.id, &desired.target)
                .await
                .unwrap()
                .unwrap()
        };

        fake.strip_secrets(true);
        let stripped = read().await;
        assert_eq!(
            backend.content_differs(&desired, &stripped),
            Some(false),
            "{app}: a hosted server's stripped secrets are no difference"
        );
        fake.strip_secrets(false);

        let name = &desired.target.connection_name;
        let block = format!("{app}Connection");
        let written = fake.stored(PROJECT, name).unwrap()[&block].clone();
        let mut edited = written.clone();
        edited["extra"] = json!("added outside");
        fake.edit_connection(PROJECT, name, json!({ block.clone(): edited }));
        assert_eq!(
            backend.content_differs(&desired, &read().await),
            Some(true),
            "{app}: a field added outside"
        );
        fake.edit_connection(PROJECT, name, json!({ block.clone(): written }));
        assert_eq!(
            backend.content_differs(&desired, &read().await),
            Some(false)
        );
        fake.edit_connection(
            PROJECT,
            &desired.target.connection_name,
            json!({"type": "postgres"}),
        );
        let retyped = read().await;
        assert_eq!(
            backend.content_differs(&desired, &retyped),
            Some(app != "postgres"),
            "{app}: a type changed outside"
        );
    }
}

#[tokio::test]
async fn paths_follow_the_configured_segment_and_the_recorded_id() {
    let fake = fake().await;
    fake.add_project("other");
    let mut config = config(&fake);
    config.path_segment = Some("environments".into());
    let backend = backend(config);
    let mut desired = postgres("warehouse", "p4ssword");
    desired.target.project = Some("other".into());
    let created = backend.create(&desired).await.unwrap();
    assert_eq!(created.id, "environments/other/connections/warehouse");
    assert!(
        fake.stored("other", "warehouse").is_some(),
        "spec.project wins"
    );
    assert!(fake.stored(PROJECT, "warehouse").is_none());

    // The recorded path addresses the object even where the target's project is another.
    desired.target.project = None;
    assert!(
        backend
            .get(&created.id, &desired.target)
            .await
            .unwrap()
            .is_some()
    );
    backend.delete(&created.id, &desired.target).await.unwrap();
    assert!(fake.stored("other", "warehouse").is_none());
    let paths: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with("/api/v0/environments/other/connections/warehouse")),
        "{paths:?}"
    );

    let mut bad = self::config(&fake);
    bad.path_segment = Some("workspaces".into());
    let err = CredibleBackend::new(bad, Arc::new(Metrics::default()))
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "credible.pathSegment must be \"projects\" or \"environments\", got \"workspaces\""
    );
}

#[tokio::test]
async fn a_taken_name_is_already_exists_whether_answered_500_or_409() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    backend
        .create(&postgres("warehouse", "p4ssword"))
        .await
        .unwrap();
    for (status, shape) in [
        (500, ErrorShape::CodeMessage),
        (409, ErrorShape::CodeMessage),
        (500, ErrorShape::MessageDetails),
        (500, ErrorShape::Error),
    ] {
        fake.set_duplicate_status(status);
        fake.set_error_shape(shape);
        let err = backend
            .create(&postgres("warehouse", "other"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackendError::AlreadyExists { name } if name == "warehouse"),
            "{status} {shape:?}: {err:?}"
        );
    }
    assert_eq!(
        fake.stored(PROJECT, "warehouse").unwrap()["postgresConnection"]["password"],
        "p4ssword",
        "untouched"
    );
}

#[tokio::test]
async fn a_missing_project_is_rejected_with_credibles_message() {
    let fake = FakeCredible::start().await;
    let backend = backend(config(&fake));
    let desired = postgres("warehouse", "p4ssword");
    let err = backend.create(&desired).await.unwrap_err();
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
    assert!(!err.is_transient(), "not a retry loop");
    assert_eq!(
        err.to_string(),
        "Credible project \"analytics\" does not exist: Environment \"analytics\" not found in \
         database"
    );
    let err = backend
        .update(&id("warehouse"), &desired)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
    let err = backend
        .delete(&id("warehouse"), &desired.target)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Rejected { .. }),
        "a finalizer is not dropped on a guess: {err:?}"
    );
    assert!(
        backend
            .get(&id("warehouse"), &desired.target)
            .await
            .unwrap()
            .is_none()
    );
    assert!(backend.find(&desired.target).await.unwrap().is_none());

    let err = backend.check().await.unwrap_err();
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "Credible has no project \"analytics\" (projects): Environment \"analytics\" could not \
         be resolved to a path"
    );
}

#[tokio::test]
async fn check_reads_the_project_with_the_token() {
    let fake = fake().await;
    fake.require_token(Some(TOKEN));
    let mut with_token = config(&fake);
    with_token.token = Some(SecretString::new(TOKEN.into()));
    let backend = backend(with_token.clone());
    backend.check().await.unwrap();
    backend
        .create(&postgres("warehouse", "p4ssword"))
        .await
        .unwrap();
    let requests = fake.requests();
    assert_eq!(requests[0].path, "/api/v0/projects/analytics/connections");
    assert!(requests.iter().all(|r| r.bearer && r.status < 300));

    // A wrong token: refused once, reported, never retried (no fresh token can differ).
    let before = fake.requests().len();
    let mut wrong = with_token.clone();
    wrong.token = Some(SecretString::new(CANARY.into()));
    let err = self::backend(wrong).check().await.unwrap_err();
    assert!(matches!(err, BackendError::Auth { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "authentication failed: Credible refused the configured token: Unauthorized"
    );
    assert_eq!(fake.requests().len(), before + 1, "one request, no retry");

    // No token for a server that wants one: said so.
    let err = self::backend(config(&fake)).check().await.unwrap_err();
    assert!(matches!(err, BackendError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("credible.token"), "{err}");

    // A URL without the API base: no such route, not a missing project.
    let mut no_api = with_token;
    no_api.url = fake.origin();
    let err = self::backend(no_api).check().await.unwrap_err();
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
    assert!(err.to_string().contains("ending in /api/v0"), "{err}");
}

#[tokio::test]
async fn refusals_carry_credibles_message_in_every_shape() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let created = backend
        .create(&postgres("warehouse", "p4ssword"))
        .await
        .unwrap();
    fake.freeze_config(true);
    for shape in [
        ErrorShape::CodeMessage,
        ErrorShape::MessageDetails,
        ErrorShape::Error,
    ] {
        fake.set_error_shape(shape);
        let desired = postgres("warehouse", "changed");
        for err in [
            backend.create(&postgres("other", "x")).await.unwrap_err(),
            backend.update(&created.id, &desired).await.unwrap_err(),
            backend
                .delete(&created.id, &desired.target)
                .await
                .unwrap_err(),
        ] {
            assert!(
                matches!(err, BackendError::Rejected { .. }),
                "{shape:?}: {err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with("Publisher config can't be updated"),
                "{shape:?}: {err}"
            );
        }
    }
    fake.freeze_config(false);
    assert!(fake.stored(PROJECT, "other").is_none());
    assert_eq!(
        fake.stored(PROJECT, "warehouse").unwrap()["postgresConnection"]["password"],
        "p4ssword"
    );
}

#[tokio::test]
async fn bad_input_is_refused_before_any_call() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let mut unknown = postgres("warehouse", "p4ssword");
    unknown.settings.insert("sslmode".into(), json!("require"));
    let mut hyphen = postgres("warehouse-prod", "p4ssword");
    hyphen.target.connection_name = "warehouse-prod".into();
    let reserved = desired("duckdb", "duckdb", json!({"attachedDatabases": []}));
    let mut method = postgres("warehouse", "p4ssword");
    method.target.method = Some("username-and-password".into());
    for (what, desired, message) in [
        ("unknown field", unknown, "has no field \"sslmode\""),
        ("hyphen", hyphen, "^[A-Za-z0-9_]+$"),
        ("reserved name", reserved, "\"duckdb\" is reserved"),
        ("method", method, "remove spec.method"),
    ] {
        assert!(backend.validate(&desired).is_err(), "{what}");
        for err in [
            backend.create(&desired).await.unwrap_err(),
            backend
                .update(&id("warehouse"), &desired)
                .await
                .unwrap_err(),
        ] {
            assert!(
                matches!(err, BackendError::InvalidSpec { .. }),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains(message), "{what}: {err}");
        }
    }
    assert!(fake.requests().is_empty(), "nothing reached the server");
}

#[tokio::test]
async fn transient_failures_are_unavailable() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    backend.check().await.unwrap();
    for status in [500, 502, 503] {
        fake.fail_next(1, status);
        let err = backend
            .create(&postgres("warehouse", "p4ssword"))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{status}: {err:?}");
        assert!(
            err.to_string()
                .contains(&format!("Credible answered HTTP {status}")),
            "{err}"
        );
    }
    backend
        .create(&postgres("warehouse", "p4ssword"))
        .await
        .expect("recovers");

    // A 429 names its pause.
    let limited = self::backend(config(&fake));
    fake.rate_limit_storm(1.0, Duration::from_secs(5), 2);
    let err = limited
        .find(&postgres("warehouse", "x").target)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    assert!(
        err.to_string().contains("rate limited by Credible"),
        "{err}"
    );
    fake.rate_limit_storm(0.0, Duration::ZERO, 0);

    let mut slow = config(&fake);
    slow.timeouts = Timeouts {
        connect: Duration::from_secs(1),
        total: Duration::from_millis(200),
    };
    fake.set_latency(Duration::from_millis(500));
    let err = self::backend(slow).check().await.unwrap_err();
    assert_eq!(err.to_string(), "backend unavailable: request timed out");
    fake.set_latency(Duration::ZERO);

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut refused = config(&fake);
    refused.url = format!("http://{closed}/api/v0");
    let err = self::backend(refused).check().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn the_connection_test_reads_the_verdict_and_redacts_it() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let desired = postgres("warehouse", CANARY);
    let passed = backend.test_connection(&desired).await.unwrap().unwrap();
    assert!(passed.ok);

    fake.set_test_result(Some(&format!(
        "password authentication failed for user \"etl\" with password {CANARY}"
    )));
    let failed = backend.test_connection(&desired).await.unwrap().unwrap();
    assert!(!failed.ok);
    assert_eq!(
        failed.message,
        "password authentication failed for user \"etl\" with password [REDACTED]"
    );
    let tested = fake.tested();
    assert_eq!(tested.len(), 2);
    assert_eq!(
        tested[1],
        json!({"name": "warehouse", "type": "postgres", "postgresConnection": {
            "host": "db.internal", "port": 5432, "databaseName": "sales",
            "userName": "etl", "password": CANARY}}),
        "the test gets the connection as it is written"
    );
    assert!(
        fake.stored_all(PROJECT).is_empty(),
        "testing writes nothing"
    );
    assert_eq!(fake.count("POST", "/api/v0/connections/test"), 2);
}

#[tokio::test]
async fn requests_are_measured_by_operation() {
    let fake = fake().await;
    let metrics = Arc::new(Metrics::default());
    let backend = CredibleBackend::new(config(&fake), metrics.clone()).unwrap();
    assert_eq!(backend.provider(), "credible");
    let desired = postgres("warehouse", "p4ssword");
    backend.check().await.unwrap();
    let created = backend.create(&desired).await.unwrap();
    backend.get(&created.id, &desired.target).await.unwrap();
    backend.test_connection(&desired).await.unwrap();
    let text = metrics.encode();
    for op in ["check", "create", "get", "test"] {
        let line = format!("backend=\"credible\",operation=\"{op}\"");
        assert!(text.contains(&line), "{op} missing from:\n{text}");
    }
}

/// The canary as a password that every GET returns in clear, through reads, drift checks,
/// writes and every failure: never in an error, a Debug form, or a log line at any level.
#[tokio::test]
async fn the_canary_never_appears_in_an_error_or_a_log() {
    if !logs::alone("the_canary_never_appears_in_an_error_or_a_log") {
        return;
    }
    let logs = Capture::start();
    let fake = fake().await;
    let backend = backend(config(&fake));
    let desired = postgres("warehouse", CANARY);
    let mut shown: Vec<String> = Vec::new();

    let created = backend.create(&desired).await.unwrap();
    let got: Remote = backend
        .get(&created.id, &desired.target)
        .await
        .unwrap()
        .unwrap();
    assert!(
        fake.stored(PROJECT, "warehouse")
            .unwrap()
            .to_string()
            .contains(CANARY),
        "the server does hold the canary in clear"
    );
    assert_eq!(backend.content_differs(&desired, &got), Some(false));
    shown.push(format!("{got:?} {desired:?}"));
    let found = backend.find(&desired.target).await.unwrap();
    shown.push(format!("{found:?}"));

    fake.set_test_result(Some(&format!("FATAL: password {CANARY} refused")));
    shown.push(format!("{:?}", backend.test_connection(&desired).await));
    shown.push(format!("{:?}", backend.create(&desired).await));
    fake.freeze_config(true);
    shown.push(format!("{:?}", backend.update(&created.id, &desired).await));
    fake.freeze_config(false);
    fake.fail_next(1, 503);
    shown.push(format!("{:?}", backend.update(&created.id, &desired).await));
    let bad = with_credential(&desired, "port", json!(CANARY));
    shown.push(format!("{:?}", backend.create(&bad).await));
    let mut unknown = desired.clone();
    unknown.settings.insert("sslmode".into(), json!(CANARY));
    shown.push(format!("{:?}", backend.create(&unknown).await));
    fake.set_error_shape(ErrorShape::Error);
    fake.delete_connection(PROJECT, "warehouse");
    shown.push(format!("{:?}", backend.update(&created.id, &desired).await));

    let shown = shown.join("\n");
    assert!(shown.contains("[REDACTED]"), "{shown}");
    assert!(!shown.contains(CANARY), "a secret value was shown: {shown}");
    let logs = logs.text();
    assert!(logs.contains("credible"), "the capture works: {logs}");
    assert!(!logs.contains(CANARY), "a secret value was logged");
}
