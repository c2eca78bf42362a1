//! Routing, the App Connection routes, and the response objects.

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};
use serde_json::{Map, Value, json};

use super::apps::{APPS, AppDef, ROTATING, app_def, method_def};
use super::validate::parse_write;
use super::{Connection, ORG_ID, Rotation, State};
use crate::fake::server::{Backend, Injected, Reply, Request};

pub(super) fn ok(body: Value) -> Reply {
    Reply::json(200, &body)
}

/// Infisical's error body.
fn error_body(status: u16, error: &str, message: impl Into<Value>) -> Value {
    json!({
        "reqId": format!("req-{}", uuid::Uuid::new_v4().simple()),
        "statusCode": status,
        "message": message.into(),
        "error": error,
    })
}

pub(super) fn error(status: u16, error: &str, message: impl Into<Value>) -> Reply {
    Reply::json(status, &error_body(status, error, message))
}

pub(super) fn validation(issues: Vec<Value>) -> Reply {
    error(422, "ValidationFailure", Value::Array(issues))
}

fn bad_request(message: impl Into<String>) -> Reply {
    error(400, "BadRequest", message.into())
}

fn not_found(message: impl Into<String>) -> Reply {
    error(404, "NotFound", message.into())
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

impl Backend for State {
    fn respond(&mut self, request: &Request) -> Reply {
        let Some(route) = self.route(request) else {
            let (method, path) = (&request.method, &request.path);
            return error(404, "Not Found", format!("Route {method}:{path} not found"));
        };
        let project = request.query_param("projectId");
        let body: Value = if request.body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&request.body) {
                Ok(body) => body,
                Err(_) => return bad_request("Body is not valid JSON"),
            }
        };
        match route {
            Route::Status => ok(json!({
                "date": Timestamp::now().to_string(),
                "message": "Ok",
                "emailConfigured": false,
                "redisConfigured": true,
            })),
            Route::Login => self.login(&body),
            Route::Renew => self.renew(&body),
            route => {
                if let Err(reply) = self.authenticate(request) {
                    return reply;
                }
                if self.deny_permissions {
                    let mut body = error_body(
                        403,
                        "PermissionDenied",
                        "You are not allowed to access App Connections",
                    );
                    body["details"] = json!([{"action": "read", "subject": "app-connections"}]);
                    return Reply::json(403, &body);
                }
                self.connections_route(route, project.as_deref(), &body)
            }
        }
    }

    fn injected(&self, status: u16, cause: Injected, _: &Request) -> Reply {
        match cause {
            Injected::Failure => error(status, "InternalServerError", "Something went wrong"),
            Injected::RateLimited => error(
                429,
                "RateLimitExceeded",
                "Rate limit exceeded. Please try again later.",
            ),
        }
    }
}

impl State {
    fn route(&self, request: &Request) -> Option<Route> {
        let decoded = request.segments();
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let route = match (request.method.as_str(), segments.as_slice()) {
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

    fn connections_route(&mut self, route: Route, project: Option<&str>, body: &Value) -> Reply {
        match route {
            Route::Options => ok(json!({
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
                ok(json!({"appConnections": list}))
            }
            Route::Get(def, id) => match self.index(def, &id) {
                Ok(index) => ok(json!({"appConnection": view(&self.connections[index], false)})),
                Err(reply) => reply,
            },
            Route::GetByName(def, name) => {
                let found = self.connections.iter().find(|c| {
                    c.app == def.app && c.name == name && c.project_id.as_deref() == project
                });
                match found {
                    Some(conn) => ok(json!({"appConnection": view(conn, false)})),
                    None => not_found(format!("Could not find App Connection with name {name}")),
                }
            }
            Route::Create(def) => self.create(def, body),
            Route::Update(def, id) => self.update(def, &id, body),
            Route::Delete(def, id) => {
                let index = match self.index(def, &id) {
                    Ok(index) => index,
                    Err(reply) => return reply,
                };
                let conn = &self.connections[index];
                if conn.dependents > 0 {
                    return bad_request(format!(
                        "Cannot delete App Connection \"{}\": it is used by {} secret sync(s). \
                         Remove them first.",
                        conn.name, conn.dependents
                    ));
                }
                let conn = self.connections.remove(index);
                ok(json!({"appConnection": view(&conn, false)}))
            }
            Route::Rotate(def, id) => {
                let conn = match self.index(def, &id) {
                    Ok(index) => &mut self.connections[index],
                    Err(reply) => return reply,
                };
                if !ROTATING.contains(&(conn.app, conn.method)) {
                    return bad_request(rotation_refused(def, conn.method));
                }
                let before = view(conn, false);
                rotate(conn);
                ok(json!({"appConnection": before}))
            }
            Route::Status | Route::Login | Route::Renew => unreachable!("handled before"),
        }
    }

    /// Where the app's connection with this id is; 404 when there is none.
    fn index(&self, def: &AppDef, id: &str) -> Result<usize, Reply> {
        self.connections
            .iter()
            .position(|c| c.app == def.app && c.id == id)
            .ok_or_else(|| not_found(format!("Could not find App Connection with ID {id}")))
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
        Some(bad_request(format!("{message}{echoed}")))
    }

    fn create(&mut self, def: &'static AppDef, body: &Value) -> Reply {
        let write = match parse_write(def, body, None) {
            Ok(write) => write,
            Err(issues) => return validation(issues),
        };
        let method = write.method.expect("required on create");
        let name = write.name.expect("required on create");
        let credentials = write.credentials.expect("required on create");
        let auto_rotation = write.auto_rotation.unwrap_or(false);
        if auto_rotation && !ROTATING.contains(&(def.app, method.name)) {
            return bad_request(rotation_refused(def, method.name));
        }
        if self.name_taken(&name, write.project_id.as_deref(), None) {
            return bad_request(format!(
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
        let reply = ok(json!({"appConnection": view(&conn, false)}));
        self.connections.push(conn);
        reply
    }

    fn update(&mut self, def: &'static AppDef, id: &str, body: &Value) -> Reply {
        let index = match self.index(def, id) {
            Ok(index) => index,
            Err(reply) => return reply,
        };
        let existing = self.connections[index].clone();
        let write = match parse_write(def, body, Some(&existing)) {
            Ok(write) => write,
            Err(issues) => return validation(issues),
        };
        let auto_rotation = write.auto_rotation.unwrap_or(existing.auto_rotation);
        if auto_rotation && !ROTATING.contains(&(def.app, existing.method)) {
            return bad_request(rotation_refused(def, existing.method));
        }
        if let Some(name) = &write.name
            && self.name_taken(name, existing.project_id.as_deref(), Some(id))
        {
            return bad_request(format!(
                "An App Connection with the name \"{name}\" already exists"
            ));
        }
        if existing.platform_managed && write.platform_managed == Some(false) {
            return bad_request("Platform managed credentials cannot be disabled");
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
        ok(json!({"appConnection": view(conn, false)}))
    }
}

fn rotation_refused(def: &AppDef, method: &str) -> String {
    format!(
        "Auto-rotation is not supported for {} connections using the \"{method}\" method",
        def.name
    )
}

/// What the server's rotation does: a new secret value, a new hash, the next date.
pub(super) fn rotate(conn: &mut Connection) {
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
pub(super) fn new_hash() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn iso(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The response object; `with_secrets` only for tests reading what was stored.
pub(super) fn view(conn: &Connection, with_secrets: bool) -> Value {
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
