//! The fake backends and their shared harness, through real HTTP.

use std::time::{Duration, Instant};

use appconn_testkit::fake::credible::{ErrorShape, FakeCredible};
use appconn_testkit::fake::infisical::FakeInfisical;
use appconn_testkit::fake::matillion::{AUDIENCE, FakeMatillion, NameFilter};
use appconn_testkit::fake::server::{RateLimit, Spread};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

/// A plain-HTTP client; reqwest is built without a crypto provider of its own.
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// An answer, read whole.
struct Answer {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.text))
    }

    fn retry_after(&self) -> Option<&str> {
        self.headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok())
    }
}

async fn send(request: RequestBuilder) -> Answer {
    let response = request.send().await.expect("the fake answers");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        text: response.text().await.expect("a body"),
    }
}

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).expect("an HTTP method")
}

/// `method base+path`, with `body` as JSON when given.
async fn call(base: &str, name: &str, path: &str, body: Option<Value>) -> Answer {
    let mut request = http().request(method(name), format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request).await
}

// ---------------------------------------------------------------------------------------------
// Credible Data

const P: &str = "p";

fn postgres(name: &str) -> Value {
    json!({
        "name": name,
        "type": "postgres",
        "postgresConnection": {
            "host": "db.internal", "port": 5432, "databaseName": "warehouse",
            "userName": "etl", "password": "pg-canary",
            "connectionString": "postgres://etl:pg-canary@db.internal/warehouse",
        },
    })
}

async fn credible() -> FakeCredible {
    let fake = FakeCredible::start().await;
    fake.add_project(P);
    fake
}

async fn cd(fake: &FakeCredible, name: &str, path: &str, body: Option<Value>) -> Answer {
    call(&fake.url(), name, path, body).await
}

#[tokio::test]
async fn credible_routes_answer_alike_under_projects_and_environments() {
    let fake = credible().await;
    assert!(fake.url().ends_with("/api/v0"));
    let created = cd(
        &fake,
        "POST",
        "/projects/p/connections/pg1",
        Some(postgres("pg1")),
    )
    .await;
    assert_eq!(created.status, 201);
    assert_eq!(
        created.json(),
        json!({"message": "Connection \"pg1\" created successfully"})
    );
    let created = cd(
        &fake,
        "POST",
        "/environments/p/connections/pg2",
        Some(postgres("pg2")),
    )
    .await;
    assert_eq!(created.status, 201);

    let one = cd(&fake, "GET", "/environments/p/connections/pg1", None).await;
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(one["name"], "pg1");
    assert_eq!(one["postgresConnection"]["password"], "pg-canary");
    assert_eq!(one["attributes"]["dialectName"], "postgres");
    assert_eq!(
        one,
        cd(&fake, "GET", "/projects/p/connections/pg1", None)
            .await
            .json()
    );

    let list = cd(&fake, "GET", "/projects/p/connections", None).await;
    assert_eq!(list.status, 200);
    let list = list.json();
    let names: Vec<&str> = list
        .as_array()
        .expect("a plain array")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pg1", "pg2"]);
    assert_eq!(
        list,
        cd(&fake, "GET", "/environments/p/connections", None)
            .await
            .json()
    );

    let deleted = cd(&fake, "DELETE", "/environments/p/connections/pg1", None).await;
    assert_eq!(
        (deleted.status, deleted.json()),
        (
            200,
            json!({"message": "Connection \"pg1\" deleted successfully"})
        )
    );
    assert_eq!(fake.stored(P, "pg1"), None);
    assert_eq!(fake.stored_all(P).len(), 1);
}

#[tokio::test]
async fn credible_patch_replaces_whole_blocks_and_keeps_the_old_type_beside_a_new_one() {
    let fake = credible().await;
    cd(
        &fake,
        "POST",
        "/projects/p/connections/pg1",
        Some(postgres("pg1")),
    )
    .await;
    let patched = cd(
        &fake,
        "PATCH",
        "/projects/p/connections/pg1",
        Some(json!({"postgresConnection": {"password": "x"}})),
    )
    .await;
    assert_eq!(
        (patched.status, patched.json()),
        (
            200,
            json!({"message": "Connection \"pg1\" updated successfully"})
        )
    );
    let stored = fake.stored(P, "pg1").unwrap();
    assert_eq!(
        stored["postgresConnection"],
        json!({"password": "x"}),
        "host, port, database and user are lost"
    );
    assert_eq!(stored["name"], "pg1");

    let snowflake = json!({
        "type": "snowflake",
        "snowflakeConnection": {"account": "acme", "username": "u", "password": "sf"},
    });
    let patched = cd(
        &fake,
        "PATCH",
        "/projects/p/connections/pg1",
        Some(snowflake),
    )
    .await;
    assert_eq!(patched.status, 200);
    let stored = fake.stored(P, "pg1").unwrap();
    assert_eq!(stored["type"], "snowflake");
    assert_eq!(stored["postgresConnection"], json!({"password": "x"}));
    assert_eq!(stored["snowflakeConnection"]["account"], "acme");
    assert_eq!(stored["attributes"]["dialectName"], "snowflake");
}

