//! The store's read API for consumers (HTTPS through [`serve_tls`], or plain HTTP through
//! [`serve`]; JSON), so that access to a connection's secrets is plain Kubernetes RBAC on a
//! ServiceAccount:
//!
//! - `GET /v1/connections`, `GET /v1/namespaces/{namespace}/connections`: records without their
//!   credentials, for callers allowed to `list` `appconnections` (cluster-wide or in the
//!   namespace).
//! - `GET /v1/namespaces/{namespace}/connections/{name}`: one record, by the AppConnection's
//!   `metadata.name`, with its credentials in clear, for callers allowed to `get`
//!   `appconnections/credentials` on that name.
//!
//! Callers send `Authorization: Bearer <token>`; the token goes through a TokenReview and the
//! user it names through a SubjectAccessReview, as the API server itself would do. Tokens are
//! never logged, echoed or kept: the cache holds a SHA-256 of each.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{RecordSummary, RotationState, StoreEngine, StoreError};
use crate::crd::GROUP;
use crate::crd::RotationSchedule;
use crate::secret::SecretString;

/// The resource whose RBAC rules guard the API.
const RESOURCE: &str = "appconnections";
/// The subresource a caller must be allowed to `get` to read credentials.
const CREDENTIALS_SUBRESOURCE: &str = "credentials";

/// How long an authenticated token is trusted without asking the API server again.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long an access decision, allowed or denied, is reused.
const DECISION_TTL: Duration = Duration::from_secs(10);
/// Entries per cache: enough for every consumer of a large cluster, small enough to bound memory.
const CACHE_CAPACITY: usize = 4096;

/// What the read API needs: the store and a client for TokenReview and SubjectAccessReview.
#[derive(Clone)]
pub struct StoreApiState {
    pub store: Arc<dyn StoreEngine>,
    pub client: kube::Client,
}

/// The read API's routes; `serve` runs them, tests may call them directly. Each router has its
/// own review caches.
pub fn router(state: StoreApiState) -> Router {
    let shared = Arc::new(Shared {
        store: state.store,
        reviewer: Reviewer::new(state.client),
    });
    Router::new()
        .route("/v1/connections", get(list_all))
        .route(
            "/v1/namespaces/{namespace}/connections",
            get(list_namespace),
        )
        .route(
            "/v1/namespaces/{namespace}/connections/{name}",
            get(get_with_credentials),
        )
        .with_state(shared)
}

/// Serves the read API on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish. Taking a bound listener lets the caller pick the port (tests bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: StoreApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`] over HTTPS, with the certificate `certs` serves (see [`super::tls`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: StoreApiState,
    certs: Arc<super::tls::CertReloader>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    super::tls::serve(listener, router(state), certs, shutdown).await
}

struct Shared {
    store: Arc<dyn StoreEngine>,
    reviewer: Reviewer,
}

async fn list_all(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    list(&shared, &headers, None).await
}

async fn list_namespace(
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    list(&shared, &headers, Some(namespace)).await
}

async fn list(
    shared: &Shared,
    headers: &HeaderMap,
    namespace: Option<String>,
) -> Result<Response, ApiError> {
    let token = bearer_token(headers)?;
    let user = shared.reviewer.authenticate(&token).await?;
    let attributes = ResourceAttributes {
        verb: Some("list".into()),
        group: Some(GROUP.into()),
        resource: Some(RESOURCE.into()),
        namespace: namespace.clone(),
        ..Default::default()
    };
    shared.reviewer.authorize(&user, attributes).await?;
    let records = shared
        .store
        .list(namespace.as_deref())
        .await
        .map_err(ApiError::Store)?;
    let now = Timestamp::now();
    let items = records
        .iter()
        .map(|r| ConnectionView::new(r, now))
        .collect();
    Ok(axum::Json(ConnectionList { items }).into_response())
}

