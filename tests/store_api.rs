//! The store read API over real HTTP, against a real SQLite store and the Kubernetes API test
//! server's TokenReview and SubjectAccessReview: who gets 401, 403, 404, 503, and that only the
//! credentials route, and only for a caller RBAC allows, ever carries a secret.

use std::collections::BTreeMap;
use std::sync::Arc;

use appconn::backend::RotationSchedule;
use appconn::keys::InstallationKeys;
use appconn::secret::Credentials;
use appconn::store::api::{StoreApiState, serve};
use appconn::store::{NewRecord, SqliteStore, StoreEngine};
use appconn_testkit::apiserver::{TestApiServer, UserInfo};
use appconn_testkit::logs::{self, Capture};
use jiff::Timestamp;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const CANARY: &str = "zebra-canary-7781";
const TOKEN: &str = "tok-analytics-reader-5f3e9a";
const USER: &str = "system:serviceaccount:analytics:reader";
const GROUP: &str = "appconn.io";

struct Harness {
    api: TestApiServer,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

fn record(namespace: &str, name: &str, password: &str) -> NewRecord {
    NewRecord {
        namespace: namespace.into(),
        name: name.into(),
        connection_name: format!("{name}-prod"),
        app: "mssql".into(),
        method: Some("username-and-password".into()),
        project: Some("6f1c".into()),
        description: Some("Analytics warehouse".into()),
        settings: BTreeMap::from([("gatewayId".to_string(), Value::Null)]),
        credentials: Credentials::new(BTreeMap::from([
            ("host".to_string(), json!("sql.internal")),
            ("port".to_string(), json!(1433)),
            ("password".to_string(), json!(password)),
        ])),
        credentials_hash: format!("hmac-sha256:{}", hex::encode(name)),
        rotation: Some(RotationSchedule {
            interval_days: 30,
            hours: 11,
            minutes: 29,
        }),
    }
}

/// A store with `analytics/warehouse` (password [`CANARY`]) and `billing/ledger`, the read API
/// on a free port, and [`TOKEN`] authenticating as [`USER`] with no permission yet.
async fn start() -> Harness {
    let api = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = InstallationKeys::generate();
    let store = SqliteStore::open(&dir.path().join("appconn.db"), &keys.store_keys)
        .await
        .unwrap();
    let now = Timestamp::now();
    store
        .insert(record("analytics", "warehouse", CANARY), now)
        .await
        .unwrap();
    store
        .insert(record("billing", "ledger", "ledger-pw-0042"), now)
        .await
        .unwrap();
    api.set_token(
        TOKEN,
        UserInfo {
            username: Some(USER.into()),
            uid: Some("0b6d6a9e-1d1c-4a43-9d67-3f0e0d0f5a11".into()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:analytics".into(),
            ]),
            extra: None,
        },
    );
    let state = StoreApiState {
        store: Arc::new(store),
        client: api.client(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    Harness {
        api,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
        _stop: stop,
    }
}

struct Answer {
    status: StatusCode,
    www_authenticate: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_string()
    }
}

impl Harness {
    async fn get(&self, path: &str, authorization: Option<&str>) -> Answer {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request.send().await.unwrap();
        Answer {
            status: response.status(),
            www_authenticate: response
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .map(|v| v.to_str().unwrap().to_string()),
            body: response.text().await.unwrap(),
        }
    }

    async fn get_as(&self, path: &str, token: &str) -> Answer {
        self.get(path, Some(&format!("Bearer {token}"))).await
    }

    fn reviews(&self, resource: &str) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.resource == resource && r.verb == "create")
            .count()
    }
}

const WAREHOUSE: &str = "/v1/namespaces/analytics/connections/warehouse";
const ROUTES: [&str; 3] = [
    WAREHOUSE,
    "/v1/namespaces/analytics/connections",
    "/v1/connections",
];

