//! The HTTP side of the Infisical backend: Universal Auth login and token caching, the rate
//! limit, and the classification of every answer.
//!
//! Auth rules from the contract: a token is renewed (or replaced by a fresh login) at ~70% of its
//! `expiresIn`; a 401, or a 403 with `"error":"TokenError"`, gets exactly one fresh login; three
//! refused logins lock the identity for five minutes, so a refused login is not tried again for a
//! cool-down that doubles on every further refusal. Logins are single-flight: every request
//! waits on one lock while a login runs and then uses its token.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::backend::BackendError;
use crate::backend::http::{self, Timeouts};
use crate::backend::ratelimit::RateLimiter;
use crate::metrics::Metrics;
use crate::secret::{Credentials, SecretString};

const BACKEND: &str = "infisical";
/// The longest cool-down after refused logins: Infisical's lockout lasts five minutes.
const MAX_LOGIN_COOLDOWN: Duration = Duration::from_secs(5 * 60);
/// Pause after a 429 that came without a `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// After a failed renewal and login that left a still-valid token, when to try again.
const RENEW_RETRY: Duration = Duration::from_secs(10);
/// Share of `expiresIn` after which a token is renewed.
const RENEW_AT: f64 = 0.7;

/// Settings of one [`Client`].
pub(super) struct ClientConfig {
    pub base: Url,
    pub client_id: SecretString,
    pub client_secret: SecretString,
    pub ca_bundle: Option<String>,
    pub rps: u32,
    pub burst: u32,
    pub timeouts: Timeouts,
    pub login_cooldown: Duration,
}

pub(super) struct Client {
    http: reqwest::Client,
    base: Url,
    client_id: SecretString,
    client_secret: SecretString,
    limiter: RateLimiter,
    metrics: Arc<Metrics>,
    login_cooldown: Duration,
    auth: Mutex<AuthState>,
}

#[derive(Default)]
struct AuthState {
    token: Option<Token>,
    /// Bumped on every token obtained, so a request refused with an old token does not throw
    /// away a newer one another request already fetched.
    generation: u64,
    /// Logins refused in a row.
    refused_logins: u32,
    /// No login before `until`; `message` says why.
    cooldown: Option<(Instant, String)>,
}

struct Token {
    value: SecretString,
    generation: u64,
    renew_at: Option<Instant>,
    expires_at: Option<Instant>,
}

/// The token one request carries.
#[derive(Clone)]
pub(super) struct Bearer {
    value: SecretString,
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

/// `accessToken` + `expiresIn` of a login or renewal.
#[derive(Debug)]
struct Grant {
    token: SecretString,
    expires_in: u64,
}

/// A failed call.
pub(super) enum Failure {
    /// A 4xx other than auth that the operation may interpret (404 gone, 400 name taken).
    Status { status: StatusCode, message: String },
    /// Already classified: auth, transient, unusable answers.
    Backend(BackendError),
}

impl From<Failure> for BackendError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Status { status, message } => http::status_error(status, message, None),
            Failure::Backend(err) => err,
        }
    }
}

impl From<BackendError> for Failure {
    fn from(err: BackendError) -> Self {
        Failure::Backend(err)
    }
}

/// One answer, before classification.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Values that must not appear in an error message even if the server echoed them.
pub(super) struct Redactor<'a> {
    values: Vec<&'a str>,
}

impl<'a> Redactor<'a> {
    pub fn none() -> Self {
        Self { values: Vec::new() }
    }

    /// Every string credential value of four characters or more. Which fields are secret is
    /// per app, so all of them are hidden: a host name in a message is a smaller loss than a
    /// password.
    pub fn credentials(credentials: &'a Credentials) -> Self {
        let values = credentials
            .expose()
            .values()
            .filter_map(Value::as_str)
            .filter(|v| v.chars().count() >= 4)
            .collect();
        Self { values }
    }

    fn apply(&self, mut message: String, client_secret: &str) -> String {
        for value in self.values.iter().copied().chain([client_secret]) {
            if !value.is_empty() && message.contains(value) {
                message = message.replace(value, "[REDACTED]");
            }
        }
        message
    }
}

