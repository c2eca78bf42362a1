//! A fake Infisical server: Universal Auth and App Connections, following
//! `backends/infisical.md` closely, quirks included.
//!
//! What it models: login / renew / token expiry, lockout after three refused logins in a row
//! (within 30 s, Infisical's default counter window) for five minutes, `/api/status`,
//! `/options`, list / get / get-by-name / create / update / delete / rotate-credentials, zod-style
//! 422s with an ARRAY `message`, 400s for names taken across all apps of a project, rotation on
//! pairs that cannot rotate and blocked deletes, every 2xx a 200, secret credential fields never
//! in a response, a new random `credentialsHash` on every write that carries credentials, and a
//! `version` that never moves.
//!
//! Knobs for tests: latency, failing the next N requests, a 429 storm with `Retry-After`, token
//! expiry and revocation, lockout length, a server without `/options`, live-validation failures,
//! dependents that block a delete, rotation done by the server, objects created behind appconn's
//! back, the stored objects with their secrets, and a record of every request.
//!
//! Nothing here logs a request or response body: credentials travel in them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};
use serde_json::{Map, Value, json};

/// The organisation every object of the fake belongs to.
pub const ORG_ID: &str = "9d7a6c2e-1111-4222-8333-444455556666";

/// Zod-like type of a credential field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Num,
    Bool,
}

struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
    /// Never returned in a response.
    secret: bool,
}

const fn field(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: true,
        secret: false,
    }
}

const fn optional(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
        secret: false,
    }
}

const fn secret(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Str,
        required: true,
        secret: true,
    }
}

struct MethodDef {
    name: &'static str,
    fields: &'static [Field],
}

struct AppDef {
    app: &'static str,
    name: &'static str,
    methods: &'static [MethodDef],
    /// Accepts `isPlatformManagedCredentials`.
    platform_managed: bool,
    /// Accepts `gatewayId`.
    gateway: bool,
}

const SQL_METHODS: &[MethodDef] = &[MethodDef {
    name: "username-and-password",
    fields: &[
        field("host", Kind::Str),
        field("port", Kind::Num),
        field("database", Kind::Str),
        field("username", Kind::Str),
        secret("password"),
        field("sslEnabled", Kind::Bool),
        field("sslRejectUnauthorized", Kind::Bool),
        optional("sslCertificate", Kind::Str),
    ],
}];

const AZURE_METHODS: &[MethodDef] = &[
    MethodDef {
        name: "oauth",
        fields: &[secret("code"), optional("tenantId", Kind::Str)],
    },
    MethodDef {
        name: "client-secret",
        fields: &[
            field("clientId", Kind::Str),
            secret("clientSecret"),
            field("tenantId", Kind::Str),
        ],
    },
    MethodDef {
        name: "certificate",
        fields: &[
            field("clientId", Kind::Str),
            field("tenantId", Kind::Str),
            field("certificateBody", Kind::Str),
            secret("privateKey"),
        ],
    },
];

/// The apps of the contract, with their methods and credential fields.
const APPS: &[AppDef] = &[
    AppDef {
        app: "databricks",
        name: "Databricks",
        methods: &[MethodDef {
            name: "service-principal",
            fields: &[
                field("clientId", Kind::Str),
                secret("clientSecret"),
                field("workspaceUrl", Kind::Str),
            ],
        }],
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "mssql",
        name: "Microsoft SQL Server",
        methods: SQL_METHODS,
        platform_managed: true,
        gateway: true,
    },
    AppDef {
        app: "postgres",
        name: "PostgreSQL",
        methods: SQL_METHODS,
        platform_managed: true,
        gateway: true,
    },
    AppDef {
        app: "mysql",
        name: "MySQL",
        methods: SQL_METHODS,
        platform_managed: true,
        gateway: true,
    },
    AppDef {
        app: "azure-key-vault",
        name: "Azure Key Vault",
        methods: AZURE_METHODS,
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "azure-client-secrets",
        name: "Azure Client Secrets",
        methods: AZURE_METHODS,
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "ldap",
        name: "LDAP",
        methods: &[MethodDef {
            name: "simple-bind",
            fields: &[
                field("provider", Kind::Str),
                field("url", Kind::Str),
                field("dn", Kind::Str),
                secret("password"),
                optional("sslRejectUnauthorized", Kind::Bool),
                optional("sslCertificate", Kind::Str),
            ],
        }],
        platform_managed: false,
        gateway: true,
    },
    AppDef {
        app: "aws",
        name: "AWS",
        methods: &[
            MethodDef {
                name: "assume-role",
                fields: &[field("roleArn", Kind::Str)],
            },
            MethodDef {
                name: "access-key",
                fields: &[field("accessKeyId", Kind::Str), secret("secretAccessKey")],
            },
        ],
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "github",
        name: "GitHub",
        methods: &[
            MethodDef {
                name: "github-app",
                fields: &[secret("code"), field("installationId", Kind::Str)],
            },
            MethodDef {
                name: "oauth",
                fields: &[secret("code")],
            },
        ],
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "gcp",
        name: "GCP",
        methods: &[MethodDef {
            name: "service-account-impersonation",
            fields: &[],
        }],
        platform_managed: false,
        gateway: false,
    },
];

/// The app/method pairs the server rotates; any other pair with auto-rotation gets a 400.
pub const ROTATING: [(&str, &str); 3] = [
    ("azure-key-vault", "client-secret"),
    ("azure-client-secrets", "client-secret"),
    ("ldap", "simple-bind"),
];

fn app_def(app: &str) -> Option<&'static AppDef> {
    APPS.iter().find(|def| def.app == app)
}

