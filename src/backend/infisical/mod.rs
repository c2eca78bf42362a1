//! Infisical App Connections, reached with a machine identity (Universal Auth).
//!
//! The contract, quirks included, is `backends/infisical.md`: every 2xx is 200, names are unique
//! per project across all apps, responses never carry secret fields, and `credentialsHash`
//! changes on every write that carries credentials (so it is reported, never compared).
//!
//! `auth` is the login as a token source of the shared client, `mapping` the pure spec → body
//! and response → [`Remote`] translation.

mod auth;
mod mapping;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use self::auth::UniversalAuth;
use super::client::{Body, Client, ClientConfig, Redactor, Reply};
use super::http::{self, Timeouts};
use super::{Backend, BackendError, Desired, Remote, Target, ratelimit};
use crate::crd::{InfisicalProvider, ProviderType, RateLimit};
use crate::metrics::Metrics;
use crate::secret::SecretString;

pub use self::mapping::{NAME_RULE, ROTATING};

/// Requests per second when the backend resource sets no `rateLimit`.
pub const DEFAULT_RPS: u32 = 10;
/// Burst when the backend resource sets no `rateLimit`.
pub const DEFAULT_BURST: u32 = 20;
/// First pause after a refused login (doubling on each further refusal, up to five minutes).
pub const DEFAULT_LOGIN_COOLDOWN: Duration = Duration::from_secs(30);
/// How long the `/options` catalogue of apps and methods is trusted before it is fetched again.
const OPTIONS_TTL: Duration = Duration::from_secs(10 * 60);

/// Everything an [`InfisicalBackend`] needs, resolved from the backend resource and its Secrets.
#[derive(Clone, Debug)]
pub struct InfisicalConfig {
    /// Base URL, e.g. `https://app.infisical.com`.
    pub url: String,
    /// Project for connections whose target names none; none means organisation-level.
    pub project_id: Option<String>,
    pub client_id: SecretString,
    pub client_secret: SecretString,
    /// PEM CA bundle trusted instead of the system roots.
    pub ca_bundle: Option<String>,
    /// 10 requests per second, burst 20 when none.
    pub rate_limit: Option<RateLimit>,
    pub timeouts: Timeouts,
    /// First pause after a refused login.
    pub login_cooldown: Duration,
}

impl InfisicalConfig {
    /// A config with the defaults: no project, system roots, default rate limit and timeouts.
    pub fn new(
        url: impl Into<String>,
        client_id: SecretString,
        client_secret: SecretString,
    ) -> Self {
        Self {
            url: url.into(),
            project_id: None,
            client_id,
            client_secret,
            ca_bundle: None,
            rate_limit: None,
            timeouts: Timeouts::default(),
            login_cooldown: DEFAULT_LOGIN_COOLDOWN,
        }
    }

    /// The config of an `infisical` provider block, with the credentials read from its Secrets.
    pub fn from_provider(
        provider: &InfisicalProvider,
        rate_limit: Option<RateLimit>,
        client_id: SecretString,
        client_secret: SecretString,
    ) -> Self {
        Self {
            project_id: provider.project_id.clone(),
            ca_bundle: provider.ca_bundle.clone(),
            rate_limit,
            ..Self::new(provider.url.clone(), client_id, client_secret)
        }
    }
}

/// The apps and methods the server offers, or `None` where it has no `/options` route.
struct OptionsCache {
    fetched: Instant,
    apps: Option<BTreeMap<String, Vec<String>>>,
}

/// Infisical App Connections as a [`Backend`].
pub struct InfisicalBackend {
    client: Client,
    project_id: Option<String>,
    options: Mutex<Option<OptionsCache>>,
}

impl InfisicalBackend {
    /// Builds the client; no request is made until the first operation.
    pub fn new(config: InfisicalConfig, metrics: Arc<Metrics>) -> Result<Self, BackendError> {
        let base = http::base_url("infisical.url", &config.url)?;
        let (rps, burst) = ratelimit::rate(config.rate_limit, (DEFAULT_RPS, DEFAULT_BURST));
        let client = Client::new(
            ProviderType::Infisical,
            &ClientConfig {
                base,
                ca_bundle: config.ca_bundle,
                rps,
                burst,
                timeouts: config.timeouts,
                grant_cooldown: config.login_cooldown,
            },
            Some(Box::new(UniversalAuth {
                client_id: config.client_id,
                client_secret: config.client_secret,
            })),
            metrics,
        )?;
        Ok(Self {
            client,
            project_id: config.project_id,
            options: Mutex::new(None),
        })
    }

