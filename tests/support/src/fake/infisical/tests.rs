//! The fake's own behaviour, through real HTTP.

use std::time::Duration;

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, Method};
use jiff::Timestamp;
use serde_json::{Value, json};

use super::FakeInfisical;

const ID: &str = "5a0c4f0e-7d8b-4a55-9d3e-2f1b6c7d8e9f";
const SECRET: &str = "identity-secret";
const PROJECT: &str = "6f1c2a9e-0b1d-4c55-9a57-3d1f1f1b2c3d";

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A plain-HTTP client; reqwest is built without a crypto provider of its own.
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

impl Client {
    async fn new(fake: &FakeInfisical) -> Self {
        fake.add_identity(ID, SECRET);
        let mut client = Self {
            http: http(),
            base: fake.url(),
            token: None,
        };
        let (status, body, _) = client
            .call(
                "POST",
                "/api/v1/auth/universal-auth/login",
                Some(json!({"clientId": ID, "clientSecret": SECRET})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        client.token = Some(body["accessToken"].as_str().unwrap().to_owned());
        client
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value, HeaderMap) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, headers)
    }
}

fn mssql(name: &str) -> Value {
    json!({
        "name": name,
        "method": "username-and-password",
        "projectId": PROJECT,
        "credentials": {
            "host": "sql.internal", "port": 1433, "database": "warehouse", "username": "etl",
            "password": "hunter2-canary", "sslEnabled": true, "sslRejectUnauthorized": false,
        },
    })
}

fn paths(body: &Value) -> Vec<String> {
    body["message"]
        .as_array()
        .expect("422 message is an array")
        .iter()
        .map(|issue| {
            let path: Vec<String> = issue["path"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect();
            path.join(".")
        })
        .collect()
}

#[tokio::test]
async fn three_refused_logins_lock_the_identity() {
    let fake = FakeInfisical::start().await;
    fake.add_identity(ID, SECRET);
    fake.set_lockout_duration(Duration::from_millis(300));
    let client = Client {
        http: http(),
        base: fake.url(),
        token: None,
    };
    let login = |secret: &'static str| {
        let client = &client;
        async move {
            client
                .call(
                    "POST",
                    "/api/v1/auth/universal-auth/login",
                    Some(json!({"clientId": ID, "clientSecret": secret})),
                )
                .await
        }
    };
    for _ in 0..2 {
        let (status, body, _) = login("wrong").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("UnauthorizedError"))
        );
        assert!(!fake.is_locked(ID));
    }
    assert_eq!(login("wrong").await.0, 401);
    assert!(fake.is_locked(ID));
    let (status, body, _) = login(SECRET).await;
    assert_eq!(status, 401, "locked even with the right secret");
    assert!(
        body["message"].as_str().unwrap().contains("locked"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (status, body, _) = login(SECRET).await;
    assert_eq!(status, 200);
    assert_eq!(body["tokenType"], "Bearer");
    assert_eq!(body["expiresIn"], 7200);
    assert_eq!(fake.logins(), 5);
}

#[tokio::test]
async fn tokens_expire_renew_and_get_revoked() {
    let fake = FakeInfisical::start().await;
    let client = Client::new(&fake).await;
    let token = client.token.clone().unwrap();
    assert_eq!(
        client
            .call("GET", "/api/v1/app-connections/options", None)
            .await
            .0,
        200
    );
    let (status, body, _) = client
        .call(
            "POST",
            "/api/v1/auth/token/renew",
            Some(json!({"accessToken": token})),
        )
        .await;
    assert_eq!(
        (status, body["accessToken"].as_str()),
        (200, Some(token.as_str()))
    );

    fake.expire_all_tokens();
    let (status, body, _) = client
        .call("GET", "/api/v1/app-connections/options", None)
        .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("TokenError")));
    let (status, _, _) = client
        .call(
            "POST",
            "/api/v1/auth/token/renew",
            Some(json!({"accessToken": token})),
        )
        .await;
    assert_eq!(status, 401);

    let client = Client::new(&fake).await;
    fake.revoke_all_tokens();
    let (status, body, _) = client.call("GET", "/api/v1/app-connections", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("UnauthorizedError"))
    );
    let anonymous = Client {
        token: None,
        ..client
    };
    assert_eq!(anonymous.call("GET", "/api/status", None).await.0, 200);
    assert_eq!(
        anonymous
            .call("GET", "/api/v1/app-connections", None)
            .await
            .0,
        401
    );
    let recorded = fake.requests();
    assert!(recorded.iter().any(|r| r.bearer) && recorded.iter().any(|r| !r.bearer));
}

