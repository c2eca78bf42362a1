//! The HTTP client every remote backend shares: its rate limit, the pause that a 429 (or a 5xx
//! with `Retry-After`) puts on the whole backend and the slower pace after a 429, a throttled
//! request sent again once the pause is over, metrics per request, tokens from a
//! [`TokenSource`] checked for age right before each request with one fresh token when the
//! server refuses one, refused grants held back by a cool-down, and redaction of values a server
//! echoes into its error messages.
//!
//! A call returns the reply whatever its status: each operation classifies the codes that mean
//! something for it (a 500 that says "already exists", a 404 that means "gone") before
//! [`Client::error`] applies the generic rules. Nothing here logs a request or response body.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::BackendError;
use super::http::{self, Timeouts};
use super::ratelimit::RateLimiter;
use crate::crd::ProviderType;
use crate::metrics::Metrics;
use crate::secret::{Credentials, SecretString};

/// Pause after a 429 that came without a `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest cool-down after refused grants (Infisical locks an identity for five minutes).
const MAX_GRANT_COOLDOWN: Duration = Duration::from_secs(5 * 60);
/// After a failed refresh that left a still-valid token, when to try again.
const REFRESH_RETRY: Duration = Duration::from_secs(10);
/// A token not at hand within this long was waited for: another caller fetched it.
const TOKEN_WAIT: Duration = Duration::from_millis(10);
/// How often a throttled (429) request is sent again, after its pause, before the throttle is
/// reported: the server did not act on it, and its slot in the queue is as fair as any.
const THROTTLE_RETRIES: u32 = 2;

/// Settings of one [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The API base; request paths are appended to its path.
    pub base: Url,
    /// PEM CA bundle trusted instead of the system roots.
    pub ca_bundle: Option<String>,
    pub rps: u32,
    pub burst: u32,
    /// The lowest rate throttling slows requests to; a tenth of `rps` when None.
    pub floor: Option<f64>,
    pub timeouts: Timeouts,
    /// First pause after a refused grant, doubling on each further refusal.
    pub grant_cooldown: Duration,
}

/// One answer, before any classification.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON; an unusable body is a transient failure of the backend.
    pub fn json(&self, backend: &str, op: &str) -> Result<Value, BackendError> {
        serde_json::from_slice(&self.body).map_err(|_| BackendError::Unavailable {
            message: format!("unexpected answer from {backend} to {op}: not JSON"),
            retry_after: None,
        })
    }

    /// The body as JSON when it is JSON (error bodies), else nothing.
    pub fn json_body(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The message of an error reply: what `read` finds in its JSON body (each backend words
    /// its errors its own way), else the status line, `HTTP 404 Not Found`.
    pub fn message(&self, read: impl FnOnce(&Value) -> Option<String>) -> String {
        self.json_body().as_ref().and_then(read).unwrap_or_else(|| {
            format!(
                "HTTP {} {}",
                self.status.as_u16(),
                self.status.canonical_reason().unwrap_or("")
            )
            .trim_end()
            .to_string()
        })
    }
}

/// A request body.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Json(&'a Value),
    /// `application/x-www-form-urlencoded` (OAuth token requests).
    Form(&'a [(&'a str, &'a str)]),
}

/// A token and how long it lives (None: it does not expire). `Debug` shows no token.
#[derive(Debug)]
pub struct Grant {
    pub token: SecretString,
    pub lifetime: Option<Duration>,
}

/// Why no token could be had.
pub enum GrantError {
    /// The credentials were refused: asking again at once would only lock the identity.
    Refused(String),
    /// Transient or unusable answer: the usual retry rules apply.
    Failed(BackendError),
}

impl GrantError {
    /// What a grant's unsuccessful `reply` means: 429 and 5xx are transient (with their
    /// `Retry-After`), any other status refuses the credentials. `grant` names the request
    /// ("Universal Auth login"); `message` is the server's, already redacted.
    pub fn from_reply(reply: &Reply, grant: &str, message: &str) -> Self {
        let status = reply.status.as_u16();
        if reply.status == StatusCode::TOO_MANY_REQUESTS || reply.status.is_server_error() {
            GrantError::Failed(BackendError::Unavailable {
                message: format!("{grant} answered HTTP {status}: {message}"),
                retry_after: http::retry_after(&reply.headers),
            })
        } else {
            GrantError::Refused(format!("{grant} refused (HTTP {status}): {message}"))
        }
    }
}

impl From<BackendError> for GrantError {
    fn from(err: BackendError) -> Self {
        GrantError::Failed(err)
    }
}

/// How a backend's tokens are obtained: a login, an OAuth grant, or a fixed bearer token.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// Obtains a new token through `http` (rate-limited and measured like every request).
    async fn grant(&self, http: &Http) -> Result<Grant, GrantError>;

    /// Extends `token` before it expires, where the backend can; None: a new grant instead.
    async fn renew(
        &self,
        _http: &Http,
        _token: &SecretString,
    ) -> Option<Result<Grant, BackendError>> {
        None
    }

    /// When, within a token's lifetime, it is replaced.
    fn refresh_after(&self, lifetime: Duration) -> Duration {
        lifetime.mul_f64(0.7)
    }

    /// Whether a reply says the token itself was refused: one fresh token is then tried.
    fn token_refused(&self, reply: &Reply) -> bool {
        reply.status == StatusCode::UNAUTHORIZED
    }

    /// Whether a fresh token can differ from the refused one (a fixed token cannot).
    fn renewable(&self) -> bool {
        true
    }

    /// What a person calls one grant, for messages: "login", "token request".
    fn grant_name(&self) -> &'static str;

    /// Secret values of the source itself (a client secret) that must never appear in an error
    /// message, even if a server echoes them.
    fn secrets(&self) -> Vec<&str>;
}