async fn get_with_credentials(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let token = bearer_token(&headers)?;
    let user = shared.reviewer.authenticate(&token).await?;
    // Authorized before the lookup, so a caller without access cannot probe which names exist.
    let attributes = ResourceAttributes {
        verb: Some("get".into()),
        group: Some(GROUP.into()),
        resource: Some(RESOURCE.into()),
        subresource: Some(CREDENTIALS_SUBRESOURCE.into()),
        namespace: Some(namespace.clone()),
        name: Some(name.clone()),
        ..Default::default()
    };
    shared.reviewer.authorize(&user, attributes).await?;

    let not_found = || ApiError::NotFound {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let summaries = shared
        .store
        .list(Some(&namespace))
        .await
        .map_err(ApiError::Store)?;
    let id = summaries
        .iter()
        .find(|r| r.name == name)
        .map(|r| r.id)
        .ok_or_else(not_found)?;
    // Deleted between the two reads, or the id reused elsewhere: both are "not here".
    let record = shared
        .store
        .get(id)
        .await
        .map_err(ApiError::Store)?
        .filter(|r| r.namespace == namespace && r.name == name)
        .ok_or_else(not_found)?;

    tracing::info!(
        user = user.username.as_deref().unwrap_or_default(),
        namespace = %namespace,
        name = %name,
        id = %record.id,
        "served connection credentials"
    );
    let body = WithCredentials {
        connection: ConnectionView::new(&record.summary(), Timestamp::now()),
        credentials: record.credentials.expose(),
    };
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(body),
    )
        .into_response())
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Result<SecretString, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::NoToken)?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::MalformedAuthorization)?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(ApiError::MalformedAuthorization)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.contains(char::is_whitespace)
    {
        return Err(ApiError::MalformedAuthorization);
    }
    Ok(SecretString::new(token.to_string()))
}

/// Asks the API server who a token belongs to and what that user may do, with caches in front.
struct Reviewer {
    client: kube::Client,
    /// SHA-256 of the token -> the user it authenticated as. Only successes are kept, so a
    /// token that is revoked and fails once is asked about again on every request.
    tokens: TtlCache<UserInfo>,
    /// SHA-256 of the SubjectAccessReview spec -> the decision.
    decisions: TtlCache<Decision>,
}

#[derive(Clone, Debug)]
struct Decision {
    allowed: bool,
    reason: Option<String>,
}

impl Reviewer {
    fn new(client: kube::Client) -> Self {
        Self {
            client,
            tokens: TtlCache::new(TOKEN_TTL, CACHE_CAPACITY),
            decisions: TtlCache::new(DECISION_TTL, CACHE_CAPACITY),
        }
    }

    async fn authenticate(&self, token: &SecretString) -> Result<UserInfo, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
        if let Some(user) = self.tokens.get(&key, Instant::now()) {
            return Ok(user);
        }
        // `audiences` unset: the API server checks the token against its own audiences.
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.expose().to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        // The request and its answer both hold the token: never format them.
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %crate::kube_error::describe(&e), "TokenReview failed");
                ApiError::ReviewUnavailable
            })?;
        let status = answer.status.unwrap_or_default();
        let user = status
            .user
            .filter(|u| u.username.as_deref().is_some_and(|n| !n.is_empty()));
        match (status.authenticated, user) {
            (Some(true), Some(user)) => {
                self.tokens.insert(key, user.clone(), Instant::now());
                Ok(user)
            }
            _ => {
                tracing::debug!("bearer token not authenticated");
                Err(ApiError::Unauthenticated)
            }
        }
    }

    /// `Ok` when `user` may do what `attributes` say, else `Forbidden` with the reason given.
    async fn authorize(
        &self,
        user: &UserInfo,
        attributes: ResourceAttributes,
    ) -> Result<(), ApiError> {
        let what = describe(&attributes);
        let spec = SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(attributes),
            non_resource_attributes: None,
        };
        let key: [u8; 32] = Sha256::digest(
            serde_json::to_vec(&spec).expect("a SubjectAccessReviewSpec serializes"),
        )
        .into();
        let decision = match self.decisions.get(&key, Instant::now()) {
            Some(decision) => decision,
            None => {
                let review = SubjectAccessReview {
                    spec,
                    ..Default::default()
                };
                let answer = Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %crate::kube_error::describe(&e), "SubjectAccessReview failed");
                        ApiError::ReviewUnavailable
                    })?;
                let status = answer.status.unwrap_or_default();
                let decision = Decision {
                    allowed: status.allowed && status.denied != Some(true),
                    reason: status.reason.filter(|r| !r.is_empty()),
                };
                self.decisions.insert(key, decision.clone(), Instant::now());
                decision
            }
        };
        let username = user.username.as_deref().unwrap_or_default();
        if decision.allowed {
            return Ok(());
        }
        tracing::debug!(user = username, access = %what, "access denied");
        let mut message = format!("user {username:?} cannot {what}");
        if let Some(reason) = decision.reason {
            message.push_str(": ");
            message.push_str(&reason);
        }
        Err(ApiError::Forbidden(message))
    }
}

