//! A fake Credible Data server: the connection routes of the Malloy Publisher API under
//! `/api/v0`, following `backends/credible.md` and what the real open-source server was seen to
//! do, quirks included.
//!
//! What it models: `/projects/{p}/connections` and `/environments/{p}/connections` answering
//! alike; list as a plain array; create answering 201 `{"message"}`, 500 for a name that exists
//! (409 by a knob) and storing under the BODY name; PATCH as a shallow top-level merge that
//! replaces whole `<type>Connection` blocks (and keeps the old block when `type` changes);
//! DELETE; `POST /connections/test` answering 200 with a verdict; unknown projects 404 on reads
//! but 500 on writes; 500 for malformed JSON and a missing `name`; 400 for a missing `type` and
//! the reserved name `duckdb`; `attributes` computed by the server, `resource` stored as sent;
//! secrets in clear on reads (stripped by a knob, as hosted servers may); no auth unless a token
//! is set; 403 on writes while the config is frozen; errors as `{"code","message"}`, or the
//! spec's other two shapes by a knob. Express answers unknown routes with an HTML 404.
//!
//! Where the contract is silent: a create whose BODY name is taken answers like one whose path
//! name is; PATCH merges every top-level field, `name` included, under the path name; a
//! `resource` left out is set to the connection's path; an unknown `type` and a path name
//! outside `^[A-Za-z0-9_-]+$` are 400s; the token check comes before anything else, and the
//! test endpoint answers while the config is frozen.
//!
//! Nothing here logs a request or response body: credentials travel in them.

use std::collections::BTreeMap;

use axum::http::header::CONTENT_TYPE;
use serde_json::{Map, Value, json};

use super::server::{Backend, Fake, Injected, Reply, Request, reason};

/// The connection types the server knows, with the dialect its `attributes` report.
const TYPES: &[(&str, &str)] = &[
    ("postgres", "postgres"),
    ("bigquery", "standardsql"),
    ("snowflake", "snowflake"),
    ("trino", "trino"),
    ("mysql", "mysql"),
    ("duckdb", "duckdb"),
    ("motherduck", "duckdb"),
];

/// Fields a hosted server strips from the `<type>Connection` blocks it returns.
const SECRET_FIELDS: &[&str] = &[
    "password",
    "connectionString",
    "privateKey",
    "privateKeyPass",
    "serviceAccountKeyJson",
    "peakaKey",
    "accessToken",
];

/// How error bodies look; the spec shows all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"code": 404, "message": "..."}`, what the server answers.
    CodeMessage,
    /// `{"message": "...", "details": "<reason phrase>"}`.
    MessageDetails,
    /// `{"error": "..."}`.
    Error,
}

type Connections = BTreeMap<String, Map<String, Value>>;

/// The fake Credible's state, reached through [`FakeCredible`]'s methods.
pub struct State {
    projects: BTreeMap<String, Connections>,
    token: Option<String>,
    strip_secrets: bool,
    frozen: bool,
    duplicate_status: u16,
    error_shape: ErrorShape,
    test_failure: Option<String>,
    tested: Vec<Value>,
}

/// A running fake Credible Data server on `127.0.0.1`. Stops when dropped. The shared knobs
/// and the request record come from the [`Server`](super::server::Server) it derefs to.
pub type FakeCredible = Fake<State>;

impl FakeCredible {
    /// Starts an open-source-like server: no projects, no auth, secrets in clear.
    pub async fn start() -> Self {
        Self::serve(State {
            projects: BTreeMap::new(),
            token: None,
            strip_secrets: false,
            frozen: false,
            duplicate_status: 500,
            error_shape: ErrorShape::CodeMessage,
            test_failure: None,
            tested: Vec::new(),
        })
        .await
    }

    /// The API base, e.g. `http://127.0.0.1:41234/api/v0`.
    pub fn url(&self) -> String {
        format!("{}/api/v0", self.origin())
    }

    /// A project (an environment, on newer servers) with no connections.
    pub fn add_project(&self, project: &str) {
        self.state().projects.entry(project.to_owned()).or_default();
    }

