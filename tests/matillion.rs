//! The Matillion DPC backend against the fake Matillion server, over real HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appconn::backend::http::Timeouts;
use appconn::backend::matillion::{MatillionBackend, MatillionConfig};
use appconn::backend::{Backend, BackendError, Desired, Target};
use appconn::crd::RateLimit;
use appconn::metrics::Metrics;
use appconn::secret::{Credentials, SecretString};
use appconn_testkit::fake::matillion::{FakeMatillion, NameFilter};
use appconn_testkit::logs::{self, Capture};
use serde_json::{Value, json};

const CLIENT_ID: &str = "dpc-client-0042";
const CLIENT_SECRET: &str = "dpc-client-secret-0042";
const PROJECT: &str = "2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60";
/// A value that must never appear in an error or a log line.
const CANARY: &str = "zebra-canary-7781";
const CONNECTIONS: &str = "/dpc/v1/projects/2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60/connections";
const TOKEN: &str = "/oauth/dpc/token";

async fn fake() -> FakeMatillion {
    let fake = FakeMatillion::start().await;
    fake.add_client(CLIENT_ID, CLIENT_SECRET);
    fake.add_project(PROJECT);
    fake
}

fn secret(value: &str) -> SecretString {
    SecretString::new(value.to_owned())
}

/// The fake's URLs and project, and a rate limit high enough not to slow tests down.
fn config(fake: &FakeMatillion) -> MatillionConfig {
    let mut config = MatillionConfig::new(
        fake.url(),
        PROJECT,
        secret(CLIENT_ID),
        secret(CLIENT_SECRET),
    );
    config.token_url = Some(fake.token_url());
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

fn backend(config: MatillionConfig) -> MatillionBackend {
    MatillionBackend::new(config, Arc::new(Metrics::default())).expect("valid config")
}

fn object(value: Value) -> BTreeMap<String, Value> {
    value
        .as_object()
        .expect("an object")
        .clone()
        .into_iter()
        .collect()
}

/// A Snowflake warehouse whose password lives in AWS Secrets Manager.
fn warehouse(name: &str) -> Desired {
    Desired {
        target: Target {
            namespace: "analytics".into(),
            resource_name: name.into(),
            connection_name: name.into(),
            app: "dwh".into(),
            method: Some("generic-secret".into()),
            project: None,
        },
        description: Some("Analytics warehouse".into()),
        credentials: Credentials::new(object(
            json!({"secretName": "prod/snowflake", "secretKey": "password"}),
        )),
        settings: object(json!({
            "authProvider": "SNOWFLAKE",
            "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
        })),
        rotation: None,
        credentials_hash: "hmac-sha256:test".into(),
    }
}

fn with_credential(desired: &Desired, field: &str, value: Value) -> Desired {
    let mut fields = desired.credentials.expose().clone();
    fields.insert(field.into(), value);
    Desired {
        credentials: Credentials::new(fields),
        ..desired.clone()
    }
}

/// `(method, path)` of every request, in order, with the query for the connections route.
fn requests(fake: &FakeMatillion) -> Vec<String> {
    fake.requests()
        .into_iter()
        .map(|r| match r.query {
            Some(query) => format!("{} {}?{query}", r.method, r.path),
            None => format!("{} {}", r.method, r.path),
        })
        .collect()
}

#[tokio::test]
async fn connections_round_trip_by_name() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let desired = warehouse("warehouse");

    let created = backend.create(&desired).await.unwrap();
    let stored = fake.stored(PROJECT, "warehouse").expect("created");
    assert_eq!(created.id, stored["id"].as_str().unwrap(), "Matillion's id");
    assert_eq!(created.connection_name, "warehouse");
    assert_eq!(created.credentials_hash, None, "Matillion keeps no hash");
    assert_eq!(
        stored["connectionDetails"],
        json!({
            "description": "Analytics warehouse",
            "connectionProperties": {"secretName": "prod/snowflake", "secretKey": "password"},
            "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
        })
    );
    assert_eq!(
        (
            &stored["platformConnectionType"],
            &stored["authType"],
            &stored["authProvider"]
        ),
        (&json!("DWH"), &json!("GENERIC_SECRET"), &json!("SNOWFLAKE"))
    );

    let got = backend.get(&created.id, &desired.target).await.unwrap();
    assert_eq!(
        got.as_ref(),
        Some(&created),
        "get reads what create answered"
    );
    assert_eq!(backend.content_differs(&desired, &created), Some(false));
    let found = backend.find(&desired.target).await.unwrap();
    assert_eq!(found.as_ref(), Some(&created));

    // A new pointer and no vault location or description: the PUT carries the whole object,
    // so what is left out is unset.
    let mut changed = with_credential(&desired, "secretName", json!("prod/snowflake-2"));
    changed.settings.remove("secretsLocation");
    changed.description = None;
    assert_eq!(backend.content_differs(&changed, &created), Some(true));
    let updated = backend.update(&created.id, &changed).await.unwrap();
    assert_eq!(updated.id, created.id, "the id is kept across updates");
    let stored = fake.stored(PROJECT, "warehouse").unwrap();
    assert_eq!(
        stored["connectionDetails"],
        json!({"connectionProperties": {"secretName": "prod/snowflake-2", "secretKey": "password"}})
    );
    assert_eq!(stored["createdBy"], format!("{CLIENT_ID}@clients"));
    assert_eq!(backend.content_differs(&changed, &updated), Some(false));

    backend.delete(&created.id, &desired.target).await.unwrap();
    assert!(fake.stored_all(PROJECT).is_empty());
    assert_eq!(
        backend.get(&created.id, &desired.target).await.unwrap(),
        None
    );
    assert_eq!(backend.find(&desired.target).await.unwrap(), None);
    backend
        .delete(&created.id, &desired.target)
        .await
        .expect("gone counts as deleted");
    assert!(matches!(
        backend.update(&created.id, &desired).await,
        Err(BackendError::NotFound)
    ));

    let list = format!("GET {CONNECTIONS}?connectionNames=warehouse&page=0&size=100");
    let put = format!("PUT {CONNECTIONS}?connectionName=warehouse");
    let delete = format!("DELETE {CONNECTIONS}?connectionName=warehouse");
    assert_eq!(
        requests(&fake),
        [
            format!("POST {TOKEN}"),
            format!("POST {CONNECTIONS}"),
            list.clone(), // get
            list.clone(), // find
            list.clone(), // update: still ours?
            put,
            list.clone(), // delete: still ours?
            delete,
            list.clone(), // get
            list.clone(), // find
            list.clone(), // delete: already gone, nothing sent
            list,         // update: gone
        ],
        "one token for the whole run, and the routes of the contract"
    );
}

