//! Infisical App Connections, reached with a machine identity (Universal Auth).
//!
//! The contract, quirks included, is `backends/infisical.md`: every 2xx is 200, names are unique
//! per project across all apps, responses never carry secret fields, and `credentialsHash`
//! changes on every write that carries credentials (so it is reported, never compared).
//!
//! `client` holds auth and HTTP, `mapping` the pure spec → body and response → [`Remote`]
//! translation.

mod client;
mod mapping;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use tokio::sync::Mutex;
use tokio::time::Instant;

use self::client::{Client, ClientConfig, Failure, Redactor};
use super::http::Timeouts;
use super::{Backend, BackendError, Desired, Remote, Target};
use crate::crd::{InfisicalProvider, RateLimit};
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
        let base = Url::parse(config.url.trim())
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base())
            .ok_or_else(|| BackendError::InvalidSpec {
                message: format!("infisical.url {:?} is not an http(s) URL", config.url),
            })?;
        let (rps, burst) = match config.rate_limit {
            Some(limit) => {
                let rps = limit.requests_per_second.clamp(1, 10_000) as u32;
                (rps, limit.burst.map_or(rps, |b| b.clamp(1, 10_000) as u32))
            }
            None => (DEFAULT_RPS, DEFAULT_BURST),
        };
        let client = Client::new(
            ClientConfig {
                base,
                client_id: config.client_id,
                client_secret: config.client_secret,
                ca_bundle: config.ca_bundle,
                rps,
                burst,
                timeouts: config.timeouts,
                login_cooldown: config.login_cooldown,
            },
            metrics,
        )?;
        Ok(Self {
            client,
            project_id: config.project_id,
            options: Mutex::new(None),
        })
    }

    /// The target's project, else the backend's default; none means organisation-level.
    fn project<'a>(&'a self, target: &'a Target) -> Option<&'a str> {
        target.project.as_deref().or(self.project_id.as_deref())
    }

    /// One connection read by `GET url`; 404 means there is none.
    async fn read_connection(
        &self,
        op: &'static str,
        url: Url,
    ) -> Result<Option<Remote>, BackendError> {
        match self
            .client
            .call(op, Method::GET, url, None, &Redactor::none())
            .await
        {
            Ok(body) => mapping::remote(&body).map(Some),
            Err(Failure::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    fn connection_url(&self, target: &Target, id: &str) -> Url {
        self.client
            .url(&["api", "v1", "app-connections", &target.app, id], None)
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
            let url = self
                .client
                .url(&["api", "v1", "app-connections", "options"], None);
            let fetched = Instant::now();
            match self
                .client
                .call("options", Method::GET, url, None, &Redactor::none())
                .await
            {
                Ok(body) => {
                    *cache = Some(OptionsCache {
                        fetched,
                        apps: Some(mapping::options(&body)),
                    })
                }
                Err(Failure::Status {
                    status: StatusCode::NOT_FOUND,
                    ..
                }) => {
                    tracing::debug!("Infisical has no /options route; app and method unchecked");
                    *cache = Some(OptionsCache {
                        fetched,
                        apps: None,
                    });
                }
                // A stale catalogue is better than none while the server is unwell.
                Err(err) if cache.is_some() => {
                    tracing::debug!(error = %BackendError::from(err), "keeping the old catalogue");
                }
                Err(err) => return Err(err.into()),
            }
        }
        match cache.as_ref().and_then(|c| c.apps.as_ref()) {
            Some(apps) => mapping::check_app_method(apps, &target.app, method),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for InfisicalBackend {
    fn provider(&self) -> &'static str {
        "infisical"
    }

    /// Name rules and method presence. The app/method check needs the server's catalogue and
    /// runs at the start of `create` and `update`.
    fn validate(&self, desired: &Desired) -> Result<(), BackendError> {
        mapping::validate(desired)
    }

    /// A real login (or a valid cached token) plus `GET /api/status`.
    async fn check(&self) -> Result<(), BackendError> {
        self.client.bearer().await?;
        self.client.status().await?;
        // /api/status needs no token: an authenticated read proves the identity still works
        // (a revoked token is renewed once, then reported). A server without the route is fine.
        let url = self
            .client
            .url(&["api", "v1", "app-connections", "options"], None);
        match self
            .client
            .call("check", Method::GET, url, None, &Redactor::none())
            .await
        {
            Ok(_) => Ok(()),
            Err(Failure::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn get(&self, id: &str, target: &Target) -> Result<Option<Remote>, BackendError> {
        self.read_connection("get", self.connection_url(target, id))
            .await
    }

    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError> {
        let name = mapping::connection_name(target)?;
        let query = self.project(target).map(|project| ("projectId", project));
        let url = self.client.url(
            &[
                "api",
                "v1",
                "app-connections",
                &target.app,
                "connection-name",
                name,
            ],
            query,
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
            .url(&["api", "v1", "app-connections", &target.app], None);
        let redact = Redactor::credentials(&desired.credentials);
        match self
            .client
            .call("create", Method::POST, url, Some(&body), &redact)
            .await
        {
            Ok(body) => mapping::remote(&body),
            // "An App Connection with the name \"x\" already exists"
            Err(Failure::Status {
                status: StatusCode::BAD_REQUEST,
                message,
            }) if message.contains("already exists") && message.contains(name) => {
                Err(BackendError::AlreadyExists {
                    name: name.to_owned(),
                })
            }
            // Only a server without `/options` gets this far with an app it does not know.
            Err(Failure::Status {
                status: StatusCode::NOT_FOUND,
                message,
            }) => Err(BackendError::Rejected {
                message: format!("Infisical has no route for app {:?}: {message}", target.app),
            }),
            Err(err) => Err(err.into()),
        }
    }

    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        self.check_app_method(&desired.target).await?;
        let body = mapping::update_body(desired);
        let url = self.connection_url(&desired.target, id);
        let redact = Redactor::credentials(&desired.credentials);
        match self
            .client
            .call("update", Method::PATCH, url, Some(&body), &redact)
            .await
        {
            Ok(body) => mapping::remote(&body),
            Err(Failure::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Err(BackendError::NotFound),
            Err(err) => Err(err.into()),
        }
    }

    async fn delete(&self, id: &str, target: &Target) -> Result<(), BackendError> {
        let url = self.connection_url(target, id);
        match self
            .client
            .call("delete", Method::DELETE, url, None, &Redactor::none())
            .await
        {
            Ok(_)
            | Err(Failure::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Rotation requested on a pair Infisical rotates: its hash then moves without us.
    fn rotates_itself(&self, desired: &Desired) -> bool {
        desired.rotation.is_some()
            && mapping::rotates(&desired.target.app, desired.target.method.as_deref())
    }
}