    /// The rules of an `infisical` block that need no Secret: the URL and the CA bundle.
    pub fn check_spec(provider: &InfisicalProvider) -> Result<(), BackendError> {
        http::base_url("infisical.url", &provider.url)?;
        http::client(Timeouts::default(), provider.ca_bundle.as_deref()).map(|_| ())
    }

    /// The target's project, else the backend's default; none means organisation-level.
    fn project<'a>(&'a self, target: &'a Target) -> Option<&'a str> {
        target.project.as_deref().or(self.project_id.as_deref())
    }

    /// The failure an answer no operation claimed stands for, its message redacted.
    fn error(&self, reply: &Reply, redact: &Redactor<'_>) -> BackendError {
        let message = self.client.redact(redact, message(reply));
        self.client.error(reply, message)
    }

    /// One connection read by `GET url`; 404 means there is none.
    async fn read_connection(
        &self,
        op: &'static str,
        url: Url,
    ) -> Result<Option<Remote>, BackendError> {
        self.read(op, url)
            .await?
            .map(|body| mapping::remote(&body))
            .transpose()
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

    /// The JSON `GET url` answers; 404 means there is nothing there.
    async fn read(&self, op: &'static str, url: Url) -> Result<Option<Value>, BackendError> {
        let reply = self.client.call(op, Method::GET, url, None).await?;
        match reply.status {
            status if status.is_success() => reply.json("Infisical", op).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.error(&reply, &Redactor::none())),
        }
    }

    fn connection_url(&self, target: &Target, id: &str) -> Url {
        self.client
            .url(&["api", "v1", "app-connections", &target.app, id], &[])
    }

    /// `GET /api/v1/app-connections/options`: the catalogue, or None where there is no route.
    async fn fetch_options(&self) -> Result<Option<BTreeMap<String, Vec<String>>>, BackendError> {
        let url = self
            .client
            .url(&["api", "v1", "app-connections", "options"], &[]);
        let reply = self.client.call("options", Method::GET, url, None).await?;
        match reply.status {
            status if status.is_success() => {
                Ok(Some(mapping::options(&reply.json("Infisical", "options")?)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.error(&reply, &Redactor::none())),
        }
    }

    /// `InvalidSpec` when the server does not offer the app or its method. The catalogue is
    /// fetched once per [`OPTIONS_TTL`]; a server without the route skips the check.
    async fn check_app_method(&self, target: &Target) -> Result<(), BackendError> {
        let method = mapping::method(target)?;
        let mut cache = self.options.lock().await;
        if cache
            .as_ref()
            .is_none_or(|c| c.fetched.elapsed() >= OPTIONS_TTL)
        {
            let fetched = Instant::now();
            match self.fetch_options().await {
                Ok(apps) => {
                    if apps.is_none() {
                        tracing::debug!(
                            "Infisical has no /options route; app and method unchecked"
                        );
                    }
                    *cache = Some(OptionsCache { fetched, apps });
                }
                // A stale catalogue is better than none while the server is unwell.
                Err(err) if cache.is_some() => {
                    tracing::debug!(error = %err, "keeping the old catalogue");
                }
                Err(err) => return Err(err),
            }
        }
        match cache.as_ref().and_then(|c| c.apps.as_ref()) {
            Some(apps) => mapping::check_app_method(apps, &target.app, method),
            None => Ok(()),
        }
    }
}

/// The connection a successful create or update answered with.
fn written(reply: &Reply, op: &str) -> Result<Remote, BackendError> {
    mapping::remote(&reply.json("Infisical", op)?)
}

/// The server's `message` (422 issue arrays joined), else the status line.
fn message(reply: &Reply) -> String {
    reply.message(mapping::error_message)
}

#[async_trait]
impl Backend for InfisicalBackend {
    fn provider(&self) -> ProviderType {
        ProviderType::Infisical
    }

    /// Name rules and method presence. The app/method check needs the server's catalogue and
    /// runs at the start of `create` and `update`.
    fn validate(&self, desired: &Desired) -> Result<(), BackendError> {
        mapping::validate(desired)
    }

    /// A real login (or a valid cached token) plus `GET /api/status`.
    async fn check(&self) -> Result<(), BackendError> {
        self.client.bearer().await?;
        let url = self.client.url(&["api", "status"], &[]);
        let reply = self
            .client
            .http()
            .send("status", Method::GET, url, None, None)
            .await?;
        if !reply.status.is_success() {
            return Err(self.error(&reply, &Redactor::none()));
        }
        // /api/status needs no token: an authenticated read proves the identity still works
        // (a revoked token is replaced once, then reported). A server without the route is fine.
        let url = self
            .client
            .url(&["api", "v1", "app-connections", "options"], &[]);
        let reply = self.client.call("check", Method::GET, url, None).await?;
        match reply.status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error(&reply, &Redactor::none())),
        }
    }

