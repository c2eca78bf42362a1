//! Matillion Data Productivity Cloud connections, reached with an OAuth client.
//!
//! The contract is `backends/matillion.md`. Two things shape this backend:
//! - Secret VALUES never travel: a connection holds pointers into the customer's vault, which
//!   appconn takes from `credentials` and hashes like any credentials. So a drift check can
//!   compare what it reads back with what it would write, exactly.
//! - Connections are addressed by NAME in a project; there is no get-one route and PUT is a
//!   full replacement. `status.id` is Matillion's id from the create answer: every read goes
//!   through the list route by name and checks it, so a same-name connection with another id
//!   is someone else's, never updated or deleted in our name (the drift check treats ours as
//!   gone, and the create that follows finds the name taken: `AlreadyExists` unless
//!   `adoptExisting`).
//!
//! `auth` is the token grant, `mapping` the pure spec → body and answer → [`Remote`]
//! translation.

mod auth;
mod mapping;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use self::auth::ClientCredentials;
use super::client::{Body, Client, ClientConfig, Redactor, Reply};
use super::http::{self, Timeouts};
use super::{Backend, BackendError, Desired, Remote, Target, ratelimit};
use crate::crd::{MatillionProvider, ProviderType, RateLimit};
use crate::metrics::Metrics;
use crate::secret::SecretString;

/// Matillion's token endpoint, used when the backend resource names none.
pub const DEFAULT_TOKEN_URL: &str = "https://id.core.matillion.com/oauth/dpc/token";
/// Requests per second when the backend resource sets no `rateLimit`: Matillion's lowest
/// documented limit is 60 a minute.
pub const DEFAULT_RPS: u32 = 1;
/// Burst when the backend resource sets no `rateLimit`.
pub const DEFAULT_BURST: u32 = 5;
/// First pause after a refused token request (doubling on each further refusal).
pub const DEFAULT_GRANT_COOLDOWN: Duration = Duration::from_secs(30);
/// Connections asked for per page of the list route; the server may cut it.
const PAGE_SIZE: &str = "100";
/// Pages read at most for one name: a server whose pages never end must not hold a reconcile.
const MAX_PAGES: u64 = 500;

/// Everything a [`MatillionBackend`] needs, resolved from the backend resource and its Secrets.
#[derive(Clone, Debug)]
pub struct MatillionConfig {
    /// API base, e.g. `https://eu1.api.matillion.com/dpc`.
    pub url: String,
    /// OAuth token endpoint; [`DEFAULT_TOKEN_URL`] when none.
    pub token_url: Option<String>,
    /// Project (UUID) of connections whose target names none.
    pub project_id: String,
    pub client_id: SecretString,
    pub client_secret: SecretString,
    /// 1 request per second, burst 5 when none.
    pub rate_limit: Option<RateLimit>,
    pub timeouts: Timeouts,
    /// First pause after a refused token request.
    pub grant_cooldown: Duration,
}

impl MatillionConfig {
    /// A config with the defaults: Matillion's token endpoint, default rate limit and timeouts.
    pub fn new(
        url: impl Into<String>,
        project_id: impl Into<String>,
        client_id: SecretString,
        client_secret: SecretString,
    ) -> Self {
        Self {
            url: url.into(),
            token_url: None,
            project_id: project_id.into(),
            client_id,
            client_secret,
            rate_limit: None,
            timeouts: Timeouts::default(),
            grant_cooldown: DEFAULT_GRANT_COOLDOWN,
        }
    }

    /// The config of a `matillion` provider block, with the credentials read from its Secrets.
    pub fn from_provider(
        provider: &MatillionProvider,
        rate_limit: Option<RateLimit>,
        client_id: SecretString,
        client_secret: SecretString,
    ) -> Self {
        Self {
            token_url: provider.token_url.clone(),
            rate_limit,
            ..Self::new(
                provider.url.clone(),
                provider.project_id.clone(),
                client_id,
                client_secret,
            )
        }
    }
}

/// Matillion DPC connections as a [`Backend`].
pub struct MatillionBackend {
    client: Client,
    project_id: String,
}