#[tokio::test]
async fn credible_create_quirks() {
    let fake = credible().await;
    let path = "/projects/p/connections/pg1";
    assert_eq!(
        cd(&fake, "POST", path, Some(postgres("pg1"))).await.status,
        201
    );

    let again = cd(&fake, "POST", path, Some(postgres("pg1"))).await;
    assert_eq!(
        (again.status, again.json()["message"].as_str()),
        (
            500,
            Some("Connection \"pg1\" already exists in environment \"p\".")
        )
    );
    fake.set_duplicate_status(409);
    assert_eq!(
        cd(&fake, "POST", path, Some(postgres("pg1"))).await.status,
        409
    );

    let mut nameless = postgres("x");
    nameless.as_object_mut().unwrap().remove("name");
    let answer = cd(&fake, "POST", "/projects/p/connections/x", Some(nameless)).await;
    assert_eq!(
        (answer.status, answer.json()),
        (
            500,
            json!({"code": 500, "message": "Invalid connection configuration. No name."})
        )
    );

    let answer = cd(
        &fake,
        "POST",
        "/projects/p/connections/by_path",
        Some(postgres("by_body")),
    )
    .await;
    assert_eq!(answer.status, 201);
    assert!(fake.stored(P, "by_path").is_none());
    assert_eq!(fake.stored(P, "by_body").unwrap()["name"], "by_body");

    let mut typeless = postgres("t");
    typeless.as_object_mut().unwrap().remove("type");
    let answer = cd(&fake, "POST", "/projects/p/connections/t", Some(typeless)).await;
    assert_eq!(answer.status, 400);
    let mut oracle = postgres("o");
    oracle["type"] = json!("oracle");
    assert_eq!(
        cd(&fake, "POST", "/projects/p/connections/o", Some(oracle))
            .await
            .status,
        400
    );
    let answer = cd(
        &fake,
        "POST",
        "/projects/p/connections/duckdb",
        Some(postgres("duckdb")),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("duckdb"), "{}", answer.text);

    let malformed = send(
        http()
            .post(format!("{}/projects/p/connections/m", fake.url()))
            .header(CONTENT_TYPE, "application/json")
            .body("{\"name\": \"m\","),
    )
    .await;
    assert_eq!(malformed.status, 500);
    assert_eq!(malformed.json()["code"], 500);
    let not_json = send(
        http()
            .post(format!("{}/projects/p/connections/m", fake.url()))
            .body(postgres("m").to_string()),
    )
    .await;
    assert_eq!(
        (not_json.status, not_json.json()["message"].as_str()),
        (500, Some("Invalid connection configuration. No name.")),
        "without a JSON content type the body is not read"
    );

    let mut computed = postgres("hyphen-ok");
    computed["attributes"] = json!({"dialectName": "bogus"});
    computed["resource"] = json!("/somewhere/else");
    let answer = cd(
        &fake,
        "POST",
        "/projects/p/connections/hyphen-ok",
        Some(computed),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    let stored = fake.stored(P, "hyphen-ok").unwrap();
    assert_eq!(stored["attributes"]["dialectName"], "postgres");
    assert_eq!(stored["resource"], "/somewhere/else");
    assert_eq!(
        fake.stored(P, "by_body").unwrap()["resource"],
        "/api/v0/projects/p/connections/by_body"
    );
    for bad in ["a.b", "a%20b"] {
        let answer = cd(
            &fake,
            "POST",
            &format!("/projects/p/connections/{bad}"),
            Some(postgres("a")),
        )
        .await;
        assert_eq!(answer.status, 400, "{bad}");
    }
    assert_eq!(fake.stored_all(P).len(), 3);
}

#[tokio::test]
async fn credible_unknown_projects_and_connections() {
    let fake = credible().await;
    for path in ["/projects/nope/connections", "/projects/nope/connections/c"] {
        let answer = cd(&fake, "GET", path, None).await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(
            answer.json()["message"],
            "Environment \"nope\" could not be resolved to a path"
        );
    }
    for (name, body) in [
        ("POST", Some(postgres("c"))),
        ("PATCH", Some(json!({"type": "postgres"}))),
        ("DELETE", None),
    ] {
        let answer = cd(&fake, name, "/environments/nope/connections/c", body).await;
        assert_eq!(answer.status, 500, "{name}");
        assert_eq!(
            answer.json()["message"],
            "Environment \"nope\" not found in database"
        );
    }

    let answer = cd(&fake, "GET", "/projects/p/connections/pg1", None).await;
    assert_eq!(
        (answer.status, answer.json()),
        (
            404,
            json!({"code": 404, "message": "Connection pg1 not found"})
        )
    );
    for (name, body) in [
        ("PATCH", Some(json!({"type": "postgres"}))),
        ("DELETE", None),
    ] {
        let answer = cd(&fake, name, "/projects/p/connections/pg1", body).await;
        assert_eq!(answer.status, 404, "{name}");
        assert_eq!(
            answer.json()["message"],
            "Connection \"pg1\" not found in environment \"p\""
        );
    }

    let answer = cd(&fake, "GET", "/workspaces/p/connections", None).await;
    assert_eq!(answer.status, 404);
    assert_eq!(
        answer.text,
        "<pre>Cannot GET /api/v0/workspaces/p/connections</pre>"
    );
}

#[tokio::test]
async fn credible_test_endpoint_reports_a_verdict_in_the_body() {
    let fake = credible().await;
    let answer = cd(&fake, "POST", "/connections/test", Some(postgres("t"))).await;
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!({"status": "ok", "errorMessage": ""}))
    );
    let message = "password authentication failed for user \"etl\"";
    fake.set_test_result(Some(message));
    let answer = cd(
        &fake,
        "POST",
        "/connections/test",
        Some(json!({"config": postgres("t")})),
    )
    .await;
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!({"status": "failed", "errorMessage": message}))
    );
    let answer = cd(
        &fake,
        "POST",
        "/connections/test",
        Some(json!({"name": "t"})),
    )
    .await;
    assert_eq!(answer.status, 400);
    let tested = fake.tested();
    assert_eq!(tested, [postgres("t"), postgres("t")]);
    assert!(fake.stored_all(P).is_empty(), "testing stores nothing");
}

