//! A fake Matillion Data Productivity Cloud: the OAuth token endpoint and the connection routes,
//! following `backends/matillion.md`.
//!
//! What it models: client-credentials tokens from `/oauth/dpc/token` (form-encoded, refused the
//! way an OAuth server refuses them: `{"error","error_description"}` with 400, 401 or 403),
//! bearer checks on every `/dpc` route (401 otherwise), connections addressed by NAME under
//! `/dpc/v1/projects/{projectId}/connections`: create (201, or 200 by a knob), a filtered and
//! paged list (`{page,size,total,results}`, with a small page size so clients must page), PUT
//! `?connectionName=` as a FULL replacement, DELETE `?connectionName=` and no get-one route;
//! validation of `platformConnectionType`, `authType`, a `COMPONENT_BASIC` secret name and a
//! UUID project; a taken name answered 409 (or 400 naming it, by a knob); errors in RFC 7807
//! form `{type,title,status,detail,instance,violations}`.
//!
//! Design choices where the contract is silent: DELETE answers 204; `connectionNames` matches
//! names exactly unless a knob makes it loose; the server keeps only the fields of the
//! contract's body (others are dropped, as a Jackson DTO would) and leaves absent ones out of
//! its answers; a PUT may rename through its body's `name`; a `size` above the page size is cut
//! to it; unknown routes answer 404 and other methods on the collection 405.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::server::{Backend, Fake, Injected, Reply, Request, reason};
use super::tokens::{Check, Tokens};

/// The audience a token request must name.
pub const AUDIENCE: &str = "https://api.matillion.com";

const TOKEN_PATH: &str = "/oauth/dpc/token";
const PLATFORM_TYPES: &[&str] = &["DWH", "COMPONENT_BASIC", "CLOUD_PLATFORM_CREDENTIALS"];
const AUTH_TYPES: &[&str] = &["GENERIC_SECRET", "CLOUD_PROVIDER_SECRET"];
/// The body fields the server keeps.
const FIELDS: &[&str] = &[
    "name",
    "platformConnectionType",
    "authProvider",
    "authType",
    "connectionDetails",
];
/// Fields the server sets and a PUT does not replace.
const SERVER_FIELDS: &[&str] = &["id", "createdBy", "createdDate", "projectId"];

/// How the list route applies `connectionNames`: the public material does not say whether it
/// matches names exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameFilter {
    /// Only connections with one of the names (the default).
    Exact,
    /// Every connection whose name contains one of them, as a search box would.
    Contains,
    /// Not applied at all: every connection.
    Ignored,
}

/// The fake Matillion's state, reached through [`FakeMatillion`]'s methods.
pub struct State {
    clients: BTreeMap<String, String>,
    tokens: Tokens,
    token_prefix: String,
    token_lifetime: Duration,
    send_expires_in: bool,
    /// Each project's connections, in creation order.
    projects: BTreeMap<String, Vec<Map<String, Value>>>,
    create_status: u16,
    duplicate_status: u16,
    page_size: usize,
    name_filter: NameFilter,
}

/// A running fake Matillion DPC on `127.0.0.1`. Stops when dropped. The shared knobs and the
/// request record come from the [`Server`](super::server::Server) it derefs to.
pub type FakeMatillion = Fake<State>;

impl FakeMatillion {
    /// Starts the server: tokens live 1800 s, create answers 201, a taken name 409, pages hold
    /// 5 connections.
    pub async fn start() -> Self {
        Self::serve(State {
            clients: BTreeMap::new(),
            tokens: Tokens::default(),
            token_prefix: "fake-dpc".into(),
            token_lifetime: Duration::from_secs(1800),
            send_expires_in: true,
            projects: BTreeMap::new(),
            create_status: 201,
            duplicate_status: 409,
            page_size: 5,
            name_filter: NameFilter::Exact,
        })
        .await
    }

    /// The API base, e.g. `http://127.0.0.1:41234/dpc`.
    pub fn url(&self) -> String {
        format!("{}/dpc", self.origin())
    }