fn method_def(app: &AppDef, method: &str) -> Option<&'static MethodDef> {
    app.methods.iter().find(|m| m.name == method)
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// When it arrived, since the fake started.
    pub at: Duration,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub status: u16,
    /// Whether it carried `Authorization: Bearer ...`.
    pub bearer: bool,
    /// The `Retry-After` the fake answered with, in seconds.
    pub retry_after: Option<u64>,
}

impl RecordedRequest {
    pub fn is_login(&self) -> bool {
        self.path == "/api/v1/auth/universal-auth/login"
    }

    pub fn is_renew(&self) -> bool {
        self.path == "/api/v1/auth/token/renew"
    }
}

struct Identity {
    secret: String,
    /// Refused logins within the counter window.
    refused: Vec<Instant>,
    locked_until: Option<Instant>,
}

struct IssuedToken {
    issued: Instant,
    expires_at: Option<Instant>,
    max_until: Option<Instant>,
    revoked: bool,
}

#[derive(Clone)]
struct Rotation {
    interval: u64,
    hours: u64,
    minutes: u64,
    status: Option<String>,
    last_message: Option<String>,
    next_at: Option<Timestamp>,
}

#[derive(Clone)]
struct Connection {
    id: String,
    name: String,
    description: Option<String>,
    app: &'static str,
    method: &'static str,
    project_id: Option<String>,
    /// As written, secret fields included.
    credentials: Map<String, Value>,
    platform_managed: bool,
    gateway_id: Option<String>,
    auto_rotation: bool,
    rotation: Option<Rotation>,
    credentials_hash: String,
    created_at: Timestamp,
    updated_at: Timestamp,
    dependents: u32,
}

struct Storm {
    until: Instant,
    fraction: f64,
    /// Deterministic share: every time it reaches 1, one request gets a 429.
    owed: f64,
    retry_after: u64,
}

struct FakeState {
    identities: BTreeMap<String, Identity>,
    tokens: BTreeMap<String, IssuedToken>,
    expires_in: u64,
    max_ttl: u64,
    lockout_threshold: usize,
    lockout_duration: Duration,
    lockout_window: Duration,
    connections: Vec<Connection>,
    latency: Duration,
    fail_next: Option<(usize, u16)>,
    storm: Option<Storm>,
    options_route: bool,
    deny_permissions: bool,
    live_validation_error: Option<String>,
    echo_field: Option<String>,
    requests: Vec<RecordedRequest>,
}

struct Shared {
    started: Instant,
    state: Mutex<FakeState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake Infisical on `127.0.0.1`. Stops when dropped.
pub struct FakeInfisical {
    url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeInfisical {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeInfisical {
    /// Starts the server on a free port. Tokens last 7200 s (max TTL 30 days) by default.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            started: Instant::now(),
            state: Mutex::new(FakeState {
                identities: BTreeMap::new(),
                tokens: BTreeMap::new(),
                expires_in: 7200,
                max_ttl: 2_592_000,
                lockout_threshold: 3,
                lockout_duration: Duration::from_secs(300),
                lockout_window: Duration::from_secs(30),
                connections: Vec::new(),
                latency: Duration::ZERO,
                fail_next: None,
                storm: None,
                options_route: true,
                deny_permissions: false,
                live_validation_error: None,
                echo_field: None,
                requests: Vec::new(),
            }),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr: SocketAddr = listener.local_addr().expect("local address");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake Infisical server");
        });
        Self {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Registers a machine identity's Universal Auth credentials.
    pub fn add_identity(&self, client_id: &str, client_secret: &str) {
        self.shared.lock().identities.insert(
            client_id.to_owned(),
            Identity {
                secret: client_secret.to_owned(),
                refused: Vec::new(),
                locked_until: None,
            },
        );
    }

    /// `expiresIn` and `accessTokenMaxTTL` of tokens issued from now on (0 = never).
    pub fn set_token_ttl(&self, expires_in: u64, max_ttl: u64) {
        let mut state = self.shared.lock();
        state.expires_in = expires_in;
        state.max_ttl = max_ttl;
    }

    /// Every token issued so far expires now: requests get 403 `TokenError`.
    pub fn expire_all_tokens(&self) {
        let now = Instant::now();
        for token in self.shared.lock().tokens.values_mut() {
            token.expires_at = Some(now);
        }
    }

    /// Every token issued so far is revoked: requests get 401.
    pub fn revoke_all_tokens(&self) {
        for token in self.shared.lock().tokens.values_mut() {
            token.revoked = true;
        }
    }

    /// How long an identity stays locked after three refused logins (default five minutes).
    pub fn set_lockout_duration(&self, duration: Duration) {
        self.shared.lock().lockout_duration = duration;
    }

    /// Whether the identity is locked now.
    pub fn is_locked(&self, client_id: &str) -> bool {
        let state = self.shared.lock();
        state
            .identities
            .get(client_id)
            .and_then(|i| i.locked_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Delay before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// The next `n` requests, whatever their route, fail with `status` (500, 503, ...).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.shared.lock().fail_next = Some((n, status));
    }

    /// For `duration` from now, `fraction` of the requests (spread evenly) get 429 with
    /// `Retry-After: retry_after_secs`.
    pub fn rate_limit_storm(&self, fraction: f64, duration: Duration, retry_after_secs: u64) {
        self.shared.lock().storm = Some(Storm {
            until: Instant::now() + duration,
            fraction,
            owed: 0.0,
            retry_after: retry_after_secs,
        });
    }

    /// Whether `GET /api/v1/app-connections/options` exists (older servers: 404).
    pub fn set_options_route(&self, present: bool) {
        self.shared.lock().options_route = present;
    }

    /// The identity loses its App Connection permissions: those routes answer 403
    /// `PermissionDenied` (a valid token, so a new login does not help).
    pub fn deny_permissions(&self, deny: bool) {
        self.shared.lock().deny_permissions = deny;
    }

    /// Every write carrying credentials fails live validation with 400 and this message.
    pub fn fail_live_validation(&self, message: Option<&str>) {
        self.shared.lock().live_validation_error = message.map(str::to_owned);
    }

    /// A careless server: live-validation messages end with the value of this credential
    /// field (to prove the client never lets such a value through).
    pub fn echo_credential_in_errors(&self, field: Option<&str>) {
        self.shared.lock().echo_field = field.map(str::to_owned);
    }

    /// Something (a secret sync) now uses the connection: deleting it fails with 400.
    pub fn add_dependent(&self, id: &str) {
        if let Some(conn) = self
            .shared
            .lock()
            .connections
            .iter_mut()
            .find(|c| c.id == id)
        {
            conn.dependents += 1;
        }
    }

    /// The server rotates the connection's credentials itself, as its scheduler would: a new
    /// secret, a new hash, status `success`, the next rotation one interval later.
    pub fn rotate_now(&self, id: &str) -> bool {
        let mut state = self.shared.lock();
        let Some(conn) = state.connections.iter_mut().find(|c| c.id == id) else {
            return false;
        };
        rotate(conn);
        true
    }

    /// The server's rotation of this connection fails with `message`; the hash stays.
    pub fn fail_rotation(&self, id: &str, message: &str) -> bool {
        let mut state = self.shared.lock();
        let Some(conn) = state.connections.iter_mut().find(|c| c.id == id) else {
            return false;
        };
        let Some(rotation) = conn.rotation.as_mut() else {
            return false;
        };
        rotation.status = Some("failed".into());
        rotation.last_message = Some(message.to_owned());
        true
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let mut requests = self.shared.lock().requests.clone();
        requests.sort_by_key(|r| r.at);
        requests
    }

    /// Login attempts so far.
    pub fn logins(&self) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.is_login())
            .count()
    }

