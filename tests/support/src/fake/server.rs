//! The server every fake backend runs on: it binds `127.0.0.1:0`, records every request, and
//! applies the failure knobs (latency, failing the next requests, an error rate, a 429 storm, a
//! rate limiter) before the backend's own logic sees a request, so no fake re-implements them.
//! An injected error takes the backend's own error shape: the harness only picks the status.
//!
//! The knobs judge a request when it arrives, in this order: the rate limiter (a gateway in
//! front), then fail-next, the error rate and the storm; the latency then delays every answer,
//! injected or not. They apply to every path of the server, a token endpoint included.
//!
//! Nothing here logs a request or response body: credentials travel in them.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// One request as a fake saw it.
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

/// How an error rate picks its victims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// Each request fails with probability `fraction`.
    Random,
    /// Exactly one request in `1 / fraction` fails, the same ones on every run.
    Even,
}

/// A rate limiter in front of the backend. Requests it refuses do not count against it.
#[derive(Clone, Copy, Debug)]
pub enum RateLimit {
    /// A request arriving less than `min_gap` after the previous accepted one gets 429 with
    /// `Retry-After: retry_after_secs`.
    Spacing {
        min_gap: Duration,
        retry_after_secs: u64,
    },
    /// `rps` tokens a second into a bucket of `burst`; a request finding it empty gets 429 with
    /// `Retry-After` the seconds until the next token, rounded up.
    TokenBucket { rps: f64, burst: u32 },
}

/// Why the harness answered in the backend's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Injected {
    /// `fail_next` or the error rate.
    Failure,
    /// The storm or the rate limiter: the status is 429.
    RateLimited,
}

/// A request as a backend sees it.
pub(crate) struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Request {
    /// The path's segments, percent-decoded.
    pub fn segments(&self) -> Vec<String> {
        self.path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect()
    }

    /// Every non-empty value of `key` in the query, decoded, in order.
    pub fn query_values(&self, key: &str) -> Vec<String> {
        let Some(query) = self.query.as_deref() else {
            return Vec::new();
        };
        query
            .split('&')
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == key && !v.is_empty()).then(|| percent_decode(v))
            })
            .collect()
    }

    /// The first non-empty value of `key` in the query, decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query_values(key).into_iter().next()
    }

    /// The token of `Authorization: Bearer <token>`.
    pub fn bearer(&self) -> Option<&str> {
        self.headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }
}

/// An answer: status, body, optional `Retry-After`.
pub(crate) struct Reply {
    pub status: u16,
    body: String,
    content_type: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl Reply {
    pub fn json(status: u16, body: &Value) -> Self {
        Self::text(status, "application/json; charset=utf-8", body.to_string())
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            body,
            content_type: Some(content_type),
            retry_after: None,
        }
    }

    /// No body, no `Content-Type` (a 204).
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            body: String::new(),
            content_type: None,
            retry_after: None,
        }
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, self.body).into_response();
        let headers = response.headers_mut();
        match self.content_type {
            Some(content_type) => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            }
            None => {
                headers.remove(CONTENT_TYPE);
            }
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The reason phrase of a status, e.g. `Not Found`.
pub(crate) fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// A backend's own logic. The harness holds it behind one lock, so a request sees and leaves
/// it whole.
pub(crate) trait Backend: Send + 'static {
    fn respond(&mut self, request: &Request) -> Reply;

    /// The backend's error for a status the harness injects (`RateLimited`: always 429).
    fn injected(&self, status: u16, cause: Injected, request: &Request) -> Reply;
}

/// Locks a fake's state; a test that panicked while holding it does not poison the others.
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct ErrorRate {
    fraction: f64,
    status: u16,
    spread: Spread,
    /// For `Even`: every time it reaches 1, one request fails.
    owed: f64,
}

struct Storm {
    until: Instant,
    fraction: f64,
    /// Deterministic share: every time it reaches 1, one request gets a 429.
    owed: f64,
    retry_after: u64,
}

enum Limiter {
    Spacing {
        min_gap: Duration,
        retry_after: u64,
        last: Option<Instant>,
    },
    Bucket {
        rps: f64,
        burst: f64,
        tokens: f64,
        refilled: Instant,
    },
}