/// A fixed bearer token (an API key): there is no fresh one to ask for, so a refused one is
/// reported at once.
pub struct BearerToken(pub SecretString);

#[async_trait]
impl TokenSource for BearerToken {
    async fn grant(&self, _http: &Http) -> Result<Grant, GrantError> {
        Ok(Grant {
            token: self.0.clone(),
            lifetime: None,
        })
    }

    fn renewable(&self) -> bool {
        false
    }

    fn grant_name(&self) -> &'static str {
        "token"
    }

    fn secrets(&self) -> Vec<&str> {
        vec![self.0.expose()]
    }
}

/// Plain HTTP to one backend: timeouts, the rate limit with its pause, metrics. No auth.
pub struct Http {
    client: reqwest::Client,
    base: Url,
    limiter: RateLimiter,
    metrics: Arc<Metrics>,
    backend: ProviderType,
}

impl Http {
    pub fn new(
        backend: ProviderType,
        config: &ClientConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BackendError> {
        Ok(Self {
            client: http::client(config.timeouts, config.ca_bundle.as_deref())?,
            base: config.base.clone(),
            limiter: match config.floor {
                Some(floor) => RateLimiter::with_floor(config.rps, config.burst, floor),
                None => RateLimiter::new(config.rps, config.burst),
            },
            metrics,
            backend,
        })
    }

    /// `{base}/seg/seg...`, each segment escaped, with query pairs.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("the base URL was checked to be http(s) when the backend was built")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        url
    }

    /// The rate limiter, shared by every request to this backend.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// One request through the rate limit, measured; a throttled one is sent again after the
    /// pause, up to [`THROTTLE_RETRIES`] times.
    pub async fn send(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<Body<'_>>,
        bearer: Option<&SecretString>,
    ) -> Result<Reply, BackendError> {
        self.send_queued(op, method, url, body, bearer, false).await
    }

    /// Like [`Http::send`], ahead of the requests waiting for the rate limit: for getting a
    /// token, which every one of them needs first. A pause still holds it back.
    pub async fn send_first(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<Body<'_>>,
    ) -> Result<Reply, BackendError> {
        self.send_queued(op, method, url, body, None, true).await
    }

    async fn send_queued(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<Body<'_>>,
        bearer: Option<&SecretString>,
        first: bool,
    ) -> Result<Reply, BackendError> {
        let mut throttled = 0;
        loop {
            if first {
                self.limiter.acquire_first().await;
            } else {
                self.limiter.acquire().await;
            }
            let reply = self
                .exchange(op, method.clone(), url.clone(), body, bearer)
                .await?;
            if reply.status == StatusCode::TOO_MANY_REQUESTS && throttled < THROTTLE_RETRIES {
                throttled += 1;
                continue;
            }
            return Ok(reply);
        }
    }

