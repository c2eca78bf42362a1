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
//! Knobs for tests: token expiry and revocation, lockout length, a server without `/options`,
//! live-validation failures, dependents that block a delete, rotation done by the server,
//! objects created behind appconn's back, the stored objects with their secrets; and, from the
//! shared [`Server`](super::server::Server) it derefs to, latency, failing the next N requests,
//! error rates, a 429 storm with `Retry-After`, a rate limiter, and a record of every request.
//!
//! Nothing here logs a request or response body: credentials travel in them.

mod apps;
mod auth;
mod routes;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::{Map, Value};

use super::server::Fake;
pub use super::server::RecordedRequest;
use super::tokens::Tokens;
pub use apps::ROTATING;
use apps::{app_def, method_def};
use auth::Identity;
use routes::{new_hash, rotate, view};

/// The organisation every object of the fake belongs to.
pub const ORG_ID: &str = "9d7a6c2e-1111-4222-8333-444455556666";

impl RecordedRequest {
    pub fn is_login(&self) -> bool {
        self.path == "/api/v1/auth/universal-auth/login"
    }

    pub fn is_renew(&self) -> bool {
        self.path == "/api/v1/auth/token/renew"
    }
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

/// The fake Infisical's state, reached through [`FakeInfisical`]'s methods.
pub struct State {
    identities: BTreeMap<String, Identity>,
    tokens: Tokens,
    expires_in: u64,
    max_ttl: u64,
    lockout_threshold: usize,
    lockout_duration: Duration,
    lockout_window: Duration,
    connections: Vec<Connection>,
    options_route: bool,
    deny_permissions: bool,
    live_validation_error: Option<String>,
    echo_field: Option<String>,
}

/// A running fake Infisical on `127.0.0.1`. Stops when dropped. The shared knobs and the
/// request record come from the [`Server`](super::server::Server) it derefs to.
pub type FakeInfisical = Fake<State>;

impl FakeInfisical {
    /// Starts the server on a free port. Tokens last 7200 s (max TTL 30 days) by default.
    pub async fn start() -> Self {
        Self::serve(State {
            identities: BTreeMap::new(),
            tokens: Tokens::default(),
            expires_in: 7200,
            max_ttl: 2_592_000,
            lockout_threshold: 3,
            lockout_duration: Duration::from_secs(300),
            lockout_window: Duration::from_secs(30),
            connections: Vec::new(),
            options_route: true,
            deny_permissions: false,
            live_validation_error: None,
            echo_field: None,
        })
        .await
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        self.origin()
    }

    /// Registers a machine identity's Universal Auth credentials.
    pub fn add_identity(&self, client_id: &str, client_secret: &str) {
        self.state().identities.insert(
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
        let mut state = self.state();
        state.expires_in = expires_in;
        state.max_ttl = max_ttl;
    }

    /// Every token issued so far expires now: requests get 403 `TokenError`.
    pub fn expire_all_tokens(&self) {
        self.state().tokens.expire_all();
    }

    /// Every token issued so far is revoked: requests get 401.
    pub fn revoke_all_tokens(&self) {
        self.state().tokens.revoke_all();
    }

    /// How long an identity stays locked after three refused logins (default five minutes).
    pub fn set_lockout_duration(&self, duration: Duration) {
        self.state().lockout_duration = duration;
    }

    /// Whether the identity is locked now.
    pub fn is_locked(&self, client_id: &str) -> bool {
        self.state()
            .identities
            .get(client_id)
            .and_then(|i| i.locked_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Whether `GET /api/v1/app-connections/options` exists (older servers: 404).
    pub fn set_options_route(&self, present: bool) {
        self.state().options_route = present;
    }

    /// The identity loses its App Connection permissions: those routes answer 403
    /// `PermissionDenied` (a valid token, so a new login does not help).
    pub fn deny_permissions(&self, deny: bool) {
        self.state().deny_permissions = deny;
    }

    /// Every write carrying credentials fails live validation with 400 and this message.
    pub fn fail_live_validation(&self, message: Option<&str>) {
        self.state().live_validation_error = message.map(str::to_owned);
    }

    /// A careless server: live-validation messages end with the value of this credential
    /// field (to prove the client never lets such a value through).
    pub fn echo_credential_in_errors(&self, field: Option<&str>) {
        self.state().echo_field = field.map(str::to_owned);
    }

    /// Something (a secret sync) now uses the connection: deleting it fails with 400.
    pub fn add_dependent(&self, id: &str) {
        if let Some(conn) = self.state().connections.iter_mut().find(|c| c.id == id) {
            conn.dependents += 1;
        }
    }

    /// The server rotates the connection's credentials itself, as its scheduler would: a new
    /// secret, a new hash, status `success`, the next rotation one interval later.
    pub fn rotate_now(&self, id: &str) -> bool {
        let mut state = self.state();
        let Some(conn) = state.connections.iter_mut().find(|c| c.id == id) else {
            return false;
        };
        rotate(conn);
        true
    }

    /// The server's rotation of this connection fails with `message`; the hash stays.
    pub fn fail_rotation(&self, id: &str, message: &str) -> bool {
        let mut state = self.state();
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

    /// Login attempts so far.
    pub fn logins(&self) -> usize {
        self.requests().iter().filter(|r| r.is_login()).count()
    }

    /// The stored object, SECRET fields included (what a test wants to check was written).
    pub fn stored(&self, id: &str) -> Option<Value> {
        self.state()
            .connections
            .iter()
            .find(|c| c.id == id)
            .map(|c| view(c, true))
    }

    /// The stored object with this name in this project (None = org-level), secrets included.
    pub fn stored_by_name(&self, project_id: Option<&str>, name: &str) -> Option<Value> {
        self.state()
            .connections
            .iter()
            .find(|c| c.name == name && c.project_id.as_deref() == project_id)
            .map(|c| view(c, true))
    }

    /// Every stored object, secrets included.
    pub fn stored_all(&self) -> Vec<Value> {
        self.state()
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
        self.state().connections.push(conn);
        id
    }
}
