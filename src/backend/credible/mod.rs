//! Credible Data connections, through the API of the Malloy Publisher server that serves
//! Credible's data plane.
//!
//! The contract, quirks included, is `backends/credible.md`: there is no server id (a
//! connection's identity is its path), a create of a taken name answers 500 or 409, a PATCH
//! replaces the whole `<type>Connection` block, reads return secrets in clear (a hosted server
//! may strip them), and the connection test answers 200 whatever its verdict. There is no hash
//! at the server: drift is found by comparing what a GET returned with what would be sent
//! (`content_differs`), and what a GET returned is never logged or kept.
//!
//! `mapping` is the pure spec → body and response → verdict translation.

mod mapping;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::client::{BearerToken, Body, Client, ClientConfig, Redactor, Reply, TokenSource};
use super::http::{self, Timeouts};
use super::{Backend, BackendError, ConnectionTest, Desired, Remote, Target, ratelimit};
use crate::crd::{CredibleProvider, ProviderType, RateLimit};
use crate::metrics::Metrics;
use crate::secret::SecretString;

pub use self::mapping::NAME_RULE;

/// Requests per second when the backend resource sets no `rateLimit`.
pub const DEFAULT_RPS: u32 = 10;
/// Burst when the backend resource sets no `rateLimit`.
pub const DEFAULT_BURST: u32 = 20;
/// The path segments before the project: newer servers call projects environments, and both
/// answer alike for now.
const SEGMENTS: [&str; 2] = ["projects", "environments"];

/// Everything a [`CredibleBackend`] needs, resolved from the backend resource and its Secret.
#[derive(Clone, Debug)]
pub struct CredibleConfig {
    /// API base, e.g. `https://acme.data.credibledata.com/api/v0`.
    pub url: String,
    /// Project for connections whose target names none.
    pub project: String,
    /// `projects` when None.
    pub path_segment: Option<String>,
    /// Bearer token; None for a server without authentication (the open-source one).
    pub token: Option<SecretString>,
    /// 10 requests per second, burst 20 when none.
    pub rate_limit: Option<RateLimit>,
    pub timeouts: Timeouts,
}

impl CredibleConfig {
    /// A config with the defaults: segment `projects`, no token, default rate limit and timeouts.
    pub fn new(url: impl Into<String>, project: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            project: project.into(),
            path_segment: None,
            token: None,
            rate_limit: None,
            timeouts: Timeouts::default(),
        }
    }

    /// The config of a `credible` provider block, with the token read from its Secret.
    pub fn from_provider(
        provider: &CredibleProvider,
        rate_limit: Option<RateLimit>,
        token: Option<SecretString>,
    ) -> Self {
        Self {
            path_segment: provider.path_segment.clone(),
            token,
            rate_limit,
            ..Self::new(provider.url.clone(), provider.project.clone())
        }
    }
}

/// Credible Data connections as a [`Backend`].
pub struct CredibleBackend {
    client: Client,
    project: String,
    segment: &'static str,
    has_token: bool,
}

impl CredibleBackend {
    /// Builds the client; no request is made until the first operation.
    pub fn new(config: CredibleConfig, metrics: Arc<Metrics>) -> Result<Self, BackendError> {
        let base = http::base_url("credible.url", &config.url)?;
        let segment = segment(config.path_segment.as_deref())?;
        let (rps, burst) = ratelimit::rate(config.rate_limit, (DEFAULT_RPS, DEFAULT_BURST));
        let has_token = config.token.is_some();
        let source = config
            .token
            .map(|token| Box::new(BearerToken(token)) as Box<dyn TokenSource>);
        let client = Client::new(
            ProviderType::Credible,
            &ClientConfig {
                base,
                ca_bundle: None,
                rps,
                burst,
                floor: Some(ratelimit::floor(config.rate_limit, rps)),
                timeouts: config.timeouts,
                // A fixed token is never refused when it is "granted": no cool-down to wait.
                grant_cooldown: Duration::ZERO,
            },
            source,
            metrics,
        )?;
        Ok(Self {
            client,
            project: config.project,
            segment,
            has_token,
        })
    }

    /// The rules of a `credible` block that need no Secret: the URL and the path segment.
    pub fn check_spec(provider: &CredibleProvider) -> Result<(), BackendError> {
        http::base_url("credible.url", &provider.url)?;
        segment(provider.path_segment.as_deref()).map(|_| ())
    }