impl Limiter {
    fn new(limit: RateLimit) -> Self {
        match limit {
            RateLimit::Spacing {
                min_gap,
                retry_after_secs,
            } => Self::Spacing {
                min_gap,
                retry_after: retry_after_secs,
                last: None,
            },
            RateLimit::TokenBucket { rps, burst } => Self::Bucket {
                rps,
                burst: f64::from(burst),
                tokens: f64::from(burst),
                refilled: Instant::now(),
            },
        }
    }

    /// `Some(retry_after)` when the request at `now` is refused.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self {
            Self::Spacing {
                min_gap,
                retry_after,
                last,
            } => {
                if last.is_some_and(|last| now.saturating_duration_since(last) < *min_gap) {
                    return Some(*retry_after);
                }
                *last = Some(now);
                None
            }
            Self::Bucket {
                rps,
                burst,
                tokens,
                refilled,
            } => {
                let elapsed = now.saturating_duration_since(*refilled).as_secs_f64();
                *tokens = (*tokens + elapsed * *rps).min(*burst);
                *refilled = now.max(*refilled);
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    return None;
                }
                Some(((1.0 - *tokens) / *rps).ceil().max(1.0) as u64)
            }
        }
    }
}

struct Knobs {
    latency: Duration,
    fail_next: Option<(usize, u16)>,
    error_rate: Option<ErrorRate>,
    storm: Option<Storm>,
    limiter: Option<Limiter>,
    requests: Vec<RecordedRequest>,
}

impl Knobs {
    /// What the harness answers instead of the backend, if anything: the rate limiter stands
    /// in front, then the injected failures, then the storm.
    fn inject(&mut self, now: Instant) -> Option<(u16, Injected, Option<u64>)> {
        if let Some(retry_after) = self.limiter.as_mut().and_then(|l| l.admit(now)) {
            return Some((429, Injected::RateLimited, Some(retry_after)));
        }
        if let Some((left, status)) = self.fail_next.as_mut() {
            let status = *status;
            *left -= 1;
            if *left == 0 {
                self.fail_next = None;
            }
            // A server that throttles says when to come back.
            let retry_after = (status == 429).then_some(1);
            return Some((status, Injected::Failure, retry_after));
        }
        if let Some(rate) = self.error_rate.as_mut() {
            let hit = match rate.spread {
                Spread::Random => rand::random::<f64>() < rate.fraction,
                Spread::Even => {
                    rate.owed += rate.fraction;
                    let hit = rate.owed >= 1.0;
                    if hit {
                        rate.owed -= 1.0;
                    }
                    hit
                }
            };
            if hit {
                return Some((rate.status, Injected::Failure, None));
            }
        }
        if let Some(storm) = self.storm.as_mut() {
            if now >= storm.until {
                self.storm = None;
            } else {
                storm.owed += storm.fraction;
                if storm.owed >= 1.0 {
                    storm.owed -= 1.0;
                    return Some((429, Injected::RateLimited, Some(storm.retry_after)));
                }
            }
        }
        None
    }
}

struct Inner {
    started: Instant,
    knobs: Mutex<Knobs>,
    backend: Arc<Mutex<dyn Backend>>,
}

/// A running fake server on `127.0.0.1`: the knobs and the request record. Stops when
/// dropped.
pub struct Server {
    origin: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fake backend: its [`Server`], whose knobs and record it derefs to, and its state `B`,
/// which only the fake's own methods reach.
pub struct Fake<B> {
    server: Server,
    state: Arc<Mutex<B>>,
}

impl<B> Deref for Fake<B> {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}

impl<B> Fake<B> {
    /// Serves `state` on a free port.
    pub(crate) async fn serve(state: B) -> Self
    where
        B: Backend,
    {
        let state = Arc::new(Mutex::new(state));
        let server = Server::start(state.clone()).await;
        Self { server, state }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, B> {
        lock(&self.state)
    }
}

impl Server {
    async fn start(backend: Arc<Mutex<dyn Backend>>) -> Self {
        let inner = Arc::new(Inner {
            started: Instant::now(),
            knobs: Mutex::new(Knobs {
                latency: Duration::ZERO,
                fail_next: None,
                error_rate: None,
                storm: None,
                limiter: None,
                requests: Vec::new(),
            }),
            backend,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr: SocketAddr = listener.local_addr().expect("local address");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake server");
        });
        Self {
            origin: format!("http://{addr}"),
            inner,
            task,
        }
    }
    /// Scheme, host and port, e.g. `http://127.0.0.1:41234`.
    pub fn origin(&self) -> String {
        self.origin.clone()
    }