    /// One request, now (the caller has its slot), measured. A 429 pauses every request of the
    /// backend for its `Retry-After` (1 s without one) and slows the rate; a 5xx with
    /// `Retry-After` pauses too.
    async fn exchange(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<Body<'_>>,
        bearer: Option<&SecretString>,
    ) -> Result<Reply, BackendError> {
        let mut request = self.client.request(method, url);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer.expose());
        }
        request = match body {
            Some(Body::Json(json)) => request.json(json),
            Some(Body::Form(form)) => request.form(form),
            None => request,
        };
        let start = Instant::now();
        let backend = self.backend.as_str();
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                self.metrics
                    .observe_backend(backend, op, None, start.elapsed());
                tracing::debug!(backend, op, "request got no answer");
                return Err(http::transport_error(&err));
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await;
        self.metrics
            .observe_backend(backend, op, Some(status.as_u16()), start.elapsed());
        tracing::debug!(
            backend,
            op,
            status = status.as_u16(),
            elapsed_ms = start.elapsed().as_millis() as u64
        );
        match pause(status, &headers) {
            Some(delay) if status == StatusCode::TOO_MANY_REQUESTS => {
                tracing::debug!(
                    backend,
                    op,
                    retry_after_ms = delay.as_millis() as u64,
                    "throttled"
                );
                self.limiter.throttled(delay);
            }
            Some(delay) => self.limiter.pause_for(delay),
            None => {}
        }
        let body = body.map_err(|err| http::transport_error(&err))?;
        Ok(Reply {
            status,
            headers,
            body: body.to_vec(),
        })
    }
}

/// How long a reply pauses the whole backend: a 429 always, a 5xx when it says `Retry-After`.
fn pause(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    let retry_after = http::retry_after(headers);
    if status == StatusCode::TOO_MANY_REQUESTS {
        Some(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
    } else if status.is_server_error() {
        retry_after
    } else {
        None
    }
}

/// Values that must not appear in an error message even if the server echoed them.
pub struct Redactor<'a> {
    values: Vec<&'a str>,
}

impl<'a> Redactor<'a> {
    pub fn none() -> Self {
        Self { values: Vec::new() }
    }

    /// Every string credential value of four characters or more, also inside lists and
    /// objects (a JSON credential). Which fields are secret depends on the app, so all of them
    /// are hidden: a host name in a message is a smaller loss than a password.
    pub fn credentials(credentials: &'a Credentials) -> Self {
        fn strings<'v>(value: &'v Value, out: &mut Vec<&'v str>) {
            match value {
                Value::String(text) if text.chars().count() >= 4 => out.push(text),
                Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
                Value::Object(fields) => fields.values().for_each(|v| strings(v, out)),
                _ => {}
            }
        }
        let mut values = Vec::new();
        credentials
            .expose()
            .values()
            .for_each(|v| strings(v, &mut values));
        Self { values }
    }

    /// `message` with every value replaced by `[REDACTED]`.
    pub fn apply<'b>(&self, message: String, more: impl IntoIterator<Item = &'b str>) -> String {
        let hide = |message: String, value: &str| {
            if !value.is_empty() && message.contains(value) {
                message.replace(value, "[REDACTED]")
            } else {
                message
            }
        };
        let message = self.values.iter().fold(message, |m, v| hide(m, v));
        more.into_iter().fold(message, hide)
    }
}

/// An authenticated client: [`Http`] plus the tokens of a [`TokenSource`] (none for a backend
/// that needs no auth).
pub struct Client {
    http: Http,
    auth: Option<Auth>,
}

struct Auth {
    source: Box<dyn TokenSource>,
    cooldown: Duration,
    /// Held while a token is fetched: every caller waits for the one grant in flight.
    state: Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    token: Option<Token>,
    /// Bumped on every token obtained, so a request refused with an old token does not throw
    /// away a newer one another request already fetched.
    generation: u64,
    /// Grants refused in a row.
    refused: u32,
    /// No grant before this instant; the message says why.
    cooldown: Option<(Instant, String)>,
}