#[tokio::test]
async fn create_succeeds_on_201_and_200_and_a_taken_name_is_already_exists_on_409_and_400() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    for (create, duplicate) in [(201, 409), (200, 400)] {
        fake.set_create_status(create);
        fake.set_duplicate_status(duplicate);
        let name = format!("created-{create}");
        let created = backend.create(&warehouse(&name)).await.unwrap();
        assert_eq!(
            created.id,
            fake.stored(PROJECT, &name).unwrap()["id"].as_str().unwrap(),
            "{create}"
        );
        let err = backend.create(&warehouse(&name)).await.unwrap_err();
        assert!(
            matches!(&err, BackendError::AlreadyExists { name: n } if *n == name),
            "{duplicate}: {err:?}"
        );
        assert_eq!(err.reason().as_str(), "AlreadyExists");
    }
    // Someone else's connection of that name is found by name (adoption), not by id.
    let theirs = fake.insert_connection(
        PROJECT,
        json!({"name": "theirs", "platformConnectionType": "DWH", "authType": "GENERIC_SECRET"}),
    );
    let target = warehouse("theirs").target;
    assert_eq!(
        backend.find(&target).await.unwrap().map(|r| r.id),
        Some(theirs.clone())
    );
    assert_eq!(
        backend.get("another-id", &target).await.unwrap(),
        None,
        "a same-name connection with another id is not ours"
    );
    assert!(matches!(
        backend.update("another-id", &warehouse("theirs")).await,
        Err(BackendError::NotFound)
    ));
    backend.delete("another-id", &target).await.unwrap();
    let stored = fake.stored(PROJECT, "theirs").expect("left alone");
    assert_eq!(stored["id"], theirs.as_str());
    assert!(stored.get("connectionDetails").is_none(), "not updated");
    assert_eq!(fake.count("PUT", CONNECTIONS), 0);
    assert_eq!(fake.count("DELETE", CONNECTIONS), 0);
}