#[tokio::test]
async fn credible_strips_secrets_only_when_hosted() {
    let fake = credible().await;
    cd(
        &fake,
        "POST",
        "/projects/p/connections/pg1",
        Some(postgres("pg1")),
    )
    .await;
    let clear = cd(&fake, "GET", "/projects/p/connections/pg1", None).await;
    assert!(clear.text.contains("pg-canary"));

    fake.strip_secrets(true);
    for path in ["/projects/p/connections/pg1", "/projects/p/connections"] {
        let answer = cd(&fake, "GET", path, None).await;
        assert_eq!(answer.status, 200);
        assert!(
            !answer.text.contains("pg-canary"),
            "{path}: {}",
            answer.text
        );
        assert!(answer.text.contains("db.internal"), "{path}");
    }
    assert_eq!(
        fake.stored(P, "pg1").unwrap()["postgresConnection"]["password"],
        "pg-canary"
    );
}

#[tokio::test]
async fn credible_bearer_token_only_when_one_is_set() {
    let fake = credible().await;
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections", None)
            .await
            .status,
        200
    );
    fake.require_token(Some("hosted-token"));
    let url = format!("{}/projects/p/connections", fake.url());
    let answer = send(http().get(&url)).await;
    assert_eq!(
        (answer.status, answer.json()),
        (401, json!({"code": 401, "message": "Unauthorized"}))
    );
    assert_eq!(
        send(http().get(&url).bearer_auth("wrong")).await.status,
        401
    );
    assert_eq!(
        send(http().get(&url).bearer_auth("hosted-token"))
            .await
            .status,
        200
    );
    let bearers: Vec<(u16, bool)> = fake
        .requests()
        .iter()
        .map(|r| (r.status, r.bearer))
        .collect();
    assert_eq!(
        bearers,
        [(200, false), (401, false), (401, true), (200, true)]
    );
}