impl MatillionBackend {
    /// Builds the client; no request is made until the first operation.
    pub fn new(config: MatillionConfig, metrics: Arc<Metrics>) -> Result<Self, BackendError> {
        let (base, token_url) = urls(&config.url, config.token_url.as_deref())?;
        mapping::check_project("matillion.projectId", &config.project_id)?;
        let (rps, burst) = ratelimit::rate(config.rate_limit, (DEFAULT_RPS, DEFAULT_BURST));
        let client = Client::new(
            ProviderType::Matillion,
            &ClientConfig {
                base,
                ca_bundle: None,
                rps,
                burst,
                floor: Some(ratelimit::floor(config.rate_limit, rps)),
                timeouts: config.timeouts,
                grant_cooldown: config.grant_cooldown,
            },
            Some(Box::new(ClientCredentials {
                token_url,
                client_id: config.client_id,
                client_secret: config.client_secret,
            })),
            metrics,
        )?;
        Ok(Self {
            client,
            project_id: config.project_id,
        })
    }

    /// The rules of a `matillion` block that need no Secret: the URLs and the project UUID.
    pub fn check_spec(provider: &MatillionProvider) -> Result<(), BackendError> {
        urls(&provider.url, provider.token_url.as_deref())?;
        mapping::check_project("matillion.projectId", &provider.project_id)
    }

    /// The target's project, else the backend's; a UUID either way.
    fn project<'a>(&'a self, target: &'a Target) -> Result<&'a str, BackendError> {
        match target.project.as_deref() {
            Some(project) => {
                mapping::check_project("spec.project", project)?;
                Ok(project)
            }
            None => Ok(&self.project_id),
        }
    }

    fn connections_url(&self, project: &str, query: &[(&str, &str)]) -> Url {
        self.client
            .url(&["v1", "projects", project, "connections"], query)
    }

    /// The failure an answer no operation claimed stands for, its message redacted. A 404 on
    /// the project's routes means the project itself is not there for this client.
    fn error(&self, reply: &Reply, project: &str, redact: &Redactor<'_>) -> BackendError {
        let message = self
            .client
            .redact(redact, reply.message(mapping::problem_message));
        if reply.status == StatusCode::NOT_FOUND {
            return BackendError::Rejected {
                message: format!(
                    "Matillion has no project {project} that this API client can see: {message}"
                ),
            };
        }
        self.client.error(reply, message)
    }

    /// The connection named `name` in `project`, through the list route: the name filter, then
    /// page after page until the name itself shows up or the pages end, so a server that
    /// matches names loosely (or not at all) still finds exactly this one. A name with a comma
    /// goes unfiltered: the filter takes a comma-separated list.
    async fn read(
        &self,
        op: &'static str,
        project: &str,
        name: &str,
    ) -> Result<Option<Value>, BackendError> {
        for index in 0..MAX_PAGES {
            let page = index.to_string();
            let mut query = vec![("page", page.as_str()), ("size", PAGE_SIZE)];
            if !name.contains(',') {
                query.insert(0, ("connectionNames", name));
            }
            let url = self.connections_url(project, &query);
            let reply = self.client.call(op, Method::GET, url, None).await?;
            if !reply.status.is_success() {
                return Err(self.error(&reply, project, &Redactor::none()));
            }
            let page = mapping::page(&reply.json("Matillion", op)?, index)?;
            let more = page.more;
            if let Some(found) = page
                .results
                .into_iter()
                .find(|c| mapping::name_of(c) == Some(name))
            {
                return Ok(Some(found));
            }
            if !more {
                return Ok(None);
            }
        }
        Err(BackendError::Unavailable {
            message: format!("Matillion listed more than {MAX_PAGES} pages of connections"),
            retry_after: None,
        })
    }

    /// The connection named by `target` if it is the one with `id`. Another connection of the
    /// same name is someone else's: None, as if ours were gone.
    async fn ours(
        &self,
        op: &'static str,
        id: &str,
        target: &Target,
    ) -> Result<Option<Value>, BackendError> {
        let name = mapping::connection_name(target)?;
        let found = self.read(op, self.project(target)?, name).await?;
        Ok(found.filter(|connection| {
            let same = mapping::id_of(connection) == Some(id);
            if !same {
                tracing::info!(
                    op,
                    "a Matillion connection of this name has another id: not the one appconn recorded"
                );
            }
            same
        }))
    }
}