impl Client {
    pub fn new(config: ClientConfig, metrics: Arc<Metrics>) -> Result<Self, BackendError> {
        Ok(Self {
            http: http::client(config.timeouts, config.ca_bundle.as_deref())?,
            base: config.base,
            client_id: config.client_id,
            client_secret: config.client_secret,
            limiter: RateLimiter::new(config.rps, config.burst),
            metrics,
            login_cooldown: config.login_cooldown,
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// `{base}/seg/seg...`, each segment escaped, with an optional query pair.
    pub fn url(&self, segments: &[&str], query: Option<(&str, &str)>) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("the base URL was checked to be http(s) when the backend was built")
            .pop_if_empty()
            .extend(segments);
        if let Some((key, value)) = query {
            url.query_pairs_mut().append_pair(key, value);
        }
        url
    }

    /// An authenticated call: 2xx → the JSON body. A 401 or a 403 `TokenError` gets one fresh
    /// login and one retry, then `Auth`.
    pub async fn call(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<&Value>,
        redact: &Redactor<'_>,
    ) -> Result<Value, Failure> {
        let mut bearer = self.bearer().await?;
        let mut fresh_login = false;
        loop {
            let reply = self
                .send(op, method.clone(), url.clone(), body, Some(&bearer.value))
                .await?;
            if reply.status.is_success() {
                return parse(op, &reply.body);
            }
            let (message, kind) = self.error_text(&reply, redact);
            let token_refused = reply.status == StatusCode::UNAUTHORIZED
                || (reply.status == StatusCode::FORBIDDEN && kind.as_deref() == Some("TokenError"));
            if token_refused {
                if fresh_login {
                    return Err(Failure::Backend(BackendError::Auth {
                        message: format!("Infisical refused a freshly issued token: {message}"),
                    }));
                }
                tracing::debug!(
                    op,
                    status = reply.status.as_u16(),
                    "token refused; logging in again"
                );
                bearer = self.relogin(bearer.generation).await?;
                fresh_login = true;
                continue;
            }
            return Err(self.classify(&reply, message));
        }
    }

    /// `GET /api/status`: 200 means the server is up.
    pub async fn status(&self) -> Result<(), BackendError> {
        let url = self.url(&["api", "status"], None);
        let reply = self.send("status", Method::GET, url, None, None).await?;
        if reply.status.is_success() {
            return Ok(());
        }
        let (message, _) = self.error_text(&reply, &Redactor::none());
        Err(self.classify(&reply, message).into())
    }

    /// The cached token, renewed or replaced first when it is due.
    pub async fn bearer(&self) -> Result<Bearer, BackendError> {
        let mut auth = self.auth.lock().await;
        let now = Instant::now();
        let Some(token) = &auth.token else {
            return self.login(&mut auth).await;
        };
        if token.renew_at.is_none_or(|at| now < at) {
            return Ok(token.bearer());
        }
        let expired = token.expires_at.is_some_and(|at| now >= at);
        if !expired {
            let current = token.value.clone();
            match self.renew(&current).await {
                Ok(grant) => return Ok(install(&mut auth, grant)),
                Err(err) => tracing::debug!(error = %err, "token renewal failed; logging in"),
            }
        }
        match self.login(&mut auth).await {
            Err(err) if !expired => {
                // The old token still works: use it and try again a little later (a refused
                // login is then held back by its cool-down).
                tracing::warn!(error = %err, "cannot refresh the Infisical token; keeping it");
                let token = auth
                    .token
                    .as_mut()
                    .expect("checked above; login keeps it on failure");
                token.renew_at = Some(now + RENEW_RETRY);
                Ok(token.bearer())
            }
            result => result,
        }
    }

    /// A fresh login after `rejected` was refused, unless another request already replaced it.
    async fn relogin(&self, rejected: u64) -> Result<Bearer, BackendError> {
        let mut auth = self.auth.lock().await;
        if let Some(token) = &auth.token
            && token.generation != rejected
        {
            return Ok(token.bearer());
        }
        auth.token = None;
        self.login(&mut auth).await
    }

    /// `POST /api/v1/auth/universal-auth/login`, unless a refused login is cooling down.
    async fn login(&self, auth: &mut AuthState) -> Result<Bearer, BackendError> {
        let now = Instant::now();
        if let Some((until, message)) = &auth.cooldown
            && now < *until
        {
            return Err(BackendError::Auth {
                message: format!("{message}; next login attempt in {}s", secs(*until - now)),
            });
        }
        let url = self.url(&["api", "v1", "auth", "universal-auth", "login"], None);
        let body = json!({
            "clientId": self.client_id.expose(),
            "clientSecret": self.client_secret.expose(),
        });
        let reply = self
            .send("login", Method::POST, url, Some(&body), None)
            .await?;
        drop(body);
        if reply.status.is_success() {
            let grant = grant(&reply.body)?;
            auth.refused_logins = 0;
            auth.cooldown = None;
            tracing::debug!(expires_in = grant.expires_in, "logged in to Infisical");
            return Ok(install(auth, grant));
        }
        let (message, _) = self.error_text(&reply, &Redactor::none());
        if reply.status == StatusCode::TOO_MANY_REQUESTS || reply.status.is_server_error() {
            return Err(self.classify(&reply, message).into());
        }
        // Refused: the credentials, the identity or the URL is wrong. Trying again at once would
        // only lock the identity.
        auth.refused_logins += 1;
        let cooldown = self
            .login_cooldown
            .saturating_mul(1 << (auth.refused_logins - 1).min(16))
            .min(MAX_LOGIN_COOLDOWN);
        let message = format!(
            "Universal Auth login refused (HTTP {}): {message}",
            reply.status.as_u16()
        );
        tracing::warn!(
            status = reply.status.as_u16(),
            refused_in_a_row = auth.refused_logins,
            cooldown_secs = cooldown.as_secs(),
            "Infisical login refused; not trying again before the cool-down"
        );
        // Counted from the refusal, so no login reaches the server within the cool-down.
        auth.cooldown = Some((Instant::now() + cooldown, message.clone()));
        Err(BackendError::Auth {
            message: format!("{message}; next login attempt in {}s", secs(cooldown)),
        })
    }

    /// `POST /api/v1/auth/token/renew`.
    async fn renew(&self, token: &SecretString) -> Result<Grant, BackendError> {
        let url = self.url(&["api", "v1", "auth", "token", "renew"], None);
        let body = json!({"accessToken": token.expose()});
        let reply = self
            .send("renew", Method::POST, url, Some(&body), None)
            .await?;
        drop(body);
        if reply.status.is_success() {
            return grant(&reply.body);
        }
        let (message, _) = self.error_text(&reply, &Redactor::none());
        Err(self.classify(&reply, message).into())
    }

    /// One HTTP request through the rate limit, recorded in the metrics.
    async fn send(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<&Value>,
        bearer: Option<&SecretString>,
    ) -> Result<Reply, BackendError> {
        self.limiter.acquire().await;
        let mut request = self.http.request(method, url);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer.expose());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let start = Instant::now();
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                self.metrics
                    .observe_backend(BACKEND, op, None, start.elapsed());
                tracing::debug!(op, "Infisical request got no answer");
                return Err(http::transport_error(&err));
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await;
        self.metrics
            .observe_backend(BACKEND, op, Some(status.as_u16()), start.elapsed());
        tracing::debug!(
            op,
            status = status.as_u16(),
            elapsed_ms = start.elapsed().as_millis() as u64
        );
        match body {
            Ok(body) => Ok(Reply {
                status,
                headers,
                body: body.to_vec(),
            }),
            Err(err) => Err(http::transport_error(&err)),
        }
    }

    /// The server's `message` (422 issue arrays joined), redacted, and its `error` kind.
    fn error_text(&self, reply: &Reply, redact: &Redactor<'_>) -> (String, Option<String>) {
        let body: Option<Value> = serde_json::from_slice(&reply.body).ok();
        let kind = body
            .as_ref()
            .and_then(|b| b.get("error")?.as_str().map(str::to_owned));
        let message = body
            .as_ref()
            .and_then(super::mapping::error_message)
            .unwrap_or_else(|| {
                format!(
                    "HTTP {} {}",
                    reply.status.as_u16(),
                    reply.status.canonical_reason().unwrap_or("")
                )
                .trim_end()
                .to_string()
            });
        (redact.apply(message, self.client_secret.expose()), kind)
    }

    /// Turns a non-2xx answer (other than a refused token) into a failure. 429 and a 5xx with
    /// `Retry-After` pause every request of this backend.
    fn classify(&self, reply: &Reply, message: String) -> Failure {
        let status = reply.status;
        let retry_after = http::retry_after(&reply.headers);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let delay = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
            self.limiter.pause_for(delay);
            return Failure::Backend(BackendError::Unavailable {
                message: format!("rate limited by Infisical: {message}"),
                retry_after: Some(delay),
            });
        }
        if status.is_server_error() {
            if let Some(delay) = retry_after {
                self.limiter.pause_for(delay);
            }
            return Failure::Backend(BackendError::Unavailable {
                message: format!("Infisical answered HTTP {}: {message}", status.as_u16()),
                retry_after,
            });
        }
        match status {
            // PermissionDenied: the identity lacks a permission; a new token will not help.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Failure::Backend(BackendError::Auth { message })
            }
            _ if status.is_client_error() => Failure::Status { status, message },
            _ => Failure::Backend(http::status_error(status, message, retry_after)),
        }
    }
}