/// `get appconnections/credentials "x" in namespace "y"`, as a person reads it.
fn describe(a: &ResourceAttributes) -> String {
    let mut out = format!(
        "{} {}",
        a.verb.as_deref().unwrap_or_default(),
        a.resource.as_deref().unwrap_or_default()
    );
    if let Some(sub) = &a.subresource {
        out.push('/');
        out.push_str(sub);
    }
    if let Some(group) = &a.group {
        out.push('.');
        out.push_str(group);
    }
    if let Some(name) = &a.name {
        out.push_str(&format!(" {name:?}"));
    }
    match &a.namespace {
        Some(ns) => out.push_str(&format!(" in namespace {ns:?}")),
        None => out.push_str(" at the cluster scope"),
    }
    out
}

/// A map whose entries expire after `ttl`, holding at most `capacity` of them.
struct TtlCache<V> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], (Instant, V)>>,
}

impl<V: Clone> TtlCache<V> {
    fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &[u8; 32], now: Instant) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, value)| value.clone())
    }

    /// When full, expired entries go first, then the one closest to expiring.
    fn insert(&self, key: [u8; 32], value: V, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, (expires, _))| *expires)
                    .map(|(k, _)| *k);
                if let Some(soonest) = soonest {
                    entries.remove(&soonest);
                }
            }
        }
        entries.insert(key, (now + self.ttl, value));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[derive(Serialize)]
struct ConnectionList {
    items: Vec<ConnectionView>,
}