    /// Requests with this method whose path starts with `prefix`.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        let state = self.shared.lock();
        state
            .requests
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .count()
    }

    /// The stored object, SECRET fields included (what a test wants to check was written).
    pub fn stored(&self, id: &str) -> Option<Value> {
        let state = self.shared.lock();
        state
            .connections
            .iter()
            .find(|c| c.id == id)
            .map(|c| view(c, true))
    }

    /// The stored object with this name in this project (None = org-level), secrets included.
    pub fn stored_by_name(&self, project_id: Option<&str>, name: &str) -> Option<Value> {
        let state = self.shared.lock();
        state
            .connections
            .iter()
            .find(|c| c.name == name && c.project_id.as_deref() == project_id)
            .map(|c| view(c, true))
    }

    /// Every stored object, secrets included.
    pub fn stored_all(&self) -> Vec<Value> {
        self.shared
            .lock()
            .connections
            .iter()
            .map(|c| view(c, true))
            .collect()
    }

    /// Creates an object directly, as someone other than appconn would. Panics on an unknown
    /// app or method. Returns its id.
    pub fn insert_connection(
        &self,
        app: &str,
        method: &str,
        name: &str,
        project_id: Option<&str>,
        credentials: Value,
    ) -> String {
        let def = app_def(app).expect("known app");
        let method = method_def(def, method).expect("known method");
        let now = Timestamp::now();
        let conn = Connection {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            description: None,
            app: def.app,
            method: method.name,
            project_id: project_id.map(str::to_owned),
            credentials: credentials.as_object().cloned().unwrap_or_default(),
            platform_managed: false,
            gateway_id: None,
            auto_rotation: false,
            rotation: None,
            credentials_hash: new_hash(),
            created_at: now,
            updated_at: now,
            dependents: 0,
        };
        let id = conn.id.clone();
        self.shared.lock().connections.push(conn);
        id
    }
}

/// An answer: status, JSON body, optional `Retry-After`.
struct Reply {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body,
            retry_after: None,
        }
    }

    fn error(status: u16, error: &str, message: impl Into<Value>) -> Self {
        let body = json!({
            "reqId": format!("req-{}", uuid::Uuid::new_v4().simple()),
            "statusCode": status,
            "message": message.into(),
            "error": error,
        });
        Self {
            status,
            body,
            retry_after: None,
        }
    }

    fn validation(issues: Vec<Value>) -> Self {
        Self::error(422, "ValidationFailure", Value::Array(issues))
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::error(400, "BadRequest", message.into())
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::error(404, "NotFound", message.into())
    }

    fn route_not_found(method: &Method, path: &str) -> Self {
        Self::error(404, "Not Found", format!("Route {method}:{path} not found"))
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = uri.path().to_owned();
    let query = uri.query().map(str::to_owned);
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));
    let reply = {
        let mut state = shared.lock();
        let reply = state.respond(&method, &path, query.as_deref(), &headers, &body);
        state.requests.push(RecordedRequest {
            at: arrived - shared.started,
            method: method.to_string(),
            path,
            query,
            status: reply.status,
            bearer,
            retry_after: reply.retry_after,
        });
        reply
    };
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        )],
        reply.body.to_string(),
    )
        .into_response();
    if let Some(seconds) = reply.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Which route a request is for.