#[tokio::test]
async fn credible_frozen_config_refuses_writes() {
    let fake = credible().await;
    cd(
        &fake,
        "POST",
        "/projects/p/connections/pg1",
        Some(postgres("pg1")),
    )
    .await;
    fake.freeze_config(true);
    for (name, path, body) in [
        ("POST", "/projects/p/connections/pg2", Some(postgres("pg2"))),
        ("PATCH", "/projects/p/connections/pg1", Some(json!({}))),
        ("DELETE", "/projects/p/connections/pg1", None),
    ] {
        let answer = cd(&fake, name, path, body).await;
        assert_eq!(answer.status, 403, "{name}");
        assert!(
            answer.json()["message"]
                .as_str()
                .unwrap()
                .contains("frozen")
        );
    }
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections/pg1", None)
            .await
            .status,
        200
    );
    assert_eq!(
        cd(&fake, "POST", "/connections/test", Some(postgres("pg1")))
            .await
            .status,
        200
    );
    assert_eq!(fake.stored_all(P).len(), 1);
    fake.freeze_config(false);
    assert_eq!(
        cd(&fake, "DELETE", "/projects/p/connections/pg1", None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn credible_error_shapes_follow_the_knob() {
    let fake = credible().await;
    let path = "/projects/p/connections/missing";
    for (shape, expected) in [
        (
            ErrorShape::MessageDetails,
            json!({"message": "Connection missing not found", "details": "Not Found"}),
        ),
        (
            ErrorShape::Error,
            json!({"error": "Connection missing not found"}),
        ),
        (
            ErrorShape::CodeMessage,
            json!({"code": 404, "message": "Connection missing not found"}),
        ),
    ] {
        fake.set_error_shape(shape);
        let answer = cd(&fake, "GET", path, None).await;
        assert_eq!((answer.status, answer.json()), (404, expected), "{shape:?}");
    }
}

#[tokio::test]
async fn credible_helpers_change_things_behind_the_clients_back() {
    let fake = FakeCredible::start().await;
    fake.insert_connection("other", postgres("pg1"));
    let read = cd(&fake, "GET", "/projects/other/connections/pg1", None).await;
    assert_eq!((read.status, read.json()), (200, postgres("pg1")));

    assert!(fake.edit_connection(
        "other",
        "pg1",
        json!({"postgresConnection": {"host": "h2"}})
    ));
    let read = cd(&fake, "GET", "/projects/other/connections/pg1", None).await;
    assert_eq!(read.json()["postgresConnection"], json!({"host": "h2"}));
    assert!(!fake.edit_connection("other", "nope", json!({})));

    assert!(fake.delete_connection("other", "pg1"));
    assert!(!fake.delete_connection("other", "pg1"));
    assert_eq!(
        cd(&fake, "GET", "/projects/other/connections/pg1", None)
            .await
            .status,
        404
    );
    assert_eq!(
        cd(&fake, "GET", "/projects/other/connections", None)
            .await
            .json(),
        json!([])
    );
}

// ---------------------------------------------------------------------------------------------
// The harness, through the fake Credible unless a test says otherwise

#[tokio::test]
async fn harness_latency_delays_every_answer() {
    let fake = credible().await;
    fake.set_latency(Duration::from_millis(150));
    fake.fail_next(1, 503);
    for expected in [503, 200] {
        let start = Instant::now();
        let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
        assert_eq!(answer.status, expected);
        assert!(start.elapsed() >= Duration::from_millis(150), "{expected}");
    }
    fake.set_latency(Duration::ZERO);
    let start = Instant::now();
    cd(&fake, "GET", "/projects/p/connections", None).await;
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn harness_fail_next_answers_in_each_backends_error_shape() {
    let fake = credible().await;
    fake.fail_next(2, 503);
    for _ in 0..2 {
        let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
        assert_eq!(
            (answer.status, answer.json()),
            (503, json!({"code": 503, "message": "Service Unavailable"}))
        );
    }
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections", None)
            .await
            .status,
        200
    );

    let infisical = FakeInfisical::start().await;
    infisical.fail_next(1, 500);
    let answer = call(&infisical.url(), "GET", "/api/status", None).await;
    let body = answer.json();
    assert_eq!(answer.status, 500);
    assert_eq!(body["statusCode"], 500);
    assert_eq!(body["error"], "InternalServerError");
    assert!(body["reqId"].as_str().unwrap().starts_with("req-"));
}

#[tokio::test]
async fn harness_error_rate_even_or_random() {
    let fake = credible().await;
    fake.error_rate(0.25, 502, Spread::Even);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            cd(&fake, "GET", "/projects/p/connections", None)
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 502, 200, 200, 200, 502]);

    fake.error_rate(0.5, 500, Spread::Random);
    let mut failed = 0;
    for _ in 0..200 {
        let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
        if answer.status == 500 {
            failed += 1;
            assert_eq!(answer.json()["message"], "Internal Server Error");
        }
    }
    assert!((50..=150).contains(&failed), "{failed} of 200");

    fake.error_rate(0.0, 500, Spread::Random);
    for _ in 0..20 {
        assert_eq!(
            cd(&fake, "GET", "/projects/p/connections", None)
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn harness_storm_answers_429_with_retry_after_until_it_ends() {
    let fake = credible().await;
    fake.rate_limit_storm(0.5, Duration::from_millis(400), 3);
    let mut limited = 0;
    for _ in 0..10 {
        let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
        if answer.status == 429 {
            limited += 1;
            assert_eq!(answer.retry_after(), Some("3"));
            assert_eq!(
                answer.json()["message"],
                "Too many requests, please try again later."
            );
        }
    }
    assert_eq!(limited, 5);
    let recorded = fake.requests();
    assert_eq!(
        recorded.iter().filter(|r| r.retry_after == Some(3)).count(),
        5
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    for _ in 0..6 {
        let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
        assert_eq!((answer.status, answer.retry_after()), (200, None));
    }
}

#[tokio::test]
async fn harness_spacing_limiter_refuses_requests_too_close_to_the_last_accepted() {
    let fake = credible().await;
    fake.set_rate_limit(Some(RateLimit::Spacing {
        min_gap: Duration::from_millis(200),
        retry_after_secs: 2,
    }));
    let first = cd(&fake, "GET", "/projects/p/connections", None).await;
    assert_eq!(first.status, 200);
    let second = cd(&fake, "GET", "/projects/p/connections", None).await;
    assert_eq!((second.status, second.retry_after()), (429, Some("2")));
    assert_eq!(second.json()["code"], 429);
    // A refused request does not move the window: 220 ms after the first, one passes.
    tokio::time::sleep(Duration::from_millis(220)).await;
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections", None)
            .await
            .status,
        200
    );
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections", None)
            .await
            .status,
        429
    );
    let accepted: Vec<Duration> = fake
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.at)
        .collect();
    assert!(accepted[1] - accepted[0] >= Duration::from_millis(200));

    fake.set_rate_limit(None);
    for _ in 0..3 {
        assert_eq!(
            cd(&fake, "GET", "/projects/p/connections", None)
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn harness_token_bucket_allows_a_burst_then_the_rate() {
    let fake = credible().await;
    fake.set_rate_limit(Some(RateLimit::TokenBucket { rps: 5.0, burst: 3 }));
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
        statuses.push(answer.status);
        if answer.status == 429 {
            retry_after = answer.retry_after().map(str::to_owned);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(retry_after.as_deref(), Some("1"), "0.2 s, rounded up");
    // One token every 200 ms.
    tokio::time::sleep(Duration::from_millis(230)).await;
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections", None)
            .await
            .status,
        200
    );
    assert_eq!(
        cd(&fake, "GET", "/projects/p/connections", None)
            .await
            .status,
        429
    );

    fake.set_rate_limit(Some(RateLimit::TokenBucket {
        rps: 0.25,
        burst: 1,
    }));
    cd(&fake, "GET", "/projects/p/connections", None).await;
    let answer = cd(&fake, "GET", "/projects/p/connections", None).await;
    assert_eq!((answer.status, answer.retry_after()), (429, Some("4")));
}

#[tokio::test]
async fn harness_records_every_request() {
    let fake = credible().await;
    cd(
        &fake,
        "POST",
        "/projects/p/connections/pg1",
        Some(postgres("pg1")),
    )
    .await;
    send(
        http()
            .get(format!("{}/projects/p/connections?x=1&y=two", fake.url()))
            .bearer_auth("t"),
    )
    .await;
    fake.fail_next(1, 503);
    cd(&fake, "DELETE", "/projects/p/connections/pg1", None).await;

    let recorded = fake.requests();
    let seen: Vec<(&str, &str, Option<&str>, u16, bool)> = recorded
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.path.as_str(),
                r.query.as_deref(),
                r.status,
                r.bearer,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "POST",
                "/api/v0/projects/p/connections/pg1",
                None,
                201,
                false
            ),
            (
                "GET",
                "/api/v0/projects/p/connections",
                Some("x=1&y=two"),
                200,
                true
            ),
            (
                "DELETE",
                "/api/v0/projects/p/connections/pg1",
                None,
                503,
                false
            ),
        ]
    );
    assert!(recorded.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(recorded.iter().all(|r| r.retry_after.is_none()));
    assert_eq!(fake.count("GET", "/api/v0/projects/"), 1);
    assert_eq!(fake.count("POST", "/api/v0/projects/p/connections/"), 1);
    assert_eq!(fake.count("PUT", "/"), 0);
}

#[tokio::test]
async fn harness_stops_the_server_when_dropped() {
    let fake = credible().await;
    let url = format!("{}/projects/p/connections", fake.url());
    assert_eq!(send(http().get(&url)).await.status, 200);
    drop(fake);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await;
    assert!(refused.is_err(), "still answering after drop");
}

#[tokio::test]
async fn infisical_answers_as_before_through_the_harness() {
    let fake = FakeInfisical::start().await;
    fake.add_identity("id", "secret");
    let base = fake.url();
    let login = call(
        &base,
        "POST",
        "/api/v1/auth/universal-auth/login",
        Some(json!({"clientId": "id", "clientSecret": "secret"})),
    )
    .await;
    assert_eq!(login.status, 200);
    let token = login.json()["accessToken"].as_str().unwrap().to_owned();
    assert!(token.starts_with("fake-jwt."));
    assert_eq!(login.json()["expiresIn"], 7200);

    let create = json!({
        "name": "warehouse", "method": "service-principal", "projectId": "proj",
        "credentials": {"clientId": "c", "clientSecret": "db-canary", "workspaceUrl": "https://w"},
    });
    let created = send(
        http()
            .post(format!("{base}/api/v1/app-connections/databricks"))
            .bearer_auth(&token)
            .json(&create),
    )
    .await;
    assert_eq!(created.status, 200, "every 2xx a 200");
    let id = created.json()["appConnection"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!created.text.contains("db-canary"));
    assert_eq!(
        fake.stored(&id).unwrap()["credentials"]["clientSecret"],
        "db-canary"
    );

    fake.rate_limit_storm(1.0, Duration::from_secs(5), 7);
    let limited = send(
        http()
            .get(format!("{base}/api/v1/app-connections/databricks/{id}"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!((limited.status, limited.retry_after()), (429, Some("7")));
    assert_eq!(limited.json()["error"], "RateLimitExceeded");
    fake.rate_limit_storm(0.0, Duration::ZERO, 1);

    fake.expire_all_tokens();
    let expired = send(
        http()
            .get(format!("{base}/api/v1/app-connections/databricks/{id}"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        (expired.status, expired.json()["error"].as_str()),
        (403, Some("TokenError"))
    );
    assert_eq!(fake.logins(), 1);
    assert_eq!(fake.count("POST", "/api/v1/app-connections/"), 1);
    let renews = fake.requests().iter().filter(|r| r.is_renew()).count();
    assert_eq!(renews, 0);
}

// ---------------------------------------------------------------------------------------------
// Matillion DPC

const PROJECT_ID: &str = "2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60";
const CLIENT_ID: &str = "dpc-client";
const CLIENT_SECRET: &str = "dpc-secret";
const CONNECTIONS: &str = "/v1/projects/2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60/connections";

/// A form-encoded token request.
async fn token_request(fake: &FakeMatillion, pairs: &[(&str, &str)]) -> Answer {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    send(
        http()
            .post(fake.token_url())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body),
    )
    .await
}

fn credentials<'a>(secret: &'a str, audience: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", secret),
        ("audience", audience),
    ]
}

async fn access_token(fake: &FakeMatillion) -> String {
    let answer = token_request(fake, &credentials(CLIENT_SECRET, AUDIENCE)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()["access_token"].as_str().unwrap().to_owned()
}

/// A fake with one client and one project, and a token for it.
async fn matillion() -> (FakeMatillion, String) {
    let fake = FakeMatillion::start().await;
    fake.add_client(CLIENT_ID, CLIENT_SECRET);
    fake.add_project(PROJECT_ID);
    let token = access_token(&fake).await;
    (fake, token)
}

async fn mt(
    fake: &FakeMatillion,
    token: &str,
    name: &str,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut request = http()
        .request(method(name), format!("{}{path}", fake.url()))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request).await
}

fn dwh(name: &str) -> Value {
    json!({
        "name": name,
        "platformConnectionType": "DWH",
        "authProvider": "SNOWFLAKE",
        "authType": "GENERIC_SECRET",
        "connectionDetails": {
            "description": "warehouse",
            "connectionProperties": {"secretName": "sf-secret", "secretKey": "password"},
            "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
        },
    })
}

/// Asserts an RFC 7807 problem and returns its body.
fn problem(answer: &Answer, status: u16) -> Value {
    assert_eq!(answer.status, status, "{}", answer.text);
    assert_eq!(
        answer.headers.get(CONTENT_TYPE).unwrap(),
        "application/problem+json"
    );
    let body = answer.json();
    for key in [
        "type",
        "title",
        "status",
        "detail",
        "instance",
        "violations",
    ] {
        assert!(body.get(key).is_some(), "{key} in {body}");
    }
    assert_eq!(body["status"], status);
    body
}

fn violation_fields(body: &Value) -> Vec<&str> {
    body["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect()
}

fn names(list: &Value) -> Vec<&str> {
    list["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn matillion_token_endpoint_speaks_oauth() {
    let fake = FakeMatillion::start().await;
    fake.add_client(CLIENT_ID, CLIENT_SECRET);
    assert!(fake.url().ends_with("/dpc"));
    assert!(fake.token_url().ends_with("/oauth/dpc/token"));
    let answer = token_request(&fake, &credentials(CLIENT_SECRET, AUDIENCE)).await;
    assert_eq!(answer.status, 200);
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 1800);
    assert!(!body["access_token"].as_str().unwrap().is_empty());

    fake.set_token_lifetime(Duration::from_secs(60));
    let body = token_request(&fake, &credentials(CLIENT_SECRET, AUDIENCE))
        .await
        .json();
    assert_eq!(body["expires_in"], 60);
    fake.omit_expires_in(true);
    let body = token_request(&fake, &credentials(CLIENT_SECRET, AUDIENCE))
        .await
        .json();
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(body["access_token"].is_string());

    let refused = [
        (
            credentials("wrong", AUDIENCE).to_vec(),
            401,
            "access_denied",
        ),
        (
            credentials(CLIENT_SECRET, "https://elsewhere.example").to_vec(),
            403,
            "access_denied",
        ),
        (
            credentials(CLIENT_SECRET, AUDIENCE)[..3].to_vec(),
            403,
            "access_denied",
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", "nobody"),
                ("client_secret", "x"),
            ],
            401,
            "access_denied",
        ),
        (
            credentials(CLIENT_SECRET, AUDIENCE)[1..].to_vec(),
            400,
            "invalid_request",
        ),
        (
            vec![("grant_type", "password"), ("client_id", CLIENT_ID)],
            403,
            "unauthorized_client",
        ),
    ];
    for (pairs, status, error) in &refused {
        let answer = token_request(&fake, pairs).await;
        assert_eq!(answer.status, *status, "{pairs:?}");
        let body = answer.json();
        assert_eq!(body["error"], *error, "{pairs:?}");
        assert!(body["error_description"].is_string());
    }
    let as_json = send(http().post(fake.token_url()).json(&json!({
        "grant_type": "client_credentials", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "audience": AUDIENCE,
    })))
    .await;
    assert_eq!(as_json.status, 400, "the body must be form-encoded");
    assert_eq!(fake.token_requests(), 3 + refused.len() + 1);
}

#[tokio::test]
async fn matillion_checks_the_bearer_token_on_every_route() {
    let (fake, token) = matillion().await;
    let url = format!("{}{CONNECTIONS}", fake.url());
    let body = problem(&send(http().get(&url)).await, 401);
    assert_eq!(body["title"], "Unauthorized");
    assert_eq!(body["instance"], format!("/dpc{CONNECTIONS}"));
    problem(&send(http().get(&url).bearer_auth("made-up")).await, 401);
    assert_eq!(
        mt(&fake, &token, "GET", CONNECTIONS, None).await.status,
        200
    );
    problem(
        &send(http().get(format!("{}/v1/nothing", fake.url()))).await,
        401,
    );
    problem(&mt(&fake, &token, "GET", "/v1/nothing", None).await, 404);

    fake.expire_all_tokens();
    let body = problem(&mt(&fake, &token, "GET", CONNECTIONS, None).await, 401);
    assert_eq!(body["detail"], "Access token expired");

    fake.set_token_lifetime(Duration::from_millis(100));
    let short = access_token(&fake).await;
    assert_eq!(
        mt(&fake, &short, "GET", CONNECTIONS, None).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    problem(
        &mt(&fake, &short, "POST", CONNECTIONS, Some(dwh("c"))).await,
        401,
    );
    assert!(fake.stored_all(PROJECT_ID).is_empty());
}

#[tokio::test]
async fn matillion_create_answers_the_connection_with_the_servers_fields() {
    let (fake, token) = matillion().await;
    let mut body = dwh("warehouse");
    body["unknownField"] = json!("dropped");
    let answer = mt(&fake, &token, "POST", CONNECTIONS, Some(body)).await;
    assert_eq!(answer.status, 201);
    let created = answer.json();
    assert!(uuid::Uuid::parse_str(created["id"].as_str().unwrap()).is_ok());
    assert_eq!(created["createdBy"], "dpc-client@clients");
    assert_eq!(created["projectId"], PROJECT_ID);
    assert!(
        created["createdDate"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok()
    );
    assert_eq!(created["connectionDetails"], dwh("x")["connectionDetails"]);
    assert!(created.get("unknownField").is_none());
    assert_eq!(fake.stored(PROJECT_ID, "warehouse").unwrap(), created);

    fake.set_create_status(200);
    assert_eq!(
        mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("second")))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn matillion_lists_filter_and_page() {
    let (fake, token) = matillion().await;
    for (i, name) in ["a", "b", "c", "d", "e", "f", "g"].iter().enumerate() {
        let mut body = dwh(name);
        if i % 2 == 1 {
            body["authProvider"] = json!("DATABRICKS");
        }
        if i == 6 {
            body["platformConnectionType"] = json!("CLOUD_PLATFORM_CREDENTIALS");
        }
        assert_eq!(
            mt(&fake, &token, "POST", CONNECTIONS, Some(body))
                .await
                .status,
            201
        );
    }
    let list = |query: &'static str| {
        let (fake, token) = (&fake, &token);
        async move {
            let answer = mt(fake, token, "GET", &format!("{CONNECTIONS}{query}"), None).await;
            assert_eq!(answer.status, 200, "{query}: {}", answer.text);
            answer.json()
        }
    };
    let first = list("").await;
    assert_eq!(
        (&first["page"], &first["size"], &first["total"]),
        (&json!(0), &json!(5), &json!(7))
    );
    assert_eq!(names(&first), ["a", "b", "c", "d", "e"]);
    assert_eq!(names(&list("?page=1").await), ["f", "g"]);
    assert_eq!(names(&list("?page=3&size=2").await), ["g"]);
    assert!(names(&list("?page=9").await).is_empty());
    let clamped = list("?size=50").await;
    assert_eq!((names(&clamped).len(), &clamped["size"]), (5, &json!(5)));

    assert_eq!(names(&list("?connectionNames=b,e").await), ["b", "e"]);
    assert_eq!(
        names(&list("?connectionNames=g&connectionNames=a").await),
        ["a", "g"]
    );
    assert_eq!(
        names(&list("?authProvider=DATABRICKS").await),
        ["b", "d", "f"]
    );
    let cloud = list("?platformConnectionType=CLOUD_PLATFORM_CREDENTIALS").await;
    assert_eq!((names(&cloud), &cloud["total"]), (vec!["g"], &json!(1)));
    assert!(names(&list("?authProvider=SNOWFLAKE&connectionNames=b").await).is_empty());

    fake.set_page_size(10);
    assert_eq!(names(&list("").await).len(), 7);
    for bad in ["?page=-1", "?size=0", "?size=many"] {
        let answer = mt(&fake, &token, "GET", &format!("{CONNECTIONS}{bad}"), None).await;
        problem(&answer, 400);
    }
}

#[tokio::test]
async fn matillion_name_filters_can_be_loose() {
    let (fake, token) = matillion().await;
    for name in ["wh", "wh-1", "wh-10", "lake"] {
        mt(&fake, &token, "POST", CONNECTIONS, Some(dwh(name))).await;
    }
    let path = format!("{CONNECTIONS}?connectionNames=wh-1&size=10");
    let list = || mt(&fake, &token, "GET", &path, None);
    assert_eq!(names(&list().await.json()), ["wh-1"]);
    fake.set_name_filter(NameFilter::Contains);
    assert_eq!(names(&list().await.json()), ["wh-1", "wh-10"]);
    fake.set_name_filter(NameFilter::Ignored);
    let all = list().await.json();
    assert_eq!(
        (names(&all), &all["total"]),
        (vec!["wh", "wh-1", "wh-10", "lake"], &json!(4))
    );
}

#[tokio::test]
async fn matillion_tokens_take_the_prefix_asked_for() {
    let (fake, first) = matillion().await;
    assert!(first.starts_with("fake-dpc."), "{first}");
    fake.set_token_prefix("zebra-canary-7781");
    let token = access_token(&fake).await;
    assert!(token.starts_with("zebra-canary-7781."), "{token}");
    assert_eq!(
        mt(&fake, &token, "GET", CONNECTIONS, None).await.status,
        200
    );
}

#[tokio::test]
async fn matillion_put_replaces_the_whole_connection() {
    let (fake, token) = matillion().await;
    let created = mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("wh")))
        .await
        .json();
    mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("other"))).await;
    let put = format!("{CONNECTIONS}?connectionName=wh");
    let replacement = json!({"platformConnectionType": "DWH", "authType": "CLOUD_PROVIDER_SECRET"});
    let answer = mt(&fake, &token, "PUT", &put, Some(replacement)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let replaced = answer.json();
    assert_eq!(replaced["authType"], "CLOUD_PROVIDER_SECRET");
    assert!(
        replaced.get("authProvider").is_none(),
        "omitted fields are unset"
    );
    assert!(replaced.get("connectionDetails").is_none());
    for kept in ["id", "name", "createdBy", "createdDate", "projectId"] {
        assert_eq!(replaced[kept], created[kept], "{kept}");
    }
    assert_eq!(fake.stored(PROJECT_ID, "wh").unwrap(), replaced);

    let body = problem(
        &mt(&fake, &token, "PUT", &put, Some(json!({"name": "wh"}))).await,
        400,
    );
    assert_eq!(
        violation_fields(&body),
        ["platformConnectionType", "authType"]
    );
    problem(
        &mt(
            &fake,
            &token,
            "PUT",
            &format!("{CONNECTIONS}?connectionName=nope"),
            Some(dwh("nope")),
        )
        .await,
        404,
    );
    let body = problem(
        &mt(&fake, &token, "PUT", CONNECTIONS, Some(dwh("wh"))).await,
        400,
    );
    assert_eq!(violation_fields(&body), ["connectionName"]);

    problem(
        &mt(&fake, &token, "PUT", &put, Some(dwh("other"))).await,
        409,
    );
    let renamed = mt(&fake, &token, "PUT", &put, Some(dwh("renamed"))).await;
    assert_eq!(renamed.status, 200);
    assert_eq!(renamed.json()["id"], created["id"]);
    assert!(fake.stored(PROJECT_ID, "wh").is_none());
    assert!(fake.stored(PROJECT_ID, "renamed").is_some());
}

#[tokio::test]
async fn matillion_delete_by_name_and_no_get_one_route() {
    let (fake, token) = matillion().await;
    mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("gone"))).await;
    problem(
        &mt(&fake, &token, "GET", &format!("{CONNECTIONS}/gone"), None).await,
        404,
    );
    problem(
        &mt(&fake, &token, "PATCH", CONNECTIONS, Some(dwh("gone"))).await,
        405,
    );

    let delete = format!("{CONNECTIONS}?connectionName=gone");
    let answer = mt(&fake, &token, "DELETE", &delete, None).await;
    assert_eq!((answer.status, answer.text.as_str()), (204, ""));
    assert!(answer.headers.get(CONTENT_TYPE).is_none());
    problem(&mt(&fake, &token, "DELETE", &delete, None).await, 404);
    problem(&mt(&fake, &token, "DELETE", CONNECTIONS, None).await, 400);
    assert!(fake.stored_all(PROJECT_ID).is_empty());
}