struct Token {
    value: SecretString,
    generation: u64,
    refresh_at: Option<Instant>,
    expires_at: Option<Instant>,
}

/// The token one request carries.
#[derive(Clone)]
pub struct Bearer {
    pub value: SecretString,
    generation: u64,
}

impl Token {
    fn bearer(&self) -> Bearer {
        Bearer {
            value: self.value.clone(),
            generation: self.generation,
        }
    }
}

impl Client {
    /// A client whose requests carry the tokens of `source`, or no token at all.
    pub fn new(
        backend: ProviderType,
        config: &ClientConfig,
        source: Option<Box<dyn TokenSource>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BackendError> {
        Ok(Self {
            http: Http::new(backend, config, metrics)?,
            auth: source.map(|source| Auth {
                source,
                cooldown: config.grant_cooldown,
                state: Mutex::new(AuthState::default()),
            }),
        })
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    /// See [`Http::url`].
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        self.http.url(segments, query)
    }

    /// An authenticated request: the reply whatever its status, except that a throttled one is
    /// sent again after its pause (up to [`THROTTLE_RETRIES`] times), and a refused token gets
    /// one fresh token and one retry (the reply of the fresh one stands). The token is checked
    /// for age after the wait for a slot, right before it is sent: one that expired during a
    /// pause is replaced, not sent to be refused.
    pub async fn call(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<Body<'_>>,
    ) -> Result<Reply, BackendError> {
        let Some(auth) = &self.auth else {
            return self.http.send(op, method, url, body, None).await;
        };
        let mut fresh = false;
        let mut throttled = 0;
        loop {
            // The slot first, then the token: a token held through the wait for a slot (a
            // pause, a slowed rate) could expire before it is sent.
            self.http.limiter.acquire().await;
            let asked = Instant::now();
            let (bearer, fetched) = self.token().await?;
            if fetched || asked.elapsed() >= TOKEN_WAIT {
                // A token was fetched first, with a request of its own: the slot is spent, and
                // the callers that waited for the token must not all go at once.
                self.http.limiter.acquire().await;
            }
            let reply = self
                .http
                .exchange(op, method.clone(), url.clone(), body, Some(&bearer.value))
                .await?;
            if reply.status == StatusCode::TOO_MANY_REQUESTS && throttled < THROTTLE_RETRIES {
                throttled += 1;
                continue;
            }
            if !auth.source.token_refused(&reply) || fresh || !auth.source.renewable() {
                return Ok(reply);
            }
            tracing::debug!(
                op,
                status = reply.status.as_u16(),
                "token refused; getting a new one"
            );
            self.replace(bearer.generation).await?;
            fresh = true;
        }
    }

    /// Whether the reply says the token was refused (after the fresh token a call tries).
    pub fn token_refused(&self, reply: &Reply) -> bool {
        self.auth
            .as_ref()
            .is_some_and(|auth| auth.source.token_refused(reply))
    }

    /// The generic classification of an answer no operation claimed: a refused token or 401
    /// and 403 are `Auth`, 429 and 5xx transient (with their `Retry-After`), any other 4xx a
    /// rejection, 404 `NotFound`. `message` is the server's, already redacted by the caller.
    pub fn error(&self, reply: &Reply, message: String) -> BackendError {
        let name = self.http.backend.display_name();
        if self.token_refused(reply) {
            let token = if self.auth.as_ref().is_some_and(|a| a.source.renewable()) {
                "a freshly issued token"
            } else {
                "the configured token"
            };
            return BackendError::Auth {
                message: format!("{name} refused {token}: {message}"),
            };
        }
        let retry_after = pause(reply.status, &reply.headers);
        let message = match reply.status.as_u16() {
            429 => format!("rate limited by {name}: {message}"),
            500..=599 => format!("{name} answered HTTP {}: {message}", reply.status.as_u16()),
            _ => message,
        };
        http::status_error(reply.status, message, retry_after)
    }

    /// `message` with the credential values and the source's own secrets redacted.
    pub fn redact(&self, redactor: &Redactor<'_>, message: String) -> String {
        let secrets = self
            .auth
            .as_ref()
            .map(|auth| auth.source.secrets())
            .unwrap_or_default();
        redactor.apply(message, secrets)
    }

    /// The cached token, replaced first when it is due. Without a source: an error.
    pub async fn bearer(&self) -> Result<Bearer, BackendError> {
        self.token().await.map(|(bearer, _)| bearer)
    }

    /// The token to send, and whether getting it took a request (a renewal or a grant).
    async fn token(&self) -> Result<(Bearer, bool), BackendError> {
        let auth = self.auth.as_ref().ok_or_else(|| BackendError::Auth {
            message: "this backend has no credentials to send".into(),
        })?;
        let mut state = auth.state.lock().await;
        let now = Instant::now();
        let Some(token) = &state.token else {
            return self.obtain(auth, &mut state).await.map(|b| (b, true));
        };
        if token.refresh_at.is_none_or(|at| now < at) {
            return Ok((token.bearer(), false));
        }
        let expired = token.expires_at.is_some_and(|at| now >= at);
        if !expired {
            let current = token.value.clone();
            match auth.source.renew(&self.http, &current).await {
                Some(Ok(grant)) => {
                    return Ok((install(&mut state, grant, auth.source.as_ref()), true));
                }
                Some(Err(err)) => tracing::debug!(error = %err, "token renewal failed"),
                None => {}
            }
        }
        match self.obtain(auth, &mut state).await {
            Err(err) if !expired => {
                // The old token still works: use it and try again a little later (a refused
                // grant is then held back by its cool-down).
                tracing::warn!(error = %err, "cannot refresh the token; keeping the current one");
                let token = state
                    .token
                    .as_mut()
                    .expect("checked above; a failed grant keeps it");
                token.refresh_at = Some(now + REFRESH_RETRY);
                Ok((token.bearer(), true))
            }
            result => result.map(|bearer| (bearer, true)),
        }
    }

    /// A fresh token after `rejected` was refused, unless another request already replaced it.
    async fn replace(&self, rejected: u64) -> Result<Bearer, BackendError> {
        let auth = self.auth.as_ref().expect("only called with a token source");
        let mut state = auth.state.lock().await;
        if let Some(token) = &state.token
            && token.generation != rejected
        {
            return Ok(token.bearer());
        }
        state.token = None;
        self.obtain(auth, &mut state).await
    }

    /// A grant, unless refused grants are cooling down.
    async fn obtain(&self, auth: &Auth, state: &mut AuthState) -> Result<Bearer, BackendError> {
        let now = Instant::now();
        let next = auth.source.grant_name();
        if let Some((until, message)) = &state.cooldown
            && now < *until
        {
            return Err(BackendError::Auth {
                message: format!("{message}; next {next} attempt in {}s", secs(*until - now)),
            });
        }
        match auth.source.grant(&self.http).await {
            Ok(grant) => {
                state.refused = 0;
                state.cooldown = None;
                Ok(install(state, grant, auth.source.as_ref()))
            }
            Err(GrantError::Failed(err)) => Err(err),
            Err(GrantError::Refused(message)) => {
                state.refused += 1;
                let cooldown = auth
                    .cooldown
                    .saturating_mul(1 << (state.refused - 1).min(16))
                    .min(MAX_GRANT_COOLDOWN);
                tracing::warn!(
                    refused_in_a_row = state.refused,
                    cooldown_secs = cooldown.as_secs(),
                    "{} {next} refused; not asking again before the cool-down",
                    self.http.backend.display_name()
                );
                // Counted from the refusal, so no grant reaches the server within it.
                state.cooldown = Some((Instant::now() + cooldown, message.clone()));
                Err(BackendError::Auth {
                    message: format!("{message}; next {next} attempt in {}s", secs(cooldown)),
                })
            }
        }
    }
}

fn install(state: &mut AuthState, grant: Grant, source: &dyn TokenSource) -> Bearer {
    let now = Instant::now();
    state.generation += 1;
    let token = Token {
        value: grant.token,
        generation: state.generation,
        refresh_at: grant.lifetime.map(|l| now + source.refresh_after(l)),
        expires_at: grant.lifetime.map(|l| now + l),
    };
    let bearer = token.bearer();
    state.token = Some(token);
    bearer
}

fn secs(duration: Duration) -> u64 {
    duration.as_secs_f64().ceil() as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn redaction_hides_credential_values_and_source_secrets() {
        let credentials = Credentials::new(BTreeMap::from([
            ("password".to_string(), Value::from("zebra-canary-7781")),
            ("port".to_string(), Value::from(1433)),
            ("db".to_string(), Value::from("abc")),
            (
                "attached".to_string(),
                serde_json::json!([{"s3": {"secret": "nested-canary"}}]),
            ),
        ]));
        let redact = Redactor::credentials(&credentials);
        let message = redact.apply(
            "login for abc failed with zebra-canary-7781 and s3cr3t-id on 1433, nested-canary"
                .to_string(),
            ["s3cr3t-id"],
        );
        assert_eq!(
            message,
            "login for abc failed with [REDACTED] and [REDACTED] on 1433, [REDACTED]"
        );
        assert_eq!(Redactor::none().apply("plain".into(), [""]), "plain");
    }

    #[test]
    fn urls_keep_a_base_path_and_escape_segments() {
        let http = |base: &str| {
            let config = ClientConfig {
                base: Url::parse(base).unwrap(),
                ca_bundle: None,
                rps: 1,
                burst: 1,
                floor: None,
                timeouts: Timeouts::default(),
                grant_cooldown: Duration::from_secs(30),
            };
            Http::new(
                ProviderType::Infisical,
                &config,
                Arc::new(Metrics::default()),
            )
            .unwrap()
        };
        let segments = [
            "api",
            "v1",
            "app-connections",
            "mssql",
            "connection-name",
            "a b/c",
        ];
        for base in [
            "https://vault.example/infisical",
            "https://vault.example/infisical/",
        ] {
            let url = http(base).url(&segments, &[("projectId", "p&1")]);
            assert_eq!(
                url.as_str(),
                "https://vault.example/infisical/api/v1/app-connections/mssql/connection-name/\
                 a%20b%2Fc?projectId=p%261"
            );
        }
        let url = http("http://127.0.0.1:8080").url(&["api", "status"], &[]);
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/api/status");
    }

    struct Fixed;

    #[async_trait]
    impl TokenSource for Fixed {
        async fn grant(&self, _: &Http) -> Result<Grant, GrantError> {
            Err(GrantError::Refused("no".into()))
        }
        fn grant_name(&self) -> &'static str {
            "login"
        }
        fn secrets(&self) -> Vec<&str> {
            Vec::new()
        }
    }