enum Route {
    Status,
    Login,
    Renew,
    Options,
    ListAll,
    List(&'static AppDef),
    Create(&'static AppDef),
    Get(&'static AppDef, String),
    GetByName(&'static AppDef, String),
    Update(&'static AppDef, String),
    Delete(&'static AppDef, String),
    Rotate(&'static AppDef, String),
}

impl FakeState {
    fn respond(
        &mut self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Reply {
        if let Some((left, status)) = self.fail_next.as_mut() {
            let status = *status;
            *left -= 1;
            if *left == 0 {
                self.fail_next = None;
            }
            return Reply::error(status, "InternalServerError", "Something went wrong");
        }
        if let Some(storm) = self.storm.as_mut() {
            if Instant::now() >= storm.until {
                self.storm = None;
            } else {
                storm.owed += storm.fraction;
                if storm.owed >= 1.0 {
                    storm.owed -= 1.0;
                    let retry_after = storm.retry_after;
                    let mut reply = Reply::error(
                        429,
                        "RateLimitExceeded",
                        "Rate limit exceeded. Please try again later.",
                    );
                    reply.retry_after = Some(retry_after);
                    return reply;
                }
            }
        }
        let Some(route) = self.route(method, path) else {
            return Reply::route_not_found(method, path);
        };
        let project = query_param(query, "projectId");
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(body) => body,
                Err(_) => return Reply::bad_request("Body is not valid JSON"),
            }
        };
        match route {
            Route::Status => Reply::ok(json!({
                "date": Timestamp::now().to_string(),
                "message": "Ok",
                "emailConfigured": false,
                "redisConfigured": true,
            })),
            Route::Login => self.login(&body),
            Route::Renew => self.renew(&body),
            route => {
                if let Err(reply) = self.authenticate(headers) {
                    return reply;
                }
                if self.deny_permissions {
                    let mut reply = Reply::error(
                        403,
                        "PermissionDenied",
                        "You are not allowed to access App Connections",
                    );
                    reply.body["details"] =
                        json!([{"action": "read", "subject": "app-connections"}]);
                    return reply;
                }
                self.connections_route(route, project.as_deref(), &body)
            }
        }
    }

    fn route(&self, method: &Method, path: &str) -> Option<Route> {
        let decoded: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let route = match (method.as_str(), segments.as_slice()) {
            ("GET", ["api", "status"]) => Route::Status,
            ("POST", ["api", "v1", "auth", "universal-auth", "login"]) => Route::Login,
            ("POST", ["api", "v1", "auth", "token", "renew"]) => Route::Renew,
            ("GET", ["api", "v1", "app-connections"]) => Route::ListAll,
            ("GET", ["api", "v1", "app-connections", "options"]) if self.options_route => {
                Route::Options
            }
            (method, ["api", "v1", "app-connections", app, rest @ ..]) => {
                let def = app_def(app)?;
                match (method, rest) {
                    ("GET", []) => Route::List(def),
                    ("POST", []) => Route::Create(def),
                    ("GET", ["connection-name", name]) => Route::GetByName(def, name.to_string()),
                    ("GET", [id]) => Route::Get(def, id.to_string()),
                    ("PATCH", [id]) => Route::Update(def, id.to_string()),
                    ("DELETE", [id]) => Route::Delete(def, id.to_string()),
                    ("POST", [id, "rotate-credentials"]) => Route::Rotate(def, id.to_string()),
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(route)
    }

    fn login(&mut self, body: &Value) -> Reply {
        let mut issues = Vec::new();
        let client_id = required_string(body, "clientId", &mut issues);
        let client_secret = required_string(body, "clientSecret", &mut issues);
        if !issues.is_empty() {
            return Reply::validation(issues);
        }
        let (client_id, client_secret) = (client_id.unwrap(), client_secret.unwrap());
        let now = Instant::now();
        let (threshold, window, lockout) = (
            self.lockout_threshold,
            self.lockout_window,
            self.lockout_duration,
        );
        let Some(identity) = self.identities.get_mut(&client_id) else {
            return Reply::error(401, "UnauthorizedError", "Invalid credentials");
        };
        if let Some(until) = identity.locked_until {
            if now < until {
                return Reply::error(
                    401,
                    "UnauthorizedError",
                    format!(
                        "Identity is locked due to multiple failed login attempts. Try again in \
                         {} seconds.",
                        (until - now).as_secs().max(1)
                    ),
                );
            }
            identity.locked_until = None;
        }
        if identity.secret != client_secret {
            identity
                .refused
                .retain(|at| now.duration_since(*at) < window);
            identity.refused.push(now);
            if identity.refused.len() >= threshold {
                identity.refused.clear();
                identity.locked_until = Some(now + lockout);
            }
            return Reply::error(401, "UnauthorizedError", "Invalid credentials");
        }
        identity.refused.clear();
        let token = format!(
            "fake-jwt.{}.{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let (expires_in, max_ttl) = (self.expires_in, self.max_ttl);
        self.tokens.insert(
            token.clone(),
            IssuedToken {
                issued: now,
                expires_at: (expires_in > 0).then(|| now + Duration::from_secs(expires_in)),
                max_until: (max_ttl > 0).then(|| now + Duration::from_secs(max_ttl)),
                revoked: false,
            },
        );
        Reply::ok(json!({
            "accessToken": token,
            "expiresIn": expires_in,
            "accessTokenMaxTTL": max_ttl,
            "tokenType": "Bearer",
        }))
    }

    fn renew(&mut self, body: &Value) -> Reply {
        let mut issues = Vec::new();
        let Some(token) = required_string(body, "accessToken", &mut issues) else {
            return Reply::validation(issues);
        };
        let now = Instant::now();
        let expires_in = self.expires_in;
        let Some(issued) = self.tokens.get_mut(&token) else {
            return Reply::error(401, "UnauthorizedError", "Invalid access token");
        };
        if issued.revoked || issued.expires_at.is_some_and(|at| now >= at) {
            return Reply::error(
                401,
                "UnauthorizedError",
                "Failed to renew: access token expired",
            );
        }
        if issued.max_until.is_some_and(|max| now >= max) {
            return Reply::error(
                401,
                "UnauthorizedError",
                "Failed to renew access token due to max TTL expiration",
            );
        }
        let mut lifetime = Duration::from_secs(expires_in);
        if let Some(max) = issued.max_until {
            lifetime = lifetime.min(max - now);
        }
        issued.expires_at = (expires_in > 0).then(|| now + lifetime);
        let max_ttl = issued
            .max_until
            .map_or(0, |max| (max - issued.issued).as_secs());
        Reply::ok(json!({
            "accessToken": token,
            "expiresIn": if expires_in > 0 { lifetime.as_secs() } else { 0 },
            "accessTokenMaxTTL": max_ttl,
            "tokenType": "Bearer",
        }))
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<(), Reply> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = token else {
            return Err(Reply::error(
                401,
                "UnauthorizedError",
                "Missing Authorization header",
            ));
        };
        match self.tokens.get(token) {
            None => Err(Reply::error(401, "UnauthorizedError", "Invalid token")),
            Some(issued) if issued.revoked => Err(Reply::error(
                401,
                "UnauthorizedError",
                "Failed to authorize: access token revoked",
            )),
            Some(issued) if issued.expires_at.is_some_and(|at| Instant::now() >= at) => {
                Err(Reply::error(
                    403,
                    "TokenError",
                    "Your token has expired. Please re-authenticate.",
                ))
            }
            Some(_) => Ok(()),
        }
    }

    fn connections_route(&mut self, route: Route, project: Option<&str>, body: &Value) -> Reply {
        match route {
            Route::Options => Reply::ok(json!({
                "appConnectionOptions": APPS.iter().map(|def| json!({
                    "app": def.app,
                    "name": def.name,
                    "methods": def.methods.iter().map(|m| m.name).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })),
            Route::ListAll | Route::List(_) => {
                let app = match route {
                    Route::List(def) => Some(def.app),
                    _ => None,
                };
                let list: Vec<Value> = self
                    .connections
                    .iter()
                    .filter(|c| {
                        c.project_id.as_deref() == project && app.is_none_or(|a| c.app == a)
                    })
                    .map(|c| view(c, false))
                    .collect();
                Reply::ok(json!({"appConnections": list}))
            }
            Route::Get(def, id) => match self.find(def, &id) {
                Some(conn) => Reply::ok(json!({"appConnection": view(conn, false)})),
                None => Reply::not_found(format!("Could not find App Connection with ID {id}")),
            },
            Route::GetByName(def, name) => {
                let found = self.connections.iter().find(|c| {
                    c.app == def.app && c.name == name && c.project_id.as_deref() == project
                });
                match found {
                    Some(conn) => Reply::ok(json!({"appConnection": view(conn, false)})),
                    None => {
                        Reply::not_found(format!("Could not find App Connection with name {name}"))
                    }
                }
            }
            Route::Create(def) => self.create(def, body),
            Route::Update(def, id) => self.update(def, &id, body),
            Route::Delete(def, id) => {
                let Some(index) = self
                    .connections
                    .iter()
                    .position(|c| c.app == def.app && c.id == id)
                else {
                    return Reply::not_found(format!("Could not find App Connection with ID {id}"));
                };
                let conn = &self.connections[index];
                if conn.dependents > 0 {
                    return Reply::bad_request(format!(
                        "Cannot delete App Connection \"{}\": it is used by {} secret sync(s). \
                         Remove them first.",
                        conn.name, conn.dependents
                    ));
                }
                let conn = self.connections.remove(index);
                Reply::ok(json!({"appConnection": view(&conn, false)}))
            }
            Route::Rotate(def, id) => {
                let Some(conn) = self
                    .connections
                    .iter_mut()
                    .find(|c| c.app == def.app && c.id == id)
                else {
                    return Reply::not_found(format!("Could not find App Connection with ID {id}"));
                };
                if !ROTATING.contains(&(conn.app, conn.method)) {
                    return Reply::bad_request(rotation_refused(def, conn.method));
                }
                let before = view(conn, false);
                rotate(conn);
                Reply::ok(json!({"appConnection": before}))
            }
            Route::Status | Route::Login | Route::Renew => unreachable!("handled before"),
        }
    }

    fn find(&self, def: &AppDef, id: &str) -> Option<&Connection> {
        self.connections
            .iter()
            .find(|c| c.app == def.app && c.id == id)
    }

    fn name_taken(&self, name: &str, project: Option<&str>, except: Option<&str>) -> bool {
        self.connections.iter().any(|c| {
            c.name == name && c.project_id.as_deref() == project && Some(c.id.as_str()) != except
        })
    }

    /// 400 with the live-validation message when that knob is set.
    fn live_validation(&self, credentials: &Map<String, Value>) -> Option<Reply> {
        let message = self.live_validation_error.as_ref()?;
        let echoed = self
            .echo_field
            .as_ref()
            .and_then(|field| credentials.get(field))
            .map(|value| match value {
                Value::String(s) => format!(" ({s})"),
                other => format!(" ({other})"),
            })
            .unwrap_or_default();
        Some(Reply::bad_request(format!("{message}{echoed}")))
    }

    fn create(&mut self, def: &'static AppDef, body: &Value) -> Reply {
        let write = match parse_write(def, body, None) {
            Ok(write) => write,
            Err(issues) => return Reply::validation(issues),
        };
        let method = write.method.expect("required on create");
        let name = write.name.expect("required on create");
        let credentials = write.credentials.expect("required on create");
        let auto_rotation = write.auto_rotation.unwrap_or(false);
        if auto_rotation && !ROTATING.contains(&(def.app, method.name)) {
            return Reply::bad_request(rotation_refused(def, method.name));
        }
        if self.name_taken(&name, write.project_id.as_deref(), None) {
            return Reply::bad_request(format!(
                "An App Connection with the name \"{name}\" already exists"
            ));
        }
        if let Some(reply) = self.live_validation(&credentials) {
            return reply;
        }
        let now = Timestamp::now();
        let rotation = write.rotation.map(|(interval, hours, minutes)| Rotation {
            interval,
            hours,
            minutes,
            status: None,
            last_message: None,
            next_at: auto_rotation.then(|| next_rotation(now, interval, hours, minutes)),
        });
        let conn = Connection {
            id: uuid::Uuid::new_v4().to_string(),
            name,
            description: write.description.flatten(),
            app: def.app,
            method: method.name,
            project_id: write.project_id,
            credentials,
            platform_managed: write.platform_managed.unwrap_or(false),
            gateway_id: write.gateway_id.flatten(),
            auto_rotation,
            rotation,
            credentials_hash: new_hash(),
            created_at: now,
            updated_at: now,
            dependents: 0,
        };
        let reply = Reply::ok(json!({"appConnection": view(&conn, false)}));
        self.connections.push(conn);
        reply
    }

    fn update(&mut self, def: &'static AppDef, id: &str, body: &Value) -> Reply {
        let Some(index) = self
            .connections
            .iter()
            .position(|c| c.app == def.app && c.id == id)
        else {
            return Reply::not_found(format!("Could not find App Connection with ID {id}"));
        };
        let existing = self.connections[index].clone();
        let write = match parse_write(def, body, Some(&existing)) {
            Ok(write) => write,
            Err(issues) => return Reply::validation(issues),
        };
        let auto_rotation = write.auto_rotation.unwrap_or(existing.auto_rotation);
        if auto_rotation && !ROTATING.contains(&(def.app, existing.method)) {
            return Reply::bad_request(rotation_refused(def, existing.method));
        }
        if let Some(name) = &write.name
            && self.name_taken(name, existing.project_id.as_deref(), Some(id))
        {
            return Reply::bad_request(format!(
                "An App Connection with the name \"{name}\" already exists"
            ));
        }
        if existing.platform_managed && write.platform_managed == Some(false) {
            return Reply::bad_request("Platform managed credentials cannot be disabled");
        }
        if let Some(credentials) = &write.credentials
            && let Some(reply) = self.live_validation(credentials)
        {
            return reply;
        }
        let now = Timestamp::now();
        let conn = &mut self.connections[index];
        if let Some(name) = write.name {
            conn.name = name;
        }
        if let Some(description) = write.description {
            conn.description = description;
        }
        if let Some(credentials) = write.credentials {
            conn.credentials = credentials;
            conn.credentials_hash = new_hash();
        }
        if let Some(platform_managed) = write.platform_managed {
            conn.platform_managed = platform_managed;
        }
        if let Some(gateway_id) = write.gateway_id {
            conn.gateway_id = gateway_id;
        }
        if let Some((interval, hours, minutes)) = write.rotation {
            let old = conn.rotation.take();
            conn.rotation = Some(Rotation {
                interval,
                hours,
                minutes,
                status: old.as_ref().and_then(|r| r.status.clone()),
                last_message: old.and_then(|r| r.last_message),
                next_at: None,
            });
        }
        conn.auto_rotation = auto_rotation;
        if let Some(rotation) = conn.rotation.as_mut() {
            rotation.next_at = auto_rotation
                .then(|| next_rotation(now, rotation.interval, rotation.hours, rotation.minutes));
        }
        conn.updated_at = now;
        Reply::ok(json!({"appConnection": view(conn, false)}))
    }
}

/// The fields of a create or update body, after zod-like validation.
struct Write {
    name: Option<String>,
    description: Option<Option<String>>,
    method: Option<&'static MethodDef>,
    credentials: Option<Map<String, Value>>,
    project_id: Option<String>,
    platform_managed: Option<bool>,
    gateway_id: Option<Option<String>>,
    auto_rotation: Option<bool>,
    rotation: Option<(u64, u64, u64)>,
}

/// Validates a create body (`existing` None) or an update body against the app's schema, the
/// way zod would: every issue at once, unknown keys refused.
fn parse_write(
    def: &AppDef,
    body: &Value,
    existing: Option<&Connection>,
) -> Result<Write, Vec<Value>> {
    let Some(object) = body.as_object() else {
        return Err(vec![issue(
            &[],
            "invalid_type",
            format!("Expected object, received {}", type_name(body)),
        )]);
    };
    let creating = existing.is_none();
    let mut allowed = vec![
        "name",
        "description",
        "credentials",
        "isAutoRotationEnabled",
        "rotation",
    ];
    if creating {
        allowed.extend(["method", "projectId"]);
    }
    if def.platform_managed {
        allowed.push("isPlatformManagedCredentials");
    }
    if def.gateway {
        allowed.push("gatewayId");
    }
    let mut issues = Vec::new();
    let unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if !unknown.is_empty() {
        let quoted: Vec<String> = unknown.iter().map(|k| format!("'{k}'")).collect();
        issues.push(json!({
            "code": "unrecognized_keys",
            "keys": unknown,
            "path": [],
            "message": format!("Unrecognized key(s) in object: {}", quoted.join(", ")),
        }));
    }

    let name = match object.get("name") {
        None if creating => {
            issues.push(issue(&["name"], "invalid_type", "Required"));
            None
        }
        None => None,
        Some(Value::String(name)) => {
            let name = name.trim();
            if name.is_empty() {
                issues.push(issue(
                    &["name"],
                    "too_small",
                    "String must contain at least 1 character(s)",
                ));
            } else if name.chars().count() > 64 {
                issues.push(issue(
                    &["name"],
                    "too_big",
                    "String must contain at most 64 character(s)",
                ));
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                issues.push(issue(&["name"], "custom", "Must be valid slug"));
            }
            Some(name.to_owned())
        }
        Some(other) => {
            issues.push(type_issue(&["name"], "string", other));
            None
        }
    };

    let description = match object.get("description") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(d)) if d.chars().count() > 256 => {
            issues.push(issue(
                &["description"],
                "too_big",
                "String must contain at most 256 character(s)",
            ));
            None
        }
        Some(Value::String(d)) => Some(Some(d.clone())),
        Some(other) => {
            issues.push(type_issue(&["description"], "string", other));
            None
        }
    };

    let method = match (existing, object.get("method")) {
        (Some(existing), _) => method_def(def, existing.method),
        (None, Some(Value::String(m))) if method_def(def, m).is_some() => method_def(def, m),
        (None, _) => {
            let expected: Vec<String> = def
                .methods
                .iter()
                .map(|m| format!("'{}'", m.name))
                .collect();
            issues.push(issue(
                &["method"],
                "invalid_union_discriminator",
                format!(
                    "Invalid discriminator value. Expected {}",
                    expected.join(" | ")
                ),
            ));
            None
        }
    };

    let credentials = match (object.get("credentials"), method) {
        (None, _) if creating => {
            issues.push(issue(&["credentials"], "invalid_type", "Required"));
            None
        }
        (None, _) => None,
        (Some(Value::Object(given)), Some(method)) => {
            check_credentials(method, given, &mut issues);
            Some(given.clone())
        }
        (Some(Value::Object(_)), None) => None,
        (Some(other), _) => {
            issues.push(type_issue(&["credentials"], "object", other));
            None
        }
    };

    let project_id = match object.get("projectId") {
        None => None,
        Some(Value::String(p)) if !p.trim().is_empty() => Some(p.clone()),
        Some(Value::String(_)) => {
            issues.push(issue(
                &["projectId"],
                "too_small",
                "String must contain at least 1 character(s)",
            ));
            None
        }
        Some(other) => {
            issues.push(type_issue(&["projectId"], "string", other));
            None
        }
    };

    let platform_managed = optional_bool(object, "isPlatformManagedCredentials", &mut issues);
    let gateway_id = match object.get("gatewayId") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(g)) => Some(Some(g.clone())),
        Some(other) => {
            issues.push(type_issue(&["gatewayId"], "string", other));
            None
        }
    };
    let auto_rotation = optional_bool(object, "isAutoRotationEnabled", &mut issues);
    let rotation = match object.get("rotation") {
        None | Some(Value::Null) => None,
        Some(rotation) => parse_rotation(rotation, &mut issues),
    };
    let has_rotation = rotation.is_some() || existing.is_some_and(|e| e.rotation.is_some());
    if auto_rotation == Some(true) && !has_rotation && !object.contains_key("rotation") {
        issues.push(issue(
            &["rotation"],
            "custom",
            "Rotation configuration is required when auto-rotation is enabled",
        ));
    }

    if issues.is_empty() {
        Ok(Write {
            name,
            description,
            method,
            credentials,
            project_id,
            platform_managed,
            gateway_id,
            auto_rotation,
            rotation,
        })
    } else {
        Err(issues)
    }
}

fn check_credentials(method: &MethodDef, given: &Map<String, Value>, issues: &mut Vec<Value>) {
    for field in method.fields {
        match given.get(field.name) {
            None if field.required => {
                issues.push(issue(
                    &["credentials", field.name],
                    "invalid_type",
                    "Required",
                ));
            }
            None => {}
            Some(value) => {
                let (ok, expected) = match field.kind {
                    Kind::Str => (value.is_string(), "string"),
                    Kind::Num => (value.is_number(), "number"),
                    Kind::Bool => (value.is_boolean(), "boolean"),
                };
                if !ok {
                    issues.push(type_issue(&["credentials", field.name], expected, value));
                } else if field.kind == Kind::Str
                    && field.required
                    && value.as_str().is_some_and(|s| s.trim().is_empty())
                {
                    issues.push(issue(
                        &["credentials", field.name],
                        "too_small",
                        "String must contain at least 1 character(s)",
                    ));
                }
            }
        }
    }
    let unknown: Vec<&str> = given
        .keys()
        .map(String::as_str)
        .filter(|k| !method.fields.iter().any(|f| f.name == *k))
        .collect();
    if !unknown.is_empty() {
        let quoted: Vec<String> = unknown.iter().map(|k| format!("'{k}'")).collect();
        issues.push(json!({
            "code": "unrecognized_keys",
            "keys": unknown,
            "path": ["credentials"],
            "message": format!("Unrecognized key(s) in object: {}", quoted.join(", ")),
        }));
    }
}

fn parse_rotation(rotation: &Value, issues: &mut Vec<Value>) -> Option<(u64, u64, u64)> {
    let Some(object) = rotation.as_object() else {
        issues.push(type_issue(&["rotation"], "object", rotation));
        return None;
    };
    let before = issues.len();
    let number =
        |value: Option<&Value>, path: &[&str], min: u64, max: u64, issues: &mut Vec<Value>| {
            match value {
                None => {
                    issues.push(issue(path, "invalid_type", "Required"));
                    None
                }
                Some(v) => match v.as_u64() {
                    Some(n) if n < min => {
                        issues.push(issue(
                            path,
                            "too_small",
                            format!("Number must be greater than or equal to {min}"),
                        ));
                        None
                    }
                    Some(n) if n > max => {
                        issues.push(issue(
                            path,
                            "too_big",
                            format!("Number must be less than or equal to {max}"),
                        ));
                        None
                    }
                    Some(n) => Some(n),
                    None => {
                        issues.push(type_issue(path, "number", v));
                        None
                    }
                },
            }
        };
    let interval = number(
        object.get("rotationInterval"),
        &["rotation", "rotationInterval"],
        1,
        365,
        issues,
    );
    let at = object.get("rotateAtUtc");
    let (hours, minutes) = match at.and_then(Value::as_object) {
        Some(at) => (
            number(
                at.get("hours"),
                &["rotation", "rotateAtUtc", "hours"],
                0,
                23,
                issues,
            ),
            number(
                at.get("minutes"),
                &["rotation", "rotateAtUtc", "minutes"],
                0,
                59,
                issues,
            ),
        ),
        None => {
            match at {
                None => issues.push(issue(
                    &["rotation", "rotateAtUtc"],
                    "invalid_type",
                    "Required",
                )),
                Some(other) => {
                    issues.push(type_issue(&["rotation", "rotateAtUtc"], "object", other))
                }
            }
            (None, None)
        }
    };
    (issues.len() == before).then(|| (interval.unwrap(), hours.unwrap(), minutes.unwrap()))
}

fn optional_bool(object: &Map<String, Value>, key: &str, issues: &mut Vec<Value>) -> Option<bool> {
    match object.get(key) {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            issues.push(type_issue(&[key], "boolean", other));
            None
        }
    }
}

fn required_string(body: &Value, key: &str, issues: &mut Vec<Value>) -> Option<String> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            issues.push(issue(
                &[key],
                "too_small",
                "String must contain at least 1 character(s)",
            ));
            None
        }
        None => {
            issues.push(issue(&[key], "invalid_type", "Required"));
            None
        }
        Some(other) => {
            issues.push(type_issue(&[key], "string", other));
            None
        }
    }
}

fn issue(path: &[&str], code: &str, message: impl Into<String>) -> Value {
    json!({"code": code, "path": path, "message": message.into()})
}

fn type_issue(path: &[&str], expected: &str, got: &Value) -> Value {
    json!({
        "code": "invalid_type",
        "expected": expected,
        "received": type_name(got),
        "path": path,
        "message": format!("Expected {expected}, received {}", type_name(got)),
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn rotation_refused(def: &AppDef, method: &str) -> String {
    format!(
        "Auto-rotation is not supported for {} connections using the \"{method}\" method",
        def.name
    )
}

/// What the server's rotation does: a new secret value, a new hash, the next date.
fn rotate(conn: &mut Connection) {
    let Some(method) = app_def(conn.app).and_then(|def| method_def(def, conn.method)) else {
        return;
    };
    for field in method.fields.iter().filter(|f| f.secret) {
        if conn.credentials.contains_key(field.name) {
            conn.credentials.insert(
                field.name.to_owned(),
                Value::String(format!("rotated-{}", uuid::Uuid::new_v4().simple())),
            );
        }
    }
    conn.credentials_hash = new_hash();
    let now = Timestamp::now();
    conn.updated_at = now;
    if let Some(rotation) = conn.rotation.as_mut() {
        rotation.status = Some("success".into());
        rotation.last_message = None;
        rotation.next_at = conn
            .auto_rotation
            .then(|| next_rotation(now, rotation.interval, rotation.hours, rotation.minutes));
    }
}

/// `interval` days from today, at `hours:minutes` UTC.
fn next_rotation(now: Timestamp, interval: u64, hours: u64, minutes: u64) -> Timestamp {
    let day = now
        .to_zoned(TimeZone::UTC)
        .date()
        .checked_add(Span::new().days(interval as i64))
        .expect("within range");
    day.at(hours as i8, minutes as i8, 0, 0)
        .to_zoned(TimeZone::UTC)
        .expect("UTC has no gaps")
        .timestamp()
}

/// Infisical hashes the credentials encrypted with a fresh IV: to a client, random.
fn new_hash() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn iso(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The response object; `with_secrets` only for tests reading what was stored.
fn view(conn: &Connection, with_secrets: bool) -> Value {
    let secret_fields: Vec<&str> = app_def(conn.app)
        .and_then(|def| method_def(def, conn.method))
        .map(|m| {
            m.fields
                .iter()
                .filter(|f| f.secret)
                .map(|f| f.name)
                .collect()
        })
        .unwrap_or_default();
    let credentials: Map<String, Value> = conn
        .credentials
        .iter()
        .filter(|(k, _)| with_secrets || !secret_fields.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let rotation = conn.rotation.as_ref().map(|r| {
        json!({
            "rotationInterval": r.interval,
            "rotateAtUtc": {"hours": r.hours, "minutes": r.minutes},
            "rotationStatus": r.status,
            "lastRotationMessage": r.last_message,
            "nextRotationAt": r.next_at.map(iso),
        })
    });
    let mut view = json!({
        "id": conn.id,
        "name": conn.name,
        "description": conn.description,
        "app": conn.app,
        "method": conn.method,
        "credentials": credentials,
        "version": 1,
        "orgId": ORG_ID,
        "projectId": conn.project_id,
        "createdAt": iso(conn.created_at),
        "updatedAt": iso(conn.updated_at),
        "isPlatformManagedCredentials": conn.platform_managed,
        "gatewayId": conn.gateway_id,
        "isAutoRotationEnabled": conn.auto_rotation,
        "rotation": rotation,
        "credentialsHash": conn.credentials_hash,
    });
    if with_secrets {
        view["dependents"] = conn.dependents.into();
    }
    view
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key && !v.is_empty()).then(|| percent_decode(v))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

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

        async fn call(
            &self,
            method: &str,
            path: &str,
            body: Option<Value>,
        ) -> (u16, Value, HeaderMap) {
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
}