#[tokio::test]
async fn matillion_validates_like_the_real_api() {
    let (fake, token) = matillion().await;
    let mut bad = dwh("bad");
    bad["platformConnectionType"] = json!("WAREHOUSE");
    bad["authType"] = json!("PASSWORD");
    let body = problem(
        &mt(&fake, &token, "POST", CONNECTIONS, Some(bad)).await,
        400,
    );
    assert_eq!(
        violation_fields(&body),
        ["platformConnectionType", "authType"]
    );
    assert_eq!(body["detail"], "Validation failed");

    let mut basic = dwh("basic");
    basic["platformConnectionType"] = json!("COMPONENT_BASIC");
    basic["connectionDetails"]["connectionProperties"]
        .as_object_mut()
        .unwrap()
        .remove("secretName");
    let body = problem(
        &mt(&fake, &token, "POST", CONNECTIONS, Some(basic.clone())).await,
        400,
    );
    assert_eq!(
        violation_fields(&body),
        ["connectionDetails.connectionProperties.secretName"]
    );
    basic["connectionDetails"]["connectionProperties"]["secretName"] = json!("s");
    assert_eq!(
        mt(&fake, &token, "POST", CONNECTIONS, Some(basic))
            .await
            .status,
        201
    );

    let mut nameless = dwh("x");
    nameless.as_object_mut().unwrap().remove("name");
    let body = problem(
        &mt(&fake, &token, "POST", CONNECTIONS, Some(nameless)).await,
        400,
    );
    assert_eq!(violation_fields(&body), ["name"]);
    problem(
        &mt(&fake, &token, "POST", CONNECTIONS, Some(json!([dwh("x")]))).await,
        400,
    );
    let malformed = send(
        http()
            .post(format!("{}{CONNECTIONS}", fake.url()))
            .bearer_auth(&token)
            .header(CONTENT_TYPE, "application/json")
            .body("{\"name\":"),
    )
    .await;
    problem(&malformed, 400);

    let body = problem(
        &mt(
            &fake,
            &token,
            "GET",
            "/v1/projects/not-a-uuid/connections",
            None,
        )
        .await,
        400,
    );
    assert_eq!(violation_fields(&body), ["projectId"]);
    let unknown = "/v1/projects/00000000-0000-4000-8000-000000000000/connections";
    problem(
        &mt(&fake, &token, "POST", unknown, Some(dwh("x"))).await,
        404,
    );
    assert_eq!(fake.stored_all(PROJECT_ID).len(), 1);
}