    #[test]
    fn tokens_refresh_at_seventy_percent_and_none_never_expires() {
        let mut state = AuthState::default();
        let before = Instant::now();
        install(
            &mut state,
            Grant {
                token: SecretString::new("a".into()),
                lifetime: Some(Duration::from_secs(100)),
            },
            &Fixed,
        );
        let token = state.token.as_ref().unwrap();
        let refresh = token.refresh_at.unwrap() - before;
        assert!(
            refresh >= Duration::from_secs(70) && refresh < Duration::from_secs(71),
            "{refresh:?}"
        );
        assert_eq!(token.generation, 1);
        install(
            &mut state,
            Grant {
                token: SecretString::new("b".into()),
                lifetime: None,
            },
            &Fixed,
        );
        let token = state.token.as_ref().unwrap();
        assert!(token.refresh_at.is_none() && token.expires_at.is_none());
        assert_eq!(token.generation, 2);
    }

    #[test]
    fn a_429_always_pauses_a_5xx_only_when_it_says_so() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            pause(StatusCode::TOO_MANY_REQUESTS, &headers),
            Some(DEFAULT_RETRY_AFTER)
        );
        assert_eq!(pause(StatusCode::SERVICE_UNAVAILABLE, &headers), None);
        assert_eq!(pause(StatusCode::BAD_REQUEST, &headers), None);
        headers.insert(
            reqwest::header::RETRY_AFTER,
            reqwest::header::HeaderValue::from_static("3"),
        );
        assert_eq!(
            pause(StatusCode::SERVICE_UNAVAILABLE, &headers),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            pause(StatusCode::TOO_MANY_REQUESTS, &headers),
            Some(Duration::from_secs(3))
        );
    }
}