#[tokio::test]
async fn responses_strip_secrets_and_every_credential_write_rehashes() {
    let fake = FakeInfisical::start().await;
    let client = Client::new(&fake).await;
    let (status, body, _) = client
        .call(
            "POST",
            "/api/v1/app-connections/mssql",
            Some(mssql("warehouse")),
        )
        .await;
    assert_eq!(status, 200, "create answers 200, not 201: {body}");
    let created = &body["appConnection"];
    assert!(
        created["credentials"].get("password").is_none(),
        "{created}"
    );
    assert_eq!(created["credentials"]["port"], 1433);
    assert_eq!(created["version"], 1);
    let id = created["id"].as_str().unwrap();
    let hash = created["credentialsHash"].as_str().unwrap().to_owned();
    assert_eq!(
        fake.stored(id).unwrap()["credentials"]["password"],
        "hunter2-canary"
    );
    assert!(!body.to_string().contains("hunter2-canary"));

    // The same credentials again: a new hash, the same version.
    let patch = json!({"credentials": mssql("x")["credentials"].clone()});
    let (status, body, _) = client
        .call(
            "PATCH",
            &format!("/api/v1/app-connections/mssql/{id}"),
            Some(patch),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["appConnection"]["credentialsHash"], hash.as_str());
    assert_eq!(body["appConnection"]["version"], 1);
    let hash = body["appConnection"]["credentialsHash"].clone();
    let (_, body, _) = client
        .call(
            "PATCH",
            &format!("/api/v1/app-connections/mssql/{id}"),
            Some(json!({"description": "d"})),
        )
        .await;
    assert_eq!(
        body["appConnection"]["credentialsHash"], hash,
        "no credentials, same hash"
    );

    for path in [
        format!("/api/v1/app-connections/mssql/{id}"),
        format!("/api/v1/app-connections/mssql/connection-name/warehouse?projectId={PROJECT}"),
        format!("/api/v1/app-connections?projectId={PROJECT}"),
        format!("/api/v1/app-connections/mssql?projectId={PROJECT}"),
    ] {
        let (status, body, _) = client.call("GET", &path, None).await;
        assert_eq!(status, 200, "{path}");
        assert!(body.to_string().contains(id), "{path}");
        assert!(!body.to_string().contains("hunter2-canary"), "{path}");
    }
    // Without projectId only org-level connections are searched.
    let (status, _, _) = client
        .call(
            "GET",
            "/api/v1/app-connections/mssql/connection-name/warehouse",
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, body, _) = client
        .call(
            "DELETE",
            &format!("/api/v1/app-connections/mssql/{id}"),
            None,
        )
        .await;
    assert_eq!(
        (status, body["appConnection"]["id"].as_str()),
        (200, Some(id))
    );
    let (status, body, _) = client
        .call(
            "DELETE",
            &format!("/api/v1/app-connections/mssql/{id}"),
            None,
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("NotFound")));
}