    /// The OAuth token endpoint, on the same server.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.origin())
    }

    /// An OAuth client allowed the client-credentials grant.
    pub fn add_client(&self, client_id: &str, client_secret: &str) {
        self.state()
            .clients
            .insert(client_id.to_owned(), client_secret.to_owned());
    }

    /// A project; its id must be a UUID for its routes to answer.
    pub fn add_project(&self, project_id: &str) {
        self.state()
            .projects
            .entry(project_id.to_owned())
            .or_default();
    }

    /// The lifetime of tokens issued from now on (and their `expires_in`).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state().token_lifetime = lifetime;
    }

    /// Tokens issued from now on begin with `prefix` (`fake-dpc` by default), e.g. to find a
    /// token where it must not be.
    pub fn set_token_prefix(&self, prefix: &str) {
        self.state().token_prefix = prefix.to_owned();
    }

    /// Token answers leave out `expires_in` (the tokens still expire).
    pub fn omit_expires_in(&self, omit: bool) {
        self.state().send_expires_in = !omit;
    }

    /// Every token issued so far expires now.
    pub fn expire_all_tokens(&self) {
        self.state().tokens.expire_all();
    }

    /// Requests to the token endpoint so far, refused ones included.
    pub fn token_requests(&self) -> usize {
        self.count("POST", TOKEN_PATH)
    }

    /// The status of a successful create: 201 (default) or 200.
    pub fn set_create_status(&self, status: u16) {
        self.state().create_status = status;
    }

    /// The status of a create or rename to a taken name: 409 (default) or 400, which names
    /// the duplicate in a violation.
    pub fn set_duplicate_status(&self, status: u16) {
        self.state().duplicate_status = status;
    }

    /// The page size when the request gives none, and the largest one honoured.
    pub fn set_page_size(&self, size: usize) {
        self.state().page_size = size;
    }

    /// How the list route applies `connectionNames` from now on.
    pub fn set_name_filter(&self, filter: NameFilter) {
        self.state().name_filter = filter;
    }

    /// The stored connection, as the server returns it.
    pub fn stored(&self, project_id: &str, name: &str) -> Option<Value> {
        let state = self.state();
        let connections = state.projects.get(project_id)?;
        position(connections, name).map(|i| Value::Object(connections[i].clone()))
    }

    /// Every stored connection of the project, in creation order.
    pub fn stored_all(&self, project_id: &str) -> Vec<Value> {
        self.state()
            .projects
            .get(project_id)
            .map(|c| c.iter().cloned().map(Value::Object).collect())
            .unwrap_or_default()
    }

    /// Creates a connection as someone other than appconn would, without validation; adds the
    /// project if needed. Panics without a `name`. Returns its id.
    pub fn insert_connection(&self, project_id: &str, body: Value) -> String {
        let body = body
            .as_object()
            .cloned()
            .expect("a connection is an object");
        assert!(body.get("name").is_some_and(Value::is_string), "a name");
        let stored = new_connection(project_id, "someone-else@clients", body);
        let id = stored["id"].as_str().expect("an id").to_owned();
        self.state()
            .projects
            .entry(project_id.to_owned())
            .or_default()
            .push(stored);
        id
    }

    /// Sets the top-level fields of `patch` on a stored connection (a null removes one), as
    /// someone other than appconn would. False if there is no such connection.
    pub fn edit_connection(&self, project_id: &str, name: &str, patch: Value) -> bool {
        let mut state = self.state();
        let Some(connections) = state.projects.get_mut(project_id) else {
            return false;
        };
        let Some(index) = position(connections, name) else {
            return false;
        };
        for (key, value) in patch.as_object().into_iter().flatten() {
            if value.is_null() {
                connections[index].remove(key);
            } else {
                connections[index].insert(key.clone(), value.clone());
            }
        }
        true
    }

    /// Deletes a connection behind the client's back. False if there was none.
    pub fn delete_connection(&self, project_id: &str, name: &str) -> bool {
        let mut state = self.state();
        let Some(connections) = state.projects.get_mut(project_id) else {
            return false;
        };
        match position(connections, name) {
            Some(index) => {
                connections.remove(index);
                true
            }
            None => false,
        }
    }
}