fn install(auth: &mut AuthState, grant: Grant) -> Bearer {
    let now = Instant::now();
    auth.generation += 1;
    // `expiresIn` 0: the token never expires.
    let lifetime = (grant.expires_in > 0).then(|| Duration::from_secs(grant.expires_in));
    let token = Token {
        value: grant.token,
        generation: auth.generation,
        renew_at: lifetime.map(|l| now + l.mul_f64(RENEW_AT)),
        expires_at: lifetime.map(|l| now + l),
    };
    let bearer = token.bearer();
    auth.token = Some(token);
    bearer
}

fn grant(body: &[u8]) -> Result<Grant, BackendError> {
    let unexpected = || BackendError::Unavailable {
        message: "unexpected answer from Infisical's login: no accessToken".to_string(),
        retry_after: None,
    };
    let body: Value = serde_json::from_slice(body).map_err(|_| unexpected())?;
    let token = body
        .get("accessToken")
        .and_then(Value::as_str)
        .ok_or_else(unexpected)?;
    Ok(Grant {
        token: SecretString::new(token.to_owned()),
        expires_in: body.get("expiresIn").and_then(Value::as_u64).unwrap_or(0),
    })
}

fn parse(op: &str, body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body).map_err(|_| {
        Failure::Backend(BackendError::Unavailable {
            message: format!("unexpected answer from Infisical to {op}: not JSON"),
            retry_after: None,
        })
    })
}