#[tokio::test]
async fn reads_follow_the_pages_until_the_name_shows_up() {
    let fake = fake().await;
    fake.set_page_size(2);
    let backend = backend(config(&fake));
    for name in [
        "lake-0", "lake-1", "wh-10", "wh-11", "wh-12", "wh-13", "wh-1", "lake-2",
    ] {
        backend.create(&warehouse(name)).await.unwrap();
    }
    let target = warehouse("wh-1").target;
    for (filter, pages) in [
        (NameFilter::Exact, 1),
        // wh-10 to wh-13 contain "wh-1" too and come first: wh-1 is on the third page.
        (NameFilter::Contains, 3),
        // Every connection, two a page: wh-1 is on the fourth.
        (NameFilter::Ignored, 4),
    ] {
        fake.set_name_filter(filter);
        let before = fake.count("GET", CONNECTIONS);
        let found = backend.find(&target).await.unwrap().expect("found");
        assert_eq!(found.connection_name, "wh-1", "{filter:?}");
        assert_eq!(
            found.id,
            fake.stored(PROJECT, "wh-1").unwrap()["id"]
                .as_str()
                .unwrap()
        );
        assert_eq!(fake.count("GET", CONNECTIONS) - before, pages, "{filter:?}");
    }
    // A comma would split the name in the filter: such a name is looked for unfiltered.
    fake.set_name_filter(NameFilter::Exact);
    let comma = backend.create(&warehouse("wh,eu")).await.unwrap();
    let found = backend.find(&warehouse("wh,eu").target).await.unwrap();
    assert_eq!(found.map(|r| r.id), Some(comma.id));
    let query = fake.requests().last().unwrap().query.clone().unwrap();
    assert_eq!(
        query, "page=4&size=100",
        "the ninth connection, on the fifth page"
    );

    // Not there: every page is read, then none.
    fake.set_name_filter(NameFilter::Ignored);
    let before = fake.count("GET", CONNECTIONS);
    assert_eq!(backend.find(&warehouse("wh-9").target).await.unwrap(), None);
    assert_eq!(
        fake.count("GET", CONNECTIONS) - before,
        5,
        "9 connections, 2 a page"
    );
    let last = fake.requests().last().unwrap().query.clone().unwrap();
    assert_eq!(last, "connectionNames=wh-9&page=4&size=100");
}

#[tokio::test]
async fn a_hundred_concurrent_reconciles_share_one_token_request() {
    let fake = Arc::new(fake().await);
    fake.set_latency(Duration::from_millis(30));
    let backend = Arc::new(backend(config(&fake)));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let desired = warehouse(&format!("conn-{i:03}"));
                backend.create(&desired).await?;
                backend.find(&desired.target).await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap().is_some());
    }
    assert_eq!(
        fake.token_requests(),
        1,
        "one token request in flight, shared"
    );
    assert_eq!(fake.stored_all(PROJECT).len(), 100);
    assert!(
        fake.requests().iter().all(|r| r.status < 400),
        "no request went without a token"
    );
}

#[tokio::test]
async fn tokens_are_cached_and_replaced_before_they_expire() {
    let fake = fake().await;
    fake.omit_expires_in(true);
    let backend = backend(config(&fake));
    for _ in 0..5 {
        backend.check().await.unwrap();
    }
    assert_eq!(
        fake.token_requests(),
        1,
        "no expires_in: cached for the default 30 minutes"
    );

    // Two-second tokens are replaced at 70% of their life: no request is ever refused.
    let fake = self::fake().await;
    fake.set_token_lifetime(Duration::from_secs(2));
    let backend = self::backend(config(&fake));
    backend.check().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    backend.find(&warehouse("wh").target).await.unwrap();
    assert_eq!(fake.token_requests(), 2);
    assert!(
        fake.requests().iter().all(|r| r.status != 401),
        "never sent stale"
    );
}

#[tokio::test]
async fn a_refused_token_gets_one_new_token_then_auth_failed() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let created = backend.create(&warehouse("wh")).await.unwrap();
    fake.expire_all_tokens();
    let got = backend
        .get(&created.id, &warehouse("wh").target)
        .await
        .unwrap();
    assert_eq!(got.map(|r| r.id), Some(created.id.clone()));
    assert_eq!(fake.token_requests(), 2, "one new token after the 401");

    // A server that refuses even a fresh token: one new token, then BackendAuthFailed.
    fake.set_token_lifetime(Duration::ZERO);
    fake.expire_all_tokens();
    let err = backend
        .get(&created.id, &warehouse("wh").target)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Auth { .. }), "{err:?}");
    assert_eq!(err.reason().as_str(), "BackendAuthFailed");
    assert_eq!(
        err.to_string(),
        "authentication failed: Matillion refused a freshly issued token: Access token expired"
    );
    assert_eq!(fake.token_requests(), 3);
}