fn position(connections: &[Map<String, Value>], name: &str) -> Option<usize> {
    connections
        .iter()
        .position(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

/// The stored form of a created connection: the kept body fields and the server's own.
fn new_connection(
    project_id: &str,
    created_by: &str,
    body: Map<String, Value>,
) -> Map<String, Value> {
    let mut stored = kept(body);
    stored.insert("id".into(), uuid::Uuid::new_v4().to_string().into());
    stored.insert("createdBy".into(), created_by.into());
    stored.insert("createdDate".into(), Timestamp::now().to_string().into());
    stored.insert("projectId".into(), project_id.into());
    stored
}

/// The body's fields the server keeps; nulls count as absent.
fn kept(body: Map<String, Value>) -> Map<String, Value> {
    body.into_iter()
        .filter(|(k, v)| FIELDS.contains(&k.as_str()) && !v.is_null())
        .collect()
}

/// An RFC 7807 problem.
fn problem(status: u16, detail: &str, request: &Request, violations: &[(&str, String)]) -> Reply {
    let violations: Vec<Value> = violations
        .iter()
        .map(|(field, message)| json!({"field": field, "message": message}))
        .collect();
    let body = json!({
        "type": "about:blank",
        "title": reason(status),
        "status": status,
        "detail": detail,
        "instance": request.path,
        "violations": violations,
    });
    Reply::text(status, "application/problem+json", body.to_string())
}

fn bad_request(request: &Request, violations: &[(&str, String)]) -> Reply {
    problem(400, "Validation failed", request, violations)
}

/// An OAuth error, as the token endpoint answers.
fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Validates a create (`creating`) or PUT body; returns the fields the server keeps.
fn validate(body: Value, creating: bool, request: &Request) -> Result<Map<String, Value>, Reply> {
    let Value::Object(body) = body else {
        return Err(problem(
            400,
            "Failed to read request: the body is not a JSON object",
            request,
            &[],
        ));
    };
    let mut violations: Vec<(&str, String)> = Vec::new();
    match body.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => {}
        None | Some(Value::Null) if !creating => {}
        _ => violations.push(("name", "must not be blank".into())),
    }
    for (field, allowed) in [
        ("platformConnectionType", PLATFORM_TYPES),
        ("authType", AUTH_TYPES),
    ] {
        match body.get(field) {
            None | Some(Value::Null) => violations.push((field, "must not be null".into())),
            Some(value) if !allowed.iter().any(|a| value.as_str() == Some(*a)) => {
                violations.push((field, format!("must be one of {}", allowed.join(", "))));
            }
            Some(_) => {}
        }
    }
    if body
        .get("authProvider")
        .is_some_and(|v| !v.is_string() && !v.is_null())
    {
        violations.push(("authProvider", "must be a string".into()));
    }
    let details = body.get("connectionDetails");
    if details.is_some_and(|v| !v.is_object() && !v.is_null()) {
        violations.push(("connectionDetails", "must be an object".into()));
    }
    let secret_name = details
        .and_then(|d| d.pointer("/connectionProperties/secretName"))
        .and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty());
    if body.get("platformConnectionType").and_then(Value::as_str) == Some("COMPONENT_BASIC")
        && !secret_name
    {
        violations.push((
            "connectionDetails.connectionProperties.secretName",
            "must not be blank for a COMPONENT_BASIC connection".into(),
        ));
    }
    if violations.is_empty() {
        Ok(kept(body))
    } else {
        Err(bad_request(request, &violations))
    }
}

/// A query parameter that must be a whole number of at least `min`.
fn number(request: &Request, key: &'static str, min: usize) -> Result<Option<usize>, Reply> {
    match request.query_param(key) {
        None => Ok(None),
        Some(value) => match value.parse::<usize>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(bad_request(
                request,
                &[(key, format!("must be a whole number of at least {min}"))],
            )),
        },
    }
}