fn secs(duration: Duration) -> u64 {
    duration.as_secs_f64().ceil() as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn redaction_hides_credential_values_and_the_client_secret() {
        let credentials = Credentials::new(BTreeMap::from([
            ("password".to_string(), Value::from("zebra-canary-7781")),
            ("port".to_string(), Value::from(1433)),
            ("db".to_string(), Value::from("abc")),
        ]));
        let redact = Redactor::credentials(&credentials);
        let message = redact.apply(
            "login for abc failed with zebra-canary-7781 and s3cr3t-id on 1433".to_string(),
            "s3cr3t-id",
        );
        assert_eq!(
            message,
            "login for abc failed with [REDACTED] and [REDACTED] on 1433"
        );
        assert_eq!(Redactor::none().apply("plain".into(), ""), "plain");
    }

    #[test]
    fn urls_keep_a_base_path_and_escape_segments() {
        let client = |base: &str| {
            let config = ClientConfig {
                base: Url::parse(base).unwrap(),
                client_id: SecretString::new("id".into()),
                client_secret: SecretString::new("secret".into()),
                ca_bundle: None,
                rps: 1,
                burst: 1,
                timeouts: Timeouts::default(),
                login_cooldown: Duration::from_secs(30),
            };
            Client::new(config, Arc::new(Metrics::default())).unwrap()
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
            let url = client(base).url(&segments, Some(("projectId", "p&1")));
            assert_eq!(
                url.as_str(),
                "https://vault.example/infisical/api/v1/app-connections/mssql/connection-name/\
                 a%20b%2Fc?projectId=p%261"
            );
        }
        let url = client("http://127.0.0.1:8080").url(&["api", "status"], None);
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/api/status");
    }

    #[test]
    fn grants_read_token_and_lifetime() {
        let grant = grant(br#"{"accessToken":"t","expiresIn":7200,"tokenType":"Bearer"}"#).unwrap();
        assert_eq!((grant.token.expose(), grant.expires_in), ("t", 7200));
        assert!(super::grant(b"{}").unwrap_err().is_transient());
        assert!(super::grant(b"<html>").unwrap_err().is_transient());
    }

    #[test]
    fn tokens_renew_at_seventy_percent_and_zero_never_expires() {
        let mut auth = AuthState::default();
        let before = Instant::now();
        install(
            &mut auth,
            Grant {
                token: SecretString::new("a".into()),
                expires_in: 100,
            },
        );
        let token = auth.token.as_ref().unwrap();
        let renew = token.renew_at.unwrap() - before;
        assert!(
            renew >= Duration::from_secs(70) && renew < Duration::from_secs(71),
            "{renew:?}"
        );
        assert_eq!(token.generation, 1);
        install(
            &mut auth,
            Grant {
                token: SecretString::new("b".into()),
                expires_in: 0,
            },
        );
        let token = auth.token.as_ref().unwrap();
        assert!(token.renew_at.is_none() && token.expires_at.is_none());
        assert_eq!(token.generation, 2);
    }
}