#[tokio::test]
async fn matillion_taken_names_are_409_or_400_by_the_knob() {
    let (fake, token) = matillion().await;
    mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("dup"))).await;
    let body = problem(
        &mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("dup"))).await,
        409,
    );
    assert!(body["detail"].as_str().unwrap().contains("'dup'"));
    fake.set_duplicate_status(400);
    let body = problem(
        &mt(&fake, &token, "POST", CONNECTIONS, Some(dwh("dup"))).await,
        400,
    );
    assert_eq!(violation_fields(&body), ["name"]);
    assert!(
        body["violations"][0]["message"]
            .as_str()
            .unwrap()
            .contains("'dup'")
    );
    assert_eq!(fake.stored_all(PROJECT_ID).len(), 1);
}

#[tokio::test]
async fn matillion_helpers_change_things_behind_the_clients_back() {
    let (fake, token) = matillion().await;
    let id = fake.insert_connection(PROJECT_ID, dwh("theirs"));
    let list = mt(&fake, &token, "GET", CONNECTIONS, None).await.json();
    assert_eq!(list["results"][0]["id"], id.as_str());
    assert_eq!(list["results"][0]["createdBy"], "someone-else@clients");

    assert!(fake.edit_connection(
        PROJECT_ID,
        "theirs",
        json!({"authProvider": null, "authType": "CLOUD_PROVIDER_SECRET"})
    ));
    let stored = fake.stored(PROJECT_ID, "theirs").unwrap();
    assert!(stored.get("authProvider").is_none());
    assert_eq!(stored["authType"], "CLOUD_PROVIDER_SECRET");
    assert!(!fake.edit_connection(PROJECT_ID, "nope", json!({})));

    assert!(fake.delete_connection(PROJECT_ID, "theirs"));
    assert!(!fake.delete_connection(PROJECT_ID, "theirs"));
    let list = mt(&fake, &token, "GET", CONNECTIONS, None).await.json();
    assert_eq!(list["total"], 0);
}