    /// The project and name a connection is addressed by: those of its recorded path, so a
    /// connection stays where it was created; the target's for an id that is not a path.
    fn locate<'a>(&'a self, id: &'a str, target: &'a Target) -> (&'a str, &'a str) {
        mapping::parse_id(id)
            .unwrap_or_else(|| (self.project(target), target.connection_name.as_str()))
    }

    fn project<'a>(&'a self, target: &'a Target) -> &'a str {
        target.project.as_deref().unwrap_or(&self.project)
    }

    fn connection_url(&self, project: &str, name: &str) -> Url {
        self.client
            .url(&[self.segment, project, "connections", name], &[])
    }

    fn remote(&self, project: &str, name: &str, content: Option<&Value>, app: &str) -> Remote {
        Remote {
            id: mapping::id(self.segment, project, name),
            connection_name: name.to_owned(),
            credentials_hash: None,
            rotation: None,
            content: content.map(|c| mapping::content(c, app)),
        }
    }

    /// The failure an answer no operation claimed stands for, its message redacted.
    fn error(&self, reply: &Reply, redact: &Redactor<'_>) -> BackendError {
        let message = self.client.redact(redact, message(reply));
        if reply.status == StatusCode::UNAUTHORIZED && !self.has_token {
            return BackendError::Auth {
                message: format!("{message}: this Credible server wants a token (credible.token)"),
            };
        }
        self.client.error(reply, message)
    }

    /// A write refused for its content or by the server's state: 400 (validation), 403 (a
    /// frozen config), a 500 naming a project that does not exist, and an HTML 404 (no such
    /// route: the URL is wrong). Waiting does not help any of them.
    fn refused(&self, reply: &Reply, project: &str, redact: &Redactor<'_>) -> Option<BackendError> {
        let text = || self.client.redact(redact, message(reply));
        let message = match reply.status {
            StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN => text(),
            StatusCode::INTERNAL_SERVER_ERROR if text().contains("not found") => {
                format!("Credible project {project:?} does not exist: {}", text())
            }
            StatusCode::NOT_FOUND if reply.json_body().is_none() => no_api(&self.client),
            _ => return None,
        };
        Some(BackendError::Rejected { message })
    }

    /// One connection by path; None when there is none.
    async fn read(
        &self,
        op: &'static str,
        project: &str,
        name: &str,
        app: &str,
    ) -> Result<Option<Remote>, BackendError> {
        let url = self.connection_url(project, name);
        let reply = self.client.call(op, Method::GET, url, None).await?;
        match reply.status {
            status if status.is_success() => {
                let connection = reply.json("Credible", op)?;
                if !connection.is_object() {
                    return Err(unexpected(op));
                }
                Ok(Some(self.remote(project, name, Some(&connection), app)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.error(&reply, &Redactor::none())),
        }
    }

    /// Sends a connection's body, which holds its credentials: gone once sent.
    async fn write(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Value,
    ) -> Result<Reply, BackendError> {
        self.client
            .call(op, method, url, Some(Body::Json(&body)))
            .await
    }
}

/// The path segment of a provider block, or `InvalidSpec` naming the field.
fn segment(text: Option<&str>) -> Result<&'static str, BackendError> {
    let text = text.unwrap_or(SEGMENTS[0]);
    SEGMENTS
        .into_iter()
        .find(|s| *s == text)
        .ok_or_else(|| BackendError::InvalidSpec {
            message: format!(
                "credible.pathSegment must be \"projects\" or \"environments\", got {text:?}"
            ),
        })
}

/// The server's message in any of Credible's error shapes, else the status line.
fn message(reply: &Reply) -> String {
    reply.message(mapping::error_message)
}

fn unexpected(op: &str) -> BackendError {
    BackendError::Unavailable {
        message: format!("unexpected answer from Credible to {op}"),
        retry_after: None,
    }
}

/// What an HTML 404 (the server's answer to a route it does not have) means.
fn no_api(client: &Client) -> String {
    format!(
        "no Credible API at {}: credible.url is the API base, ending in /api/v0",
        client.url(&[], &[])
    )
}

#[async_trait]
impl Backend for CredibleBackend {
    fn provider(&self) -> ProviderType {
        ProviderType::Credible
    }

    /// Name rules, the type, every field of the block, and no spec field Credible has no
    /// place for.
    fn validate(&self, desired: &Desired) -> Result<(), BackendError> {
        mapping::validate(desired)
    }