/// Neither a secret nor the caller's token.
fn assert_clean(answer: &Answer) {
    assert!(!answer.body.contains(CANARY), "{}", answer.body);
    assert!(!answer.body.contains(TOKEN), "{}", answer.body);
}

#[tokio::test]
async fn no_or_malformed_authorization_is_401_with_a_bearer_challenge() {
    let h = start().await;
    for path in ROUTES {
        for authorization in [
            None,
            Some("Basic YWxpY2U6cHc="),
            Some("Bearer"),
            Some(TOKEN),
        ] {
            let answer = h.get(path, authorization).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{path} {authorization:?}"
            );
            assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"));
            assert!(!answer.error().is_empty());
            assert_clean(&answer);
        }
    }
    assert_eq!(h.reviews("tokenreviews"), 0, "nothing to review");
}

#[tokio::test]
async fn an_unknown_token_is_401_and_not_echoed() {
    let h = start().await;
    let unknown = "tok-nobody-knows-this-one";
    for path in ROUTES {
        let answer = h.get_as(path, unknown).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"));
        assert!(!answer.body.contains(unknown), "{}", answer.body);
        assert_clean(&answer);
    }
    // Failures are not cached: a token may become valid, and must be asked about again.
    assert_eq!(h.reviews("tokenreviews"), ROUTES.len());
}