#[tokio::test]
async fn matillion_injected_errors_take_its_shapes() {
    let (fake, token) = matillion().await;
    fake.set_latency(Duration::from_millis(100));
    fake.fail_next(2, 503);
    let start = Instant::now();
    let body = problem(&mt(&fake, &token, "GET", CONNECTIONS, None).await, 503);
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert_eq!(body["title"], "Service Unavailable");
    let answer = token_request(&fake, &credentials(CLIENT_SECRET, AUDIENCE)).await;
    assert_eq!(
        (answer.status, answer.json()["error"].as_str()),
        (503, Some("server_error"))
    );
    fake.set_latency(Duration::ZERO);

    fake.rate_limit_storm(1.0, Duration::from_secs(5), 4);
    let answer = mt(&fake, &token, "GET", CONNECTIONS, None).await;
    assert_eq!(answer.retry_after(), Some("4"));
    problem(&answer, 429);
    let answer = token_request(&fake, &credentials(CLIENT_SECRET, AUDIENCE)).await;
    assert_eq!(
        (
            answer.status,
            answer.retry_after(),
            answer.json()["error"].as_str()
        ),
        (429, Some("4"), Some("too_many_requests"))
    );
    fake.rate_limit_storm(0.0, Duration::ZERO, 1);

    fake.set_rate_limit(Some(RateLimit::TokenBucket { rps: 1.0, burst: 5 }));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let answer = mt(&fake, &token, "GET", CONNECTIONS, None).await;
        statuses.push((answer.status, answer.retry_after().map(str::to_owned)));
    }
    assert_eq!(statuses[..5], vec![(200, None); 5][..]);
    assert_eq!(statuses[5], (429, Some("1".to_owned())));
}