#[tokio::test]
async fn a_refused_grant_is_not_retried_in_a_tight_loop() {
    let fake = fake().await;
    let mut config = config(&fake);
    config.client_secret = secret("not-the-secret");
    config.grant_cooldown = Duration::from_millis(300);
    let backend = Arc::new(backend(config));
    let start = Instant::now();
    let mut failures = 0;
    while start.elapsed() < Duration::from_millis(1300) {
        let round = (0..10).map(|i| {
            let backend = backend.clone();
            async move {
                match i % 3 {
                    0 => backend.create(&warehouse("wh")).await.map(|_| ()),
                    1 => backend.find(&warehouse("wh").target).await.map(|_| ()),
                    _ => backend.check().await,
                }
            }
        });
        for result in futures::future::join_all(round).await {
            let err = result.unwrap_err();
            assert!(matches!(err, BackendError::Auth { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with(
                    "authentication failed: Matillion token request refused (HTTP 401): \
                     access_denied: Unauthorized; next token request attempt in"
                ),
                "{text}"
            );
            failures += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures >= 100);
    // At about 0, 0.3 and 0.9 s (the next would be at 2.1 s): the cool-down doubles.
    let grants: Vec<Duration> = fake
        .requests()
        .iter()
        .filter(|r| r.path == TOKEN)
        .map(|r| r.at)
        .collect();
    assert_eq!(grants.len(), 3, "{grants:?}");
    assert!(grants[1] - grants[0] >= Duration::from_millis(300));
    assert!(grants[2] - grants[1] >= Duration::from_millis(600));
    assert_eq!(fake.count("POST", CONNECTIONS), 0);
}

#[tokio::test]
async fn what_matillion_would_refuse_never_reaches_it() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let mut unknown_type = warehouse("a");
    unknown_type.target.app = "snowflake".into();
    let mut no_method = warehouse("b");
    no_method.target.method = None;
    let mut basic = warehouse("c");
    basic.target.app = "component-basic".into();
    basic.credentials = Credentials::new(object(json!({"secretKey": "password"})));
    let mut not_a_uuid = warehouse("d");
    not_a_uuid.target.project = Some("analytics".into());
    let mut stray_setting = warehouse("e");
    stray_setting
        .settings
        .insert("gatewayId".into(), json!("g"));
    for desired in [unknown_type, no_method, basic, not_a_uuid, stray_setting] {
        let err = backend.validate(&desired).unwrap_err();
        assert!(matches!(err, BackendError::InvalidSpec { .. }), "{err:?}");
        assert_eq!(err.reason().as_str(), "InvalidSpec");
        let created = backend.create(&desired).await.unwrap_err();
        assert_eq!(created.to_string(), err.to_string());
        assert!(matches!(
            backend.update("id", &desired).await,
            Err(BackendError::InvalidSpec { .. })
        ));
    }
    assert!(fake.requests().is_empty(), "{:?}", requests(&fake));

    let err = MatillionBackend::new(
        MatillionConfig::new(fake.url(), "analytics", secret("i"), secret("s")),
        Arc::new(Metrics::default()),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "matillion.projectId must be a Matillion project UUID; got \"analytics\""
    );
    let mut bad_token_url = config(&fake);
    bad_token_url.token_url = Some("id.core.matillion.com/oauth".into());
    let err = MatillionBackend::new(bad_token_url, Arc::new(Metrics::default()))
        .err()
        .unwrap();
    assert!(err.to_string().starts_with("matillion.tokenUrl"), "{err}");
}

#[tokio::test]
async fn errors_read_as_the_servers_problem() {
    let fake = fake().await;
    let backend = backend(config(&fake));
    let mut elsewhere = warehouse("wh");
    elsewhere.target.project = Some("00000000-0000-4000-8000-000000000000".into());
    let err = backend.create(&elsewhere).await.unwrap_err();
    assert!(matches!(err, BackendError::Rejected { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "Matillion has no project 00000000-0000-4000-8000-000000000000 that this API client \
         can see: Project 00000000-0000-4000-8000-000000000000 not found"
    );
    let err = backend.find(&elsewhere.target).await.unwrap_err();
    assert_eq!(err.reason().as_str(), "BackendRejected");

    for status in [500, 503] {
        fake.fail_next(1, status);
        let err = backend.create(&warehouse("wh")).await.unwrap_err();
        assert!(err.is_transient(), "{status}: {err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "backend unavailable: Matillion answered HTTP {status}"
            )),
            "{err}"
        );
    }
    backend.create(&warehouse("wh")).await.expect("recovers");

    let mut slow = config(&fake);
    slow.timeouts.total = Duration::from_millis(200);
    let slow = self::backend(slow);
    fake.set_latency(Duration::from_millis(500));
    let err = slow.check().await.unwrap_err();
    assert_eq!(err.to_string(), "backend unavailable: request timed out");
    fake.set_latency(Duration::ZERO);
}

#[tokio::test]
async fn a_429_pauses_every_request_for_its_retry_after() {
    let fake = fake().await;
    let backend = Arc::new(backend(config(&fake)));
    backend.check().await.unwrap();
    // Three in a row: the client sends a throttled request twice more, after each pause, before
    // it reports the throttle.
    fake.fail_next(3, 429);
    let err = backend.find(&warehouse("wh").target).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert!(
        err.to_string().contains("rate limited by Matillion"),
        "{err}"
    );
    // Other callers wait out the pause instead of hitting the server.
    let start = Instant::now();
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let backend = backend.clone();
            tokio::spawn(async move { backend.create(&warehouse(&format!("wh-{i}"))).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    let requests = fake.requests();
    let violations =
        appconn_testkit::fake::server::retry_after_violations(&requests, Duration::ZERO);
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test]
async fn the_default_rate_is_one_request_a_second_with_a_burst_of_five() {
    let fake = fake().await;
    let mut config = config(&fake);
    config.rate_limit = None;
    let backend = backend(config);
    let start = Instant::now();
    // A token request and six reads: the burst of five, then one a second.
    for _ in 0..6 {
        backend.find(&warehouse("wh").target).await.unwrap();
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_millis(3000),
        "{elapsed:?}"
    );
    let excess = appconn_testkit::fake::server::rate_excess(&fake.requests(), 1.0, 5.0);
    assert!(excess < 1.0, "faster than 1/s burst 5: {excess}");
}

#[tokio::test]
async fn check_gets_a_token_and_reads_the_project() {
    let fake = fake().await;
    let metrics = Arc::new(Metrics::default());
    let backend = MatillionBackend::new(config(&fake), metrics.clone()).unwrap();
    assert_eq!(backend.provider(), "matillion");
    backend.check().await.unwrap();
    assert_eq!(
        requests(&fake),
        [
            format!("POST {TOKEN}"),
            format!("GET {CONNECTIONS}?page=0&size=1")
        ]
    );
    assert!(fake.requests()[1].bearer && !fake.requests()[0].bearer);
    let text = metrics.encode();
    for op in ["token", "check"] {
        let line = format!("backend=\"matillion\",operation=\"{op}\"");
        assert!(text.contains(&line), "{op} missing from:\n{text}");
    }

    let mut config = config(&fake);
    config.project_id = "00000000-0000-4000-8000-000000000000".into();
    let err = self::backend(config).check().await.unwrap_err();
    assert_eq!(err.reason().as_str(), "BackendRejected");
    assert!(err.to_string().contains("Project 00000000"), "{err}");
}

/// The canary as the client secret and inside the token, through every failure path: never
/// in an error, its Debug form, or a log line at any level.
#[tokio::test]
async fn the_canary_never_appears_in_an_error_or_a_log_line() {
    if !logs::alone("the_canary_never_appears_in_an_error_or_a_log_line") {
        return;
    }
    let logs = Capture::start();
    let fake = fake().await;
    fake.add_client(CLIENT_ID, CANARY);
    fake.set_token_prefix(CANARY);
    let mut canary = config(&fake);
    canary.client_secret = secret(CANARY);
    let backend = self::backend(canary.clone());
    let mut errors: Vec<BackendError> = Vec::new();

    let created = backend.create(&warehouse("wh")).await.unwrap();
    errors.push(backend.create(&warehouse("wh")).await.unwrap_err());
    fake.expire_all_tokens();
    fake.set_token_lifetime(Duration::ZERO);
    errors.push(
        backend
            .get(&created.id, &warehouse("wh").target)
            .await
            .unwrap_err(),
    );
    fake.set_token_lifetime(Duration::from_secs(1800));
    fake.fail_next(1, 500);
    errors.push(backend.check().await.unwrap_err());
    fake.fail_next(3, 429);
    errors.push(backend.find(&warehouse("wh").target).await.unwrap_err());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The client secret rotated at Matillion: the canary is refused.
    fake.add_client(CLIENT_ID, "rotated");
    let refused = self::backend(canary.clone());
    let err = refused.check().await.unwrap_err();
    assert!(err.to_string().contains("refused (HTTP 401)"), "{err}");
    errors.push(err);
    errors.push(refused.create(&warehouse("wh2")).await.unwrap_err());

    for err in &errors {
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(CANARY), "{shown}");
    }
    let shown = format!("{canary:?} {created:?}");
    assert!(!shown.contains(CANARY), "{shown}");
    let logged = logs.text();
    assert!(
        logged.contains("Matillion token request refused"),
        "logs were captured:\n{logged}"
    );
    assert!(!logged.contains(CANARY), "{logged}");
}