/// A record without its credentials.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionView {
    id: Uuid,
    namespace: String,
    /// `metadata.name` of the AppConnection.
    name: String,
    connection_name: String,
    app: String,
    method: Option<String>,
    project: Option<String>,
    description: Option<String>,
    settings: BTreeMap<String, Value>,
    credentials_hash: String,
    version: i64,
    rotation: Option<RotationView>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl ConnectionView {
    fn new(r: &RecordSummary, now: Timestamp) -> Self {
        Self {
            id: r.id,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            connection_name: r.connection_name.clone(),
            app: r.app.clone(),
            method: r.method.clone(),
            project: r.project.clone(),
            description: r.description.clone(),
            settings: r.settings.clone(),
            credentials_hash: r.credentials_hash.clone(),
            version: r.version,
            rotation: r
                .rotation
                .map(|schedule| RotationView::new(schedule, &r.rotation_state, now)),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The schedule and where the record stands against it, in the words of an AppConnection's
/// `spec.rotation` and `status.rotation`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RotationView {
    interval_days: u16,
    rotate_at_utc: RotateAt,
    /// `pending` (no rotation yet, not due), `success` (rotated, not due) or `overdue`.
    status: &'static str,
    last_rotation_time: Option<Timestamp>,
    next_rotation_at: Option<Timestamp>,
}

#[derive(Serialize)]
struct RotateAt {
    hours: u8,
    minutes: u8,
}

impl RotationView {
    fn new(schedule: RotationSchedule, state: &RotationState, now: Timestamp) -> Self {
        // The store moves `next_rotation_at` whenever the credentials change, so a due date that
        // has passed means they did not.
        let status = if state.next_rotation_at.is_some_and(|next| now >= next) {
            "overdue"
        } else if state.last_rotation_time.is_some() {
            "success"
        } else {
            "pending"
        };
        Self {
            interval_days: schedule.interval_days,
            rotate_at_utc: RotateAt {
                hours: schedule.hours,
                minutes: schedule.minutes,
            },
            status,
            last_rotation_time: state.last_rotation_time,
            next_rotation_at: state.next_rotation_at,
        }
    }
}

#[derive(Serialize)]
struct WithCredentials<'a> {
    #[serde(flatten)]
    connection: ConnectionView,
    credentials: &'a BTreeMap<String, Value>,
}

/// A refused or failed request. Messages are for the caller and never hold a token or a secret.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("missing bearer token: send an Authorization: Bearer <token> header")]
    NoToken,
    #[error("malformed Authorization header: expected Bearer <token>")]
    MalformedAuthorization,
    #[error("the bearer token was not accepted by the Kubernetes API server")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("appconnection {name:?} not found in namespace {namespace:?}")]
    NotFound { namespace: String, name: String },
    #[error("cannot check access with the Kubernetes API server now; try again later")]
    ReviewUnavailable,
    #[error("the store cannot be read")]
    Store(StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NoToken | ApiError::MalformedAuthorization | ApiError::Unauthenticated => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::ReviewUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if let ApiError::Store(e) = &self {
            // The path and cause are for the operator's logs, not for consumers.
            tracing::warn!(error = %e, "store read failed");
        }
        let body = axum::Json(serde_json::json!({ "error": self.to_string() }));
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[test]
    fn bearer_token_accepts_only_the_bearer_scheme() {
        for ok in ["Bearer abc.def", "bearer abc.def", "BEARER   abc.def  "] {
            assert_eq!(bearer_token(&headers(ok)).unwrap().expose(), "abc.def");
        }
        assert!(matches!(
            bearer_token(&HeaderMap::new()),
            Err(ApiError::NoToken)
        ));
        for bad in [
            "Basic YWxpY2U6cHc=",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "abc.def",
        ] {
            assert!(
                matches!(
                    bearer_token(&headers(bad)),
                    Err(ApiError::MalformedAuthorization)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_never_echo_the_token() {
        let err = bearer_token(&headers("Token zebra-canary-7781")).unwrap_err();
        assert!(!err.to_string().contains("zebra-canary-7781"));
    }

    #[test]
    fn cache_entries_expire() {
        let cache = TtlCache::new(Duration::from_secs(10), 8);
        let t0 = Instant::now();
        cache.insert([1; 32], "a", t0);
        assert_eq!(cache.get(&[1; 32], t0 + Duration::from_secs(9)), Some("a"));
        assert_eq!(cache.get(&[1; 32], t0 + Duration::from_secs(10)), None);
        assert_eq!(cache.get(&[2; 32], t0), None);
    }

    #[test]
    fn cache_stays_within_capacity() {
        let cache = TtlCache::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for i in 0..3u8 {
            cache.insert([i; 32], i, t0 + Duration::from_secs(u64::from(i)));
        }
        // Full of live entries: the one closest to expiring makes room.
        cache.insert([9; 32], 9, t0 + Duration::from_secs(3));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&[0; 32], t0 + Duration::from_secs(3)), None);
        assert_eq!(cache.get(&[1; 32], t0 + Duration::from_secs(3)), Some(1));
        // Replacing a key does not evict another.
        cache.insert([9; 32], 10, t0 + Duration::from_secs(3));
        assert_eq!(cache.len(), 3);
        // Expired entries are dropped first, all of them.
        cache.insert([7; 32], 7, t0 + Duration::from_secs(60));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn rotation_view_reports_due_dates() {
        let schedule = RotationSchedule {
            interval_days: 30,
            hours: 11,
            minutes: 29,
        };
        let ts = |s: &str| s.parse::<Timestamp>().unwrap();
        let state = RotationState::on_insert(Some(schedule), "h", ts("2026-01-01T00:00:00Z"));
        let status =
            |state: &RotationState, now: &str| RotationView::new(schedule, state, ts(now)).status;
        assert_eq!(status(&state, "2026-01-02T00:00:00Z"), "pending");
        assert_eq!(status(&state, "2026-01-31T11:29:00Z"), "overdue");
        let rotated = state.on_update(
            Some(schedule),
            Some(schedule),
            true,
            "h2",
            ts("2026-01-10T00:00:00Z"),
        );
        assert_eq!(status(&rotated, "2026-01-31T12:00:00Z"), "success");
    }

    #[test]
    fn describe_reads_like_rbac() {
        let a = ResourceAttributes {
            verb: Some("get".into()),
            group: Some(GROUP.into()),
            resource: Some(RESOURCE.into()),
            subresource: Some(CREDENTIALS_SUBRESOURCE.into()),
            namespace: Some("analytics".into()),
            name: Some("warehouse".into()),
            ..Default::default()
        };
        assert_eq!(
            describe(&a),
            r#"get appconnections/credentials.appconn.io "warehouse" in namespace "analytics""#
        );
    }
}