    /// Delay before every answer, injected ones included.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.inner.knobs).latency = latency;
    }

    /// The next `n` requests, whatever their route, fail with `status` (500, 503, ...); a 429
    /// carries `Retry-After: 1`.
    pub fn fail_next(&self, n: usize, status: u16) {
        lock(&self.inner.knobs).fail_next = (n > 0).then_some((n, status));
    }

    /// From now on `fraction` of the requests fail with `status`, picked as `spread` says;
    /// a fraction of 0 ends it.
    pub fn error_rate(&self, fraction: f64, status: u16, spread: Spread) {
        lock(&self.inner.knobs).error_rate = (fraction > 0.0).then_some(ErrorRate {
            fraction,
            status,
            spread,
            owed: 0.0,
        });
    }

    /// For `duration` from now, `fraction` of the requests (spread evenly) get 429 with
    /// `Retry-After: retry_after_secs`.
    pub fn rate_limit_storm(&self, fraction: f64, duration: Duration, retry_after_secs: u64) {
        lock(&self.inner.knobs).storm = Some(Storm {
            until: Instant::now() + duration,
            fraction,
            owed: 0.0,
            retry_after: retry_after_secs,
        });
    }

    /// Puts a rate limiter in front of every route (None removes it). A token bucket starts
    /// full.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        lock(&self.inner.knobs).limiter = limit.map(Limiter::new);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let mut requests = lock(&self.inner.knobs).requests.clone();
        requests.sort_by_key(|r| r.at);
        requests
    }

    /// Requests with this method whose path starts with `prefix`.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        lock(&self.inner.knobs)
            .requests
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .count()
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let (injected, latency) = {
        let mut knobs = lock(&inner.knobs);
        (knobs.inject(arrived), knobs.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let request = Request {
        method,
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers,
        body,
    };
    let reply = {
        let mut backend = lock(&inner.backend);
        match injected {
            Some((status, cause, retry_after)) => {
                let mut reply = backend.injected(status, cause, &request);
                reply.retry_after = retry_after;
                reply
            }
            None => backend.respond(&request),
        }
    };
    let bearer = request
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));
    lock(&inner.knobs).requests.push(RecordedRequest {
        at: arrived - inner.started,
        method: request.method.to_string(),
        path: request.path,
        query: request.query,
        status: reply.status,
        bearer,
        retry_after: reply.retry_after,
    });
    reply.into_response()
}

/// The requests that arrived while a `Retry-After` they should have waited for was running, as
/// lines to show. Requests arriving within `grace` of the 429 were already in flight when it
/// was answered.
pub fn retry_after_violations(requests: &[RecordedRequest], grace: Duration) -> Vec<String> {
    let mut violations = Vec::new();
    for limited in requests.iter().filter(|r| r.status == 429) {
        let wait = Duration::from_secs(limited.retry_after.expect("429 carries Retry-After"));
        for r in requests {
            if r.at > limited.at + grace && r.at < limited.at + wait {
                violations.push(format!(
                    "{} {} at {:?}, 429 at {:?}",
                    r.method, r.path, r.at, limited.at
                ));
            }
        }
    }
    violations
}

/// The most requests seen in any window beyond what `rps` and `burst` allow.
pub fn rate_excess(requests: &[RecordedRequest], rps: f64, burst: f64) -> f64 {
    let mut worst = f64::MIN;
    for (i, first) in requests.iter().enumerate() {
        for (j, last) in requests.iter().enumerate().skip(i) {
            let count = (j - i + 1) as f64;
            let allowed = burst + rps * (last.at - first.at).as_secs_f64();
            worst = worst.max(count - allowed);
        }
    }
    worst
}

/// Decodes `%XX` escapes and `+` (a space in a query).
pub(crate) fn percent_decode(value: &str) -> String {
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
