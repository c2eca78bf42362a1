//! The fake backends and their shared harness, through real HTTP.

use std::time::{Duration, Instant};

use appconn_testkit::fake::credible::{ErrorShape, FakeCredible};
use appconn_testkit::fake::infisical::FakeInfisical;
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