#[tokio::test]
async fn names_are_unique_per_project_across_all_apps() {
    let fake = FakeInfisical::start().await;
    let client = Client::new(&fake).await;
    assert_eq!(
        client
            .call(
                "POST",
                "/api/v1/app-connections/mssql",
                Some(mssql("shared"))
            )
            .await
            .0,
        200
    );
    let databricks = json!({
        "name": "shared", "method": "service-principal", "projectId": PROJECT,
        "credentials": {"clientId": "c", "clientSecret": "s", "workspaceUrl": "https://w"},
    });
    let (status, body, _) = client
        .call(
            "POST",
            "/api/v1/app-connections/databricks",
            Some(databricks.clone()),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "BadRequest");
    assert_eq!(
        body["message"],
        "An App Connection with the name \"shared\" already exists"
    );
    let mut elsewhere = databricks.clone();
    elsewhere["projectId"] = json!("another-project");
    assert_eq!(
        client
            .call(
                "POST",
                "/api/v1/app-connections/databricks",
                Some(elsewhere)
            )
            .await
            .0,
        200
    );
    let mut org = databricks;
    org.as_object_mut().unwrap().remove("projectId");
    assert_eq!(
        client
            .call(
                "POST",
                "/api/v1/app-connections/databricks",
                Some(org.clone())
            )
            .await
            .0,
        200
    );
    assert_eq!(
        client
            .call("POST", "/api/v1/app-connections/databricks", Some(org))
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn validation_failures_are_zod_issue_arrays() {
    let fake = FakeInfisical::start().await;
    let client = Client::new(&fake).await;
    let mut body = mssql("Not_A_Slug");
    body["credentials"]["port"] = json!("1433");
    body["credentials"]
        .as_object_mut()
        .unwrap()
        .remove("password");
    body["foo"] = json!(1);
    let (status, answer, _) = client
        .call("POST", "/api/v1/app-connections/mssql", Some(body))
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (422, Some("ValidationFailure"))
    );
    assert_eq!(
        paths(&answer),
        ["", "name", "credentials.port", "credentials.password"]
    );

    let databricks = json!({
        "name": "d", "method": "oauth", "gatewayId": null,
        "credentials": {"clientId": "c", "clientSecret": "s", "workspaceUrl": "https://w"},
    });
    let (status, answer, _) = client
        .call(
            "POST",
            "/api/v1/app-connections/databricks",
            Some(databricks),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(
        paths(&answer),
        ["", "method"],
        "gatewayId is not a databricks field"
    );

    let (_, created, _) = client
        .call("POST", "/api/v1/app-connections/mssql", Some(mssql("ok")))
        .await;
    let id = created["appConnection"]["id"].as_str().unwrap();
    let (status, answer, _) = client
        .call(
            "PATCH",
            &format!("/api/v1/app-connections/mssql/{id}"),
            Some(json!({"method": "username-and-password", "projectId": "p"})),
        )
        .await;
    assert_eq!(status, 422, "PATCH cannot change method or project");
    assert!(
        answer["message"][0]["message"]
            .as_str()
            .unwrap()
            .contains("'method'")
    );
    let (status, answer, _) = client
        .call(
            "PATCH",
            &format!("/api/v1/app-connections/mssql/{id}"),
            Some(json!({"credentials": {"host": "h"}})),
        )
        .await;
    assert_eq!(status, 422, "PATCH needs the full credentials object");
    assert!(paths(&answer).contains(&"credentials.password".to_string()));
}

#[tokio::test]
async fn rotation_only_for_the_listed_pairs() {
    let fake = FakeInfisical::start().await;
    let client = Client::new(&fake).await;
    let rotation = json!({"rotationInterval": 30, "rotateAtUtc": {"hours": 11, "minutes": 29}});
    let mut body = mssql("rotating-sql");
    body["isAutoRotationEnabled"] = json!(true);
    body["rotation"] = rotation.clone();
    let (status, answer, _) = client
        .call("POST", "/api/v1/app-connections/mssql", Some(body))
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("not supported"),
        "{answer}"
    );

    let vault = json!({
        "name": "vault", "method": "client-secret", "isAutoRotationEnabled": true,
        "rotation": rotation,
        "credentials": {"clientId": "c", "clientSecret": "s", "tenantId": "t"},
    });
    let (status, answer, _) = client
        .call(
            "POST",
            "/api/v1/app-connections/azure-key-vault",
            Some(vault),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let conn = &answer["appConnection"];
    assert_eq!(
        conn["credentials"],
        json!({"clientId": "c", "tenantId": "t"})
    );
    let next: Timestamp = conn["rotation"]["nextRotationAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(next.to_string().ends_with("T11:29:00Z"), "{next}");
    let days = next.duration_since(Timestamp::now()).as_secs() / 86_400;
    assert!((29..=30).contains(&days), "{days}");

    let id = conn["id"].as_str().unwrap();
    let hash = conn["credentialsHash"].clone();
    assert!(fake.rotate_now(id));
    let stored = fake.stored(id).unwrap();
    assert_ne!(stored["credentialsHash"], hash);
    assert_ne!(stored["credentials"]["clientSecret"], "s");
    assert_eq!(stored["rotation"]["rotationStatus"], "success");
    assert!(fake.fail_rotation(id, "Azure said no"));
    assert_eq!(
        fake.stored(id).unwrap()["rotation"]["lastRotationMessage"],
        "Azure said no"
    );
}

#[tokio::test]
async fn storms_and_failures_are_injected() {
    let fake = FakeInfisical::start().await;
    let client = Client {
        http: http(),
        base: fake.url(),
        token: None,
    };
    fake.fail_next(2, 503);
    assert_eq!(client.call("GET", "/api/status", None).await.0, 503);
    let (status, body, _) = client.call("GET", "/api/status", None).await;
    assert_eq!((status, body["statusCode"].as_u64()), (503, Some(503)));
    assert_eq!(client.call("GET", "/api/status", None).await.0, 200);

    fake.rate_limit_storm(0.5, Duration::from_secs(5), 2);
    let mut limited = 0;
    for _ in 0..10 {
        let (status, body, headers) = client.call("GET", "/api/status", None).await;
        if status == 429 {
            limited += 1;
            assert_eq!(body["error"], "RateLimitExceeded");
            assert_eq!(headers.get(RETRY_AFTER).unwrap(), "2");
        }
    }
    assert_eq!(limited, 5);
    let recorded = fake.requests();
    assert_eq!(
        recorded.iter().filter(|r| r.retry_after == Some(2)).count(),
        5
    );
    assert!(recorded.windows(2).all(|w| w[0].at <= w[1].at));

    // A storm ends on its own.
    fake.rate_limit_storm(0.5, Duration::ZERO, 2);
    fake.set_options_route(false);
    let client = Client::new(&fake).await;
    let (status, body, _) = client
        .call("GET", "/api/v1/app-connections/options", None)
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("Not Found")));
    let (status, _, _) = client
        .call("GET", "/api/v1/app-connections/snowflake", None)
        .await;
    assert_eq!(status, 404);
}