/// The API base and the token endpoint, both http(s).
fn urls(url: &str, token_url: Option<&str>) -> Result<(Url, Url), BackendError> {
    let base = http::base_url("matillion.url", url)?;
    let token = http::base_url("matillion.tokenUrl", token_url.unwrap_or(DEFAULT_TOKEN_URL))?;
    Ok((base, token))
}

#[async_trait]
impl Backend for MatillionBackend {
    fn provider(&self) -> ProviderType {
        ProviderType::Matillion
    }

    fn validate(&self, desired: &Desired) -> Result<(), BackendError> {
        mapping::validate(desired)
    }

    /// A token (a real grant, or the cached one) and a read of the project's connections.
    async fn check(&self) -> Result<(), BackendError> {
        self.client.bearer().await?;
        let url = self.connections_url(&self.project_id, &[("page", "0"), ("size", "1")]);
        let reply = self.client.call("check", Method::GET, url, None).await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(self.error(&reply, &self.project_id, &Redactor::none()))
        }
    }

    async fn get(&self, id: &str, target: &Target) -> Result<Option<Remote>, BackendError> {
        self.ours("get", id, target)
            .await?
            .map(|connection| mapping::remote(&connection, None))
            .transpose()
    }

    async fn find(&self, target: &Target) -> Result<Option<Remote>, BackendError> {
        let name = mapping::connection_name(target)?;
        self.read("find", self.project(target)?, name)
            .await?
            .map(|connection| mapping::remote(&connection, None))
            .transpose()
    }

    async fn create(&self, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        let target = &desired.target;
        let project = self.project(target)?;
        let name = mapping::connection_name(target)?;
        let body = mapping::body(desired)?;
        let url = self.connections_url(project, &[]);
        let reply = self
            .client
            .call("create", Method::POST, url, Some(Body::Json(&body)))
            .await?;
        let taken = || BackendError::AlreadyExists {
            name: name.to_owned(),
        };
        match reply.status {
            status if status.is_success() => {
                mapping::remote(&reply.json("Matillion", "create")?, None)
            }
            StatusCode::CONFLICT => Err(taken()),
            StatusCode::BAD_REQUEST
                if reply
                    .json_body()
                    .is_some_and(|b| mapping::names_duplicate(&b, name)) =>
            {
                Err(taken())
            }
            _ => Err(self.error(
                &reply,
                project,
                &Redactor::credentials(&desired.credentials),
            )),
        }
    }

    /// A full replacement by name, once a read showed that the name is still the connection
    /// with `id`: PUT cannot say which connection it means.
    async fn update(&self, id: &str, desired: &Desired) -> Result<Remote, BackendError> {
        mapping::validate(desired)?;
        let target = &desired.target;
        if self.ours("update", id, target).await?.is_none() {
            return Err(BackendError::NotFound);
        }
        let project = self.project(target)?;
        let name = mapping::connection_name(target)?;
        let body = mapping::body(desired)?;
        let url = self.connections_url(project, &[("connectionName", name)]);
        let reply = self
            .client
            .call("update", Method::PUT, url, Some(Body::Json(&body)))
            .await?;
        match reply.status {
            status if status.is_success() => {
                mapping::remote(&reply.json("Matillion", "update")?, Some(id))
            }
            StatusCode::NOT_FOUND => Err(BackendError::NotFound),
            _ => Err(self.error(
                &reply,
                project,
                &Redactor::credentials(&desired.credentials),
            )),
        }
    }

    /// Deletes by name, once a read showed that the name is still the connection with `id`:
    /// someone else's connection of the same name is left alone.
    async fn delete(&self, id: &str, target: &Target) -> Result<(), BackendError> {
        if self.ours("delete", id, target).await?.is_none() {
            return Ok(());
        }
        let project = self.project(target)?;
        let name = mapping::connection_name(target)?;
        let url = self.connections_url(project, &[("connectionName", name)]);
        let reply = self
            .client
            .call("delete", Method::DELETE, url, None)
            .await?;
        match reply.status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error(&reply, project, &Redactor::none())),
        }
    }

    /// Field by field: nothing secret travels, so nothing is hidden from the comparison.
    fn content_differs(&self, desired: &Desired, remote: &Remote) -> Option<bool> {
        mapping::differs(desired, remote)
    }
}