impl State {
    fn token(&mut self, request: &Request) -> Reply {
        let form: BTreeMap<String, String> =
            form_urlencoded::parse(&request.body).into_owned().collect();
        let field = |key: &str| form.get(key).map(String::as_str).filter(|v| !v.is_empty());
        let Some(grant) = field("grant_type") else {
            return oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: grant_type",
            );
        };
        if grant != "client_credentials" {
            return oauth_error(
                403,
                "unauthorized_client",
                &format!("Grant type '{grant}' not allowed for the client."),
            );
        }
        let client = field("client_id");
        let known = client.and_then(|id| self.clients.get(id));
        if known.is_none() || known.map(String::as_str) != field("client_secret") {
            return oauth_error(401, "access_denied", "Unauthorized");
        }
        match field("audience") {
            None => {
                return oauth_error(
                    403,
                    "access_denied",
                    "No audience parameter was provided, and no default audience has been \
                     configured",
                );
            }
            Some(audience) if audience != AUDIENCE => {
                return oauth_error(
                    403,
                    "access_denied",
                    &format!("Service not found: {audience}"),
                );
            }
            Some(_) => {}
        }
        let subject = format!("{}@clients", client.unwrap_or_default());
        let token = self.tokens.issue(
            &self.token_prefix,
            &subject,
            Some(self.token_lifetime),
            None,
        );
        let mut body = json!({"access_token": token, "token_type": "Bearer"});
        if self.send_expires_in {
            body["expires_in"] = self.token_lifetime.as_secs().into();
        }
        Reply::json(200, &body)
    }

    /// Who the request's token was issued to; 401 for a missing, unknown or expired one.
    fn authenticate(&self, request: &Request) -> Result<String, Reply> {
        let detail = match self.tokens.check(request.bearer()) {
            Check::Valid(token) => return Ok(token.subject.clone()),
            Check::Missing => "Full authentication is required to access this resource",
            Check::Expired => "Access token expired",
            Check::Unknown | Check::Revoked => "Invalid access token",
        };
        Err(problem(401, detail, request, &[]))
    }

    fn connections(&mut self, request: &Request, project: &str, caller: &str) -> Reply {
        if project.len() != 36 || uuid::Uuid::try_parse(project).is_err() {
            return problem(
                400,
                &format!("Failed to convert 'projectId' with value: '{project}'"),
                request,
                &[("projectId", "must be a UUID".into())],
            );
        }
        if !self.projects.contains_key(project) {
            return problem(404, &format!("Project {project} not found"), request, &[]);
        }
        let body = if request.body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&request.body) {
                Ok(body) => body,
                Err(_) => {
                    return problem(400, "Failed to read request: malformed JSON", request, &[]);
                }
            }
        };
        match request.method.as_str() {
            "GET" => self.list(request, project),
            "POST" => self.create(request, project, caller, body),
            "PUT" => self.replace(request, project, body),
            "DELETE" => self.delete(request, project),
            method => problem(
                405,
                &format!("Request method '{method}' is not supported"),
                request,
                &[],
            ),
        }
    }

    fn list(&self, request: &Request, project: &str) -> Reply {
        let (page, size) = match (number(request, "page", 0), number(request, "size", 1)) {
            (Ok(page), Ok(size)) => (
                page.unwrap_or(0),
                size.unwrap_or(self.page_size).min(self.page_size),
            ),
            (Err(reply), _) | (_, Err(reply)) => return reply,
        };
        let names: Vec<String> = request
            .query_values("connectionNames")
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::to_owned)
            .collect();
        let filters = [
            ("authProvider", request.query_param("authProvider")),
            (
                "platformConnectionType",
                request.query_param("platformConnectionType"),
            ),
        ];
        let matching: Vec<&Map<String, Value>> = self.projects[project]
            .iter()
            .filter(|c| {
                let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
                let named = match self.name_filter {
                    NameFilter::Exact => names.iter().any(|n| n == name),
                    NameFilter::Contains => names.iter().any(|n| name.contains(n.as_str())),
                    NameFilter::Ignored => true,
                };
                (names.is_empty() || named)
                    && filters.iter().all(|(field, wanted)| {
                        wanted.is_none()
                            || c.get(*field).and_then(Value::as_str) == wanted.as_deref()
                    })
            })
            .collect();
        let results: Vec<&Map<String, Value>> = matching
            .iter()
            .skip(page * size)
            .take(size)
            .copied()
            .collect();
        Reply::json(
            200,
            &json!({"page": page, "size": size, "total": matching.len(), "results": results}),
        )
    }

    /// 409 (or 400 naming it) when `name` is taken in the project by another connection.
    fn taken(
        &self,
        request: &Request,
        project: &str,
        name: &str,
        except: Option<usize>,
    ) -> Option<Reply> {
        let index = position(&self.projects[project], name)?;
        if Some(index) == except {
            return None;
        }
        let detail = format!("A connection named '{name}' already exists in project {project}");
        Some(match self.duplicate_status {
            400 => bad_request(request, &[("name", detail)]),
            status => problem(status, &detail, request, &[]),
        })
    }

    fn create(&mut self, request: &Request, project: &str, caller: &str, body: Value) -> Reply {
        let body = match validate(body, true, request) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let name = body["name"].as_str().unwrap_or_default().to_owned();
        if let Some(reply) = self.taken(request, project, &name, None) {
            return reply;
        }
        let stored = new_connection(project, caller, body);
        let reply = Reply::json(self.create_status, &Value::Object(stored.clone()));
        self.projects
            .get_mut(project)
            .expect("checked")
            .push(stored);
        reply
    }

    /// The index of `?connectionName=`: 400 without one, 404 for an unknown one.
    fn addressed(&self, request: &Request, project: &str) -> Result<usize, Reply> {
        let Some(name) = request.query_param("connectionName") else {
            return Err(problem(
                400,
                "Required request parameter 'connectionName' for method parameter type String \
                 is not present",
                request,
                &[("connectionName", "must not be blank".into())],
            ));
        };
        position(&self.projects[project], &name).ok_or_else(|| {
            problem(
                404,
                &format!("Connection '{name}' not found in project {project}"),
                request,
                &[],
            )
        })
    }

    fn replace(&mut self, request: &Request, project: &str, body: Value) -> Reply {
        let index = match self.addressed(request, project) {
            Ok(index) => index,
            Err(reply) => return reply,
        };
        let mut body = match validate(body, false, request) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        if let Some(name) = body.get("name").and_then(Value::as_str)
            && let Some(reply) = self.taken(request, project, name, Some(index))
        {
            return reply;
        }
        let stored = &mut self.projects.get_mut(project).expect("checked")[index];
        for field in SERVER_FIELDS.iter().chain(["name"].iter()) {
            if !body.contains_key(*field)
                && let Some(value) = stored.get(*field)
            {
                body.insert((*field).to_owned(), value.clone());
            }
        }
        *stored = body;
        Reply::json(200, &Value::Object(stored.clone()))
    }

    fn delete(&mut self, request: &Request, project: &str) -> Reply {
        match self.addressed(request, project) {
            Ok(index) => {
                self.projects
                    .get_mut(project)
                    .expect("checked")
                    .remove(index);
                Reply::empty(204)
            }
            Err(reply) => reply,
        }
    }
}

impl Backend for State {
    fn respond(&mut self, request: &Request) -> Reply {
        if request.path == TOKEN_PATH && request.method == "POST" {
            return self.token(request);
        }
        let segments = request.segments();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        if segments.first() == Some(&"dpc") {
            let caller = match self.authenticate(request) {
                Ok(caller) => caller,
                Err(reply) => return reply,
            };
            if let ["dpc", "v1", "projects", project, "connections"] = segments.as_slice() {
                return self.connections(request, project, &caller);
            }
        }
        problem(404, "No endpoint here", request, &[])
    }

    fn injected(&self, status: u16, cause: Injected, request: &Request) -> Reply {
        match (request.path == TOKEN_PATH, cause) {
            (true, Injected::RateLimited) => {
                oauth_error(429, "too_many_requests", "Global limit has been reached")
            }
            (true, Injected::Failure) => oauth_error(status, "server_error", reason(status)),
            (false, Injected::RateLimited) => problem(429, "Too many requests", request, &[]),
            (false, Injected::Failure) => problem(status, reason(status), request, &[]),
        }
    }
}