    /// The bearer token every route requires (401 without it); None is the open-source
    /// server, which needs no authentication.
    pub fn require_token(&self, token: Option<&str>) {
        self.state().token = token.map(str::to_owned);
    }

    /// Hosted behaviour: GET and the list leave out secret fields.
    pub fn strip_secrets(&self, strip: bool) {
        self.state().strip_secrets = strip;
    }

    /// A frozen config: create, PATCH and DELETE answer 403.
    pub fn freeze_config(&self, frozen: bool) {
        self.state().frozen = frozen;
    }

    /// The status of a create whose name exists: 500 (the server) or 409 (the spec).
    pub fn set_duplicate_status(&self, status: u16) {
        self.state().duplicate_status = status;
    }

    pub fn set_error_shape(&self, shape: ErrorShape) {
        self.state().error_shape = shape;
    }

    /// The verdict of `POST /connections/test`: None = ok, Some = failed with this driver
    /// message.
    pub fn set_test_result(&self, failure: Option<&str>) {
        self.state().test_failure = failure.map(str::to_owned);
    }

    /// The connections `POST /connections/test` received, in order, secrets included.
    pub fn tested(&self) -> Vec<Value> {
        self.state().tested.clone()
    }

    /// The stored connection, secrets included.
    pub fn stored(&self, project: &str, name: &str) -> Option<Value> {
        self.state()
            .projects
            .get(project)?
            .get(name)
            .cloned()
            .map(Value::Object)
    }

    /// Every stored connection of the project, by name, secrets included.
    pub fn stored_all(&self, project: &str) -> Vec<Value> {
        self.state()
            .projects
            .get(project)
            .map(|c| c.values().cloned().map(Value::Object).collect())
            .unwrap_or_default()
    }

    /// Stores a connection as given, under its `name`, as someone other than appconn would;
    /// adds the project if needed. Panics without a `name`.
    pub fn insert_connection(&self, project: &str, connection: Value) {
        let Value::Object(connection) = connection else {
            panic!("a connection is an object");
        };
        let name = connection["name"].as_str().expect("a name").to_owned();
        self.state()
            .projects
            .entry(project.to_owned())
            .or_default()
            .insert(name, connection);
    }

    /// Sets the top-level fields of `patch` on a stored connection, as someone other than
    /// appconn would. False if there is no such connection.
    pub fn edit_connection(&self, project: &str, name: &str, patch: Value) -> bool {
        let mut state = self.state();
        let Some(stored) = state
            .projects
            .get_mut(project)
            .and_then(|c| c.get_mut(name))
        else {
            return false;
        };
        if let Value::Object(patch) = patch {
            stored.extend(patch);
        }
        true
    }

    /// Deletes a connection behind the client's back. False if there was none.
    pub fn delete_connection(&self, project: &str, name: &str) -> bool {
        self.state()
            .projects
            .get_mut(project)
            .and_then(|c| c.remove(name))
            .is_some()
    }
}

enum Route {
    List(String),
    Get(String, String),
    Create(String, String),
    Update(String, String),
    Delete(String, String),
    Test,
}