    /// The token is accepted and the project exists: `GET /{segment}/{project}/connections`.
    async fn check(&self) -> Result<(), BackendError> {
        let url = self
            .client
            .url(&[self.segment, &self.project, "connections"], &[]);
        let reply = self.client.call("check", Method::GET, url, None).await?;
        match reply.status {
            status if status.is_success() => match reply.json_body() {
                Some(Value::Array(_)) => Ok(()),
                _ => Err(BackendError::Rejected {
                    message: no_api(&self.client),
                }),
            },
            StatusCode::NOT_FOUND => Err(BackendError::Rejected {
                message: match reply.json_body() {
                    Some(_) => format!(
                        "Credible has no project {:?} ({}): {}",
                        self.project,
                        self.segment,
                        message(&reply)
                    ),
                    None => no_api(&self.client),
                },
            }),
            _ => Err(self.error(&reply, &Redactor::none())),
        }
    }

    async fn get(&self, id: &str, target: &Target) -> Result<Option<Remote>, BackendError> {
        let (project, name) = self.locate(id, target);
        self.read("get", project, name, &target.app).await
    }

    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError> {
        let name = mapping::connection_name(target)?;
        self.read("find", self.project(target), name, &target.app)
            .await
    }

    async fn create(&self, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        let body = mapping::body(desired)?;
        let target = &desired.target;
        let (project, name) = (self.project(target), target.connection_name.as_str());
        let url = self.connection_url(project, name);
        let redact = Redactor::credentials(&desired.credentials);
        let reply = self.write("create", Method::POST, url, body).await?;
        let taken = || BackendError::AlreadyExists {
            name: name.to_owned(),
        };
        match reply.status {
            status if status.is_success() => Ok(self.remote(project, name, None, &target.app)),
            // The spec's answer; the server's is a 500 that says so.
            StatusCode::CONFLICT => Err(taken()),
            StatusCode::INTERNAL_SERVER_ERROR if message(&reply).contains("already exists") => {
                Err(taken())
            }
            _ => Err(self
                .refused(&reply, project, &redact)
                .unwrap_or_else(|| self.error(&reply, &redact))),
        }
    }

    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        let body = mapping::body(desired)?;
        let (project, name) = self.locate(id, &desired.target);
        let url = self.connection_url(project, name);
        let redact = Redactor::credentials(&desired.credentials);
        let reply = self.write("update", Method::PATCH, url, body).await?;
        match reply.status {
            status if status.is_success() => {
                Ok(self.remote(project, name, None, &desired.target.app))
            }
            StatusCode::NOT_FOUND if reply.json_body().is_some() => Err(BackendError::NotFound),
            _ => Err(self
                .refused(&reply, project, &redact)
                .unwrap_or_else(|| self.error(&reply, &redact))),
        }
    }

    async fn delete(&self, id: &str, target: &Target) -> Result<(), BackendError> {
        let (project, name) = self.locate(id, target);
        let url = self.connection_url(project, name);
        let reply = self
            .client
            .call("delete", Method::DELETE, url, None)
            .await?;
        match reply.status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND if reply.json_body().is_some() => Ok(()),
            _ => Err(self
                .refused(&reply, project, &Redactor::none())
                .unwrap_or_else(|| self.error(&reply, &Redactor::none()))),
        }
    }

    /// The type and every field of the block as GET returned them against what would be sent;
    /// a secret the server left out is not a difference.
    fn content_differs(&self, desired: &Desired, remote: &Remote) -> Option<bool> {
        remote
            .content
            .as_ref()
            .map(|content| mapping::differs(desired, content))
    }

    /// `POST /connections/test` with the connection: 200 whatever the verdict, which is in
    /// the body. The driver's message is redacted.
    async fn test_connection(
        &self,
        desired: &Desired,
    ) -> Result<Option<ConnectionTest>, BackendError> {
        let body = mapping::body(desired)?;
        let url = self.client.url(&["connections", "test"], &[]);
        let redact = Redactor::credentials(&desired.credentials);
        let reply = self.write("test", Method::POST, url, body).await?;
        if !reply.status.is_success() {
            return Err(self.error(&reply, &redact));
        }
        let verdict = mapping::test_verdict(&reply.json("Credible", "test")?)
            .ok_or_else(|| unexpected("test"))?;
        Ok(Some(ConnectionTest {
            message: self.client.redact(&redact, verdict.message),
            ..verdict
        }))
    }
}