    async fn get(&self, id: &str, target: &Target) -> Result<Option<Remote>, BackendError> {
        self.read_connection("get", self.connection_url(target, id))
            .await
    }

    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError> {
        let name = mapping::connection_name(target)?;
        let query: Vec<(&str, &str)> = self
            .project(target)
            .map(|project| ("projectId", project))
            .into_iter()
            .collect();
        let url = self.client.url(
            &[
                "api",
                "v1",
                "app-connections",
                &target.app,
                "connection-name",
                name,
            ],
            &query,
        );
        self.read_connection("find", url).await
    }

    async fn create(&self, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        self.check_app_method(&desired.target).await?;
        let target = &desired.target;
        let name = mapping::connection_name(target)?;
        let body = mapping::create_body(desired, self.project(target))?;
        let url = self
            .client
            .url(&["api", "v1", "app-connections", &target.app], &[]);
        let redact = Redactor::credentials(&desired.credentials);
        let reply = self.write("create", Method::POST, url, body).await?;
        match reply.status {
            status if status.is_success() => written(&reply, "create"),
            // "An App Connection with the name \"x\" already exists"
            StatusCode::BAD_REQUEST
                if message(&reply).contains("already exists") && message(&reply).contains(name) =>
            {
                Err(BackendError::AlreadyExists {
                    name: name.to_owned(),
                })
            }
            // Only a server without `/options` gets this far with an app it does not know.
            StatusCode::NOT_FOUND => Err(BackendError::Rejected {
                message: format!(
                    "Infisical has no route for app {:?}: {}",
                    target.app,
                    self.client.redact(&redact, message(&reply))
                ),
            }),
            _ => Err(self.error(&reply, &redact)),
        }
    }

    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        self.check_app_method(&desired.target).await?;
        let mut body = mapping::update_body(desired);
        let url = self.connection_url(&desired.target, id);
        if mapping::may_clear(desired) {
            // The PATCH merges: a setting dropped from the spec must be sent as null, and only
            // the object itself says whether it is set.
            let current = self
                .read("get", url.clone())
                .await?
                .ok_or(BackendError::NotFound)?;
            mapping::clear_dropped(&mut body, desired, &current);
        }
        let redact = Redactor::credentials(&desired.credentials);
        let reply = self.write("update", Method::PATCH, url, body).await?;
        match reply.status {
            status if status.is_success() => written(&reply, "update"),
            StatusCode::NOT_FOUND => Err(BackendError::NotFound),
            _ => Err(self.error(&reply, &redact)),
        }
    }

    async fn delete(&self, id: &str, target: &Target) -> Result<(), BackendError> {
        let url = self.connection_url(target, id);
        let reply = self
            .client
            .call("delete", Method::DELETE, url, None)
            .await?;
        match reply.status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error(&reply, &Redactor::none())),
        }
    }

    /// Rotation requested on a pair Infisical rotates: its hash then moves without us.
    fn rotates_itself(&self, desired: &Desired) -> bool {
        desired.rotation.is_some()
            && mapping::rotates(&desired.target.app, desired.target.method.as_deref())
    }
}