fn route(request: &Request) -> Option<Route> {
    let segments = request.segments();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let route = match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["api", "v0", "connections", "test"]) => Route::Test,
        (
            method,
            [
                "api",
                "v0",
                "projects" | "environments",
                project,
                "connections",
                rest @ ..,
            ],
        ) => {
            let project = project.to_string();
            match (method, rest) {
                ("GET", []) => Route::List(project),
                ("GET", [name]) => Route::Get(project, name.to_string()),
                ("POST", [name]) => Route::Create(project, name.to_string()),
                ("PATCH", [name]) => Route::Update(project, name.to_string()),
                ("DELETE", [name]) => Route::Delete(project, name.to_string()),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(route)
}

/// What express's JSON parser makes of a body: `{}` unless it is sent as JSON, an error
/// (answered 500 by the server) unless it is an object or an array.
fn parse_body(request: &Request) -> Result<Value, String> {
    let json = request
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json || request.body.is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(&request.body) {
        Ok(body @ (Value::Object(_) | Value::Array(_))) => Ok(body),
        Ok(_) => Err("Unexpected token in JSON: only objects and arrays are accepted".into()),
        Err(err) => Err(format!("Unexpected token in JSON: {err}")),
    }
}

fn message(status: u16, text: String) -> Reply {
    Reply::json(status, &json!({ "message": text }))
}

impl State {
    fn error(&self, status: u16, message: impl Into<String>) -> Reply {
        let message = message.into();
        let body = match self.error_shape {
            ErrorShape::CodeMessage => json!({"code": status, "message": message}),
            ErrorShape::MessageDetails => json!({
                "message": message,
                "details": reason(status),
            }),
            ErrorShape::Error => json!({ "error": message }),
        };
        Reply::json(status, &body)
    }

    /// GET and list: 404 for an unknown project.
    fn readable(&self, project: &str) -> Result<&Connections, Reply> {
        self.projects.get(project).ok_or_else(|| {
            self.error(
                404,
                format!("Environment \"{project}\" could not be resolved to a path"),
            )
        })
    }

    /// Create, PATCH and DELETE: 500 for an unknown project. A body that is not an object
    /// reads as an empty one, as JavaScript's property access and spread make it.
    fn writable(&self, project: &str, body: Value) -> Result<Map<String, Value>, Reply> {
        if !self.projects.contains_key(project) {
            return Err(self.error(
                500,
                format!("Environment \"{project}\" not found in database"),
            ));
        }
        Ok(match body {
            Value::Object(body) => body,
            _ => Map::new(),
        })
    }

    /// What GET and the list return.
    fn view(&self, stored: &Map<String, Value>) -> Value {
        let mut view = stored.clone();
        if self.strip_secrets {
            for (key, block) in view.iter_mut() {
                if let (true, Value::Object(block)) = (key.ends_with("Connection"), block) {
                    block.retain(|field, _| !SECRET_FIELDS.contains(&field.as_str()));
                }
            }
        }
        Value::Object(view)
    }

    /// 400 for a `type` the server does not know or a reserved name.
    fn check_type_and_name(&self, body: &Map<String, Value>) -> Result<(), Reply> {
        if let Some(kind) = body.get("type")
            && !TYPES.iter().any(|(t, _)| Some(*t) == kind.as_str())
        {
            return Err(self.error(400, format!("Unsupported connection type {kind}")));
        }
        if body.get("name").and_then(Value::as_str) == Some("duckdb") {
            return Err(self.error(400, "Connection name \"duckdb\" is reserved"));
        }
        Ok(())
    }

    fn create(&mut self, project: &str, path_name: &str, body: Value) -> Reply {
        let body = match self.writable(project, body) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let Some(name) = body.get("name").and_then(Value::as_str).map(str::to_owned) else {
            return self.error(500, "Invalid connection configuration. No name.");
        };
        if !body.contains_key("type") {
            return self.error(400, "Connection type is required");
        }
        if let Err(reply) = self.check_type_and_name(&body) {
            return reply;
        }
        // Existence is checked by the path name, the connection stored by the body name.
        let connections = &self.projects[project];
        if let Some(taken) = [path_name, name.as_str()]
            .into_iter()
            .find(|n| connections.contains_key(*n))
        {
            return self.error(
                self.duplicate_status,
                format!("Connection \"{taken}\" already exists in environment \"{project}\"."),
            );
        }
        let mut stored = body;
        stored
            .entry("resource")
            .or_insert_with(|| format!("/api/v0/projects/{project}/connections/{name}").into());
        with_attributes(&mut stored);
        self.projects
            .get_mut(project)
            .expect("checked")
            .insert(name.clone(), stored);
        message(201, format!("Connection \"{name}\" created successfully"))
    }

    fn update(&mut self, project: &str, name: &str, body: Value) -> Reply {
        let patch = match self.writable(project, body) {
            Ok(patch) => patch,
            Err(reply) => return reply,
        };
        if let Err(reply) = self.check_type_and_name(&patch) {
            return reply;
        }
        let Some(stored) = self.projects.get_mut(project).and_then(|c| c.get_mut(name)) else {
            return self.error(
                404,
                format!("Connection \"{name}\" not found in environment \"{project}\""),
            );
        };
        stored.extend(patch);
        with_attributes(stored);
        message(200, format!("Connection \"{name}\" updated successfully"))
    }

    fn delete(&mut self, project: &str, name: &str) -> Reply {
        if let Err(reply) = self.writable(project, Value::Null) {
            return reply;
        }
        match self.projects.get_mut(project).and_then(|c| c.remove(name)) {
            Some(_) => message(200, format!("Connection \"{name}\" deleted successfully")),
            None => self.error(
                404,
                format!("Connection \"{name}\" not found in environment \"{project}\""),
            ),
        }
    }

    fn test(&mut self, body: Value) -> Reply {
        let connection = match body.get("config") {
            Some(config @ Value::Object(_)) => config.clone(),
            _ => body,
        };
        if connection.get("type").is_none() {
            return self.error(400, "Connection type is required");
        }
        self.tested.push(connection);
        let (status, error) = match &self.test_failure {
            None => ("ok", String::new()),
            Some(failure) => ("failed", failure.clone()),
        };
        Reply::json(200, &json!({"status": status, "errorMessage": error}))
    }
}

/// The server computes `attributes` from the connection's type, over whatever was sent.
fn with_attributes(connection: &mut Map<String, Value>) {
    let dialect = connection
        .get("type")
        .and_then(Value::as_str)
        .and_then(|kind| TYPES.iter().find(|(t, _)| *t == kind))
        .map(|(_, dialect)| *dialect);
    connection.insert(
        "attributes".into(),
        json!({
            "dialectName": dialect,
            "isPool": false,
            "canPersist": true,
            "canStream": true,
        }),
    );
}

/// Publisher's route pattern for connection names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Backend for State {
    fn respond(&mut self, request: &Request) -> Reply {
        if let Some(token) = &self.token
            && request.bearer() != Some(token.as_str())
        {
            return self.error(401, "Unauthorized");
        }
        let body = match parse_body(request) {
            Ok(body) => body,
            Err(err) => return self.error(500, err),
        };
        let Some(route) = route(request) else {
            return Reply::text(
                404,
                "text/html; charset=utf-8",
                format!("<pre>Cannot {} {}</pre>", request.method, request.path),
            );
        };
        if let Route::Create(_, name) | Route::Update(_, name) | Route::Delete(_, name) = &route {
            if self.frozen {
                return self.error(
                    403,
                    "Publisher config can't be updated when publisher.config.json has \
                     { frozenConfig: true }",
                );
            }
            if !valid_name(name) {
                return self.error(400, format!("Invalid connection name \"{name}\""));
            }
        }
        match route {
            Route::List(project) => match self.readable(&project) {
                Ok(connections) => {
                    let list: Vec<Value> = connections.values().map(|c| self.view(c)).collect();
                    Reply::json(200, &Value::Array(list))
                }
                Err(reply) => reply,
            },
            Route::Get(project, name) => {
                let found = self
                    .readable(&project)
                    .map(|connections| connections.get(&name).map(|c| self.view(c)));
                match found {
                    Ok(Some(view)) => Reply::json(200, &view),
                    Ok(None) => self.error(404, format!("Connection {name} not found")),
                    Err(reply) => reply,
                }
            }
            Route::Create(project, name) => self.create(&project, &name, body),
            Route::Update(project, name) => self.update(&project, &name, body),
            Route::Delete(project, name) => self.delete(&project, &name),
            Route::Test => self.test(body),
        }
    }

    fn injected(&self, status: u16, cause: Injected, _: &Request) -> Reply {
        match cause {
            Injected::RateLimited => self.error(429, "Too many requests, please try again later."),
            Injected::Failure => self.error(status, reason(status)),
        }
    }
}