#[tokio::test]
async fn a_known_token_without_permission_is_403() {
    let h = start().await;
    for path in ROUTES {
        let answer = h.get_as(path, TOKEN).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{path}");
        assert!(answer.error().contains(USER), "{}", answer.body);
        assert_eq!(answer.www_authenticate, None);
        assert_clean(&answer);
    }
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert!(
        answer.error().contains("appconnections/credentials"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn get_on_credentials_in_the_namespace_returns_them() {
    let h = start().await;
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("analytics"),
    );
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let body = answer.json();
    assert_eq!(
        body["credentials"],
        json!({"host": "sql.internal", "port": 1433, "password": CANARY})
    );
    assert_eq!(body["namespace"], "analytics");
    assert_eq!(body["name"], "warehouse");
    assert_eq!(body["connectionName"], "warehouse-prod");
    assert_eq!(body["app"], "mssql");
    assert_eq!(body["method"], "username-and-password");
    assert_eq!(
        body["credentialsHash"],
        format!("hmac-sha256:{}", hex::encode("warehouse"))
    );
    assert_eq!(body["version"], 1);
    assert_eq!(body["rotation"]["intervalDays"], 30);
    assert_eq!(body["rotation"]["status"], "pending");
    assert!(body["rotation"]["nextRotationAt"].is_string());
    assert!(body["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert!(!answer.body.contains(TOKEN));

    // The grant names the namespace, not the other one's records.
    let other = h
        .get_as("/v1/namespaces/billing/connections/ledger", TOKEN)
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert!(!other.body.contains("ledger-pw-0042"));
}

#[tokio::test]
async fn groups_of_the_reviewed_user_are_passed_to_the_access_review() {
    let h = start().await;
    h.api.allow(
        "system:serviceaccounts:analytics",
        "get",
        GROUP,
        "appconnections/credentials",
        Some("analytics"),
    );
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.json()["credentials"]["password"], CANARY);
}

#[tokio::test]
async fn permission_in_another_namespace_is_403() {
    let h = start().await;
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("billing"),
    );
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_clean(&answer);
}

#[tokio::test]
async fn get_on_the_resource_itself_does_not_reveal_credentials() {
    let h = start().await;
    h.api
        .allow(USER, "get", GROUP, "appconnections", Some("analytics"));
    h.api
        .allow(USER, "list", GROUP, "appconnections", Some("analytics"));
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_clean(&answer);
}

#[tokio::test]
async fn list_shows_no_secret() {
    let h = start().await;
    h.api
        .allow(USER, "list", GROUP, "appconnections", Some("analytics"));
    let answer = h
        .get_as("/v1/namespaces/analytics/connections", TOKEN)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_clean(&answer);
    let body = answer.json();
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "warehouse");
    assert_eq!(items[0]["connectionName"], "warehouse-prod");
    assert_eq!(items[0]["settings"], json!({"gatewayId": null}));
    assert!(items[0].get("credentials").is_none());

    // A namespaced grant does not cover the cluster-wide list nor another namespace.
    let all = h.get_as("/v1/connections", TOKEN).await;
    assert_eq!(all.status, StatusCode::FORBIDDEN);
    let billing = h.get_as("/v1/namespaces/billing/connections", TOKEN).await;
    assert_eq!(billing.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn cluster_wide_list_needs_a_cluster_wide_grant() {
    let h = start().await;
    h.api.allow(USER, "list", GROUP, "appconnections", None);
    let answer = h.get_as("/v1/connections", TOKEN).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_clean(&answer);
    assert!(!answer.body.contains("ledger-pw-0042"));
    let names: Vec<String> = answer.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["namespace"].as_str().unwrap(),
                i["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["analytics/warehouse", "billing/ledger"]);
}

#[tokio::test]
async fn an_unknown_name_is_404() {
    let h = start().await;
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("analytics"),
    );
    // `warehouse-prod` is the connection name, not the AppConnection's metadata.name.
    for name in ["nope", "warehouse-prod"] {
        let answer = h
            .get_as(
                &format!("/v1/namespaces/analytics/connections/{name}"),
                TOKEN,
            )
            .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{name}");
        assert!(answer.error().contains(name));
        assert_clean(&answer);
    }
    // A record of another namespace is not found through this one.
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("default"),
    );
    let answer = h
        .get_as("/v1/namespaces/default/connections/warehouse", TOKEN)
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_clean(&answer);
}

#[tokio::test]
async fn review_api_failures_are_503() {
    let h = start().await;
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("analytics"),
    );

    h.api.fail_next("create", "tokenreviews", 500);
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_clean(&answer);

    h.api.fail_next("create", "subjectaccessreviews", 500);
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_clean(&answer);

    // Nothing was cached from the failures.
    let answer = h.get_as(WAREHOUSE, TOKEN).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

#[tokio::test]
async fn reviews_are_cached() {
    let h = start().await;
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("analytics"),
    );
    for _ in 0..3 {
        let answer = h.get_as(WAREHOUSE, TOKEN).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(h.reviews("tokenreviews"), 1);
    assert_eq!(h.reviews("subjectaccessreviews"), 1);

    // Another question for the same user: the token is cached, the decision is not.
    let answer = h
        .get_as("/v1/namespaces/analytics/connections", TOKEN)
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(h.reviews("tokenreviews"), 1);
    assert_eq!(h.reviews("subjectaccessreviews"), 2);
}

#[tokio::test]
async fn logs_never_hold_the_token_or_a_secret() {
    if !logs::alone("logs_never_hold_the_token_or_a_secret") {
        return;
    }
    let logs = Capture::start();
    let h = start().await;
    h.api.allow(
        USER,
        "get",
        GROUP,
        "appconnections/credentials",
        Some("analytics"),
    );
    assert_eq!(h.get_as(WAREHOUSE, TOKEN).await.status, StatusCode::OK);
    assert_eq!(
        h.get_as("/v1/connections", TOKEN).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get_as(WAREHOUSE, "tok-unknown-1234").await.status,
        StatusCode::UNAUTHORIZED
    );
    h.api.fail_next("create", "tokenreviews", 500);
    assert_eq!(
        h.get_as(WAREHOUSE, "tok-failing-5678").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let logs = logs.text();
    // The capture works: the credentials read is audited, with who read what.
    assert!(logs.contains("served connection credentials"), "{logs}");
    assert!(logs.contains(USER), "{logs}");
    assert!(logs.contains("TokenReview failed"), "{logs}");
    for secret in [TOKEN, "tok-unknown-1234", "tok-failing-5678", CANARY] {
        assert!(!logs.contains(secret), "{secret} in logs:\n{logs}");
    }
}
