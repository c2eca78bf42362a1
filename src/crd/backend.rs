use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretValueSource;
use super::provider::ONE_PROVIDER_MESSAGE;

// `namespace` is a CEL reserved word: the API server exposes such a property as `__namespace__`.
const ONE_PROVIDER: &str = "[has(self.builtin), has(self.infisical), has(self.credible), has(self.matillion)].filter(x, x).size() == 1";

/// A connection backend that AppConnections in the same namespace can use. Its auth Secrets are
/// read from its own namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "appconn.io",
    version = "v1alpha1",
    kind = "ConnectionBackend",
    namespaced,
    status = "ConnectionBackendStatus",
    shortname = "connbackend",
    category = "appconn",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".status.type"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1}"#,
    cel
)]
#[x_kube(validation = Rule::new(ONE_PROVIDER).message(ONE_PROVIDER_MESSAGE))]
#[x_kube(validation = Rule::new(
    "has(self.infisical) ? !has(self.infisical.auth.universalAuth.clientId.secretKeyRef.__namespace__) && !has(self.infisical.auth.universalAuth.clientSecret.secretKeyRef.__namespace__) : true"
).message("a ConnectionBackend reads Secrets from its own namespace: remove secretKeyRef.namespace"))]
#[x_kube(validation = Rule::new(
    "has(self.credible) && has(self.credible.token) ? !has(self.credible.token.secretKeyRef.__namespace__) : true"
).message("a ConnectionBackend reads Secrets from its own namespace: remove secretKeyRef.namespace"))]
#[x_kube(validation = Rule::new(
    "has(self.matillion) ? !has(self.matillion.auth.clientId.secretKeyRef.__namespace__) && !has(self.matillion.auth.clientSecret.secretKeyRef.__namespace__) : true"
).message("a ConnectionBackend reads Secrets from its own namespace: remove secretKeyRef.namespace"))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionBackendSpec {
    #[serde(flatten)]
    pub provider: BackendProvider,
}

/// A connection backend for the whole cluster. Its secret references name their namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "appconn.io",
    version = "v1alpha1",
    kind = "ClusterConnectionBackend",
    status = "ConnectionBackendStatus",
    shortname = "clusterconnbackend",
    category = "appconn",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".status.type"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1}"#,
    cel
)]
#[x_kube(validation = Rule::new(ONE_PROVIDER).message(ONE_PROVIDER_MESSAGE))]
#[x_kube(validation = Rule::new(
    "has(self.infisical) ? has(self.infisical.auth.universalAuth.clientId.secretKeyRef.__namespace__) && has(self.infisical.auth.universalAuth.clientSecret.secretKeyRef.__namespace__) : true"
).message("a ClusterConnectionBackend's secretKeyRef must name its namespace"))]
#[x_kube(validation = Rule::new(
    "has(self.credible) && has(self.credible.token) ? has(self.credible.token.secretKeyRef.__namespace__) : true"
).message("a ClusterConnectionBackend's secretKeyRef must name its namespace"))]
#[x_kube(validation = Rule::new(
    "has(self.matillion) ? has(self.matillion.auth.clientId.secretKeyRef.__namespace__) && has(self.matillion.auth.clientSecret.secretKeyRef.__namespace__) : true"
).message("a ClusterConnectionBackend's secretKeyRef must name its namespace"))]
#[serde(rename_all = "camelCase")]
pub struct ClusterConnectionBackendSpec {
    #[serde(flatten)]
    pub provider: BackendProvider,
    /// Which namespaces may use this backend; all when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<BackendConditions>,
}

/// The provider blocks: exactly one is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendProvider {
    /// appconn's built-in store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinProvider>,
    /// Infisical App Connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infisical: Option<InfisicalProvider>,
    /// Credible Data connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credible: Option<CredibleProvider>,
    /// Matillion Data Productivity Cloud connections, reached with an API client (OAuth client
    /// credentials). They hold pointers into your vault, never secret values: an
    /// AppConnection's `app` is the platform connection type (`dwh`, `component-basic`,
    /// `cloud-platform-credentials`), `method` the auth type (`generic-secret`,
    /// `cloud-provider-secret`), `credentials` the connection properties (`secretName`,
    /// `secretKey`, ...), and `settings` holds `authProvider` (e.g. `SNOWFLAKE`) and
    /// `secretsLocation` (e.g. `{type: AWS_SECRET_MANAGER, region: eu-west-1}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matillion: Option<MatillionProvider>,
    /// Client-side request rate limit towards the backend. Defaults: Infisical and Credible 10
    /// requests per second, burst 20; Matillion 1 per second, burst 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The built-in store has no settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct BuiltinProvider {}

/// An Infisical instance reached with a machine identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InfisicalProvider {
    /// Base URL, e.g. `https://app.infisical.com`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Default project for AppConnections that do not set `spec.project`; absent means
    /// organisation-level connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub project_id: Option<String>,
    /// How the operator logs in.
    pub auth: InfisicalAuth,
    /// PEM CA bundle to trust instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
}

/// Infisical authentication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InfisicalAuth {
    /// Universal Auth machine identity.
    pub universal_auth: ClientCredentials,
}

/// A client id and secret, each from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCredentials {
    pub client_id: SecretValueSource,
    pub client_secret: SecretValueSource,
}

/// A Credible Data server (its data API is served by Malloy Publisher).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredibleProvider {
    /// API base, e.g. `https://acme.data.credibledata.com/api/v0`, or a Publisher server's
    /// `http://publisher:4000/api/v0`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Project (environment) that holds the connections, for AppConnections that do not set
    /// `spec.project`.
    #[schemars(length(min = 1, max = 256))]
    pub project: String,
    /// Path segment before the project: `projects` (default) or `environments`, the name
    /// newer servers use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self == 'projects' || self == 'environments'").message("credible.pathSegment must be projects or environments"))]
    pub path_segment: Option<String>,
    /// Bearer token (hosted Credible); the open-source Publisher server needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretValueSource>,
}

/// A Matillion Data Productivity Cloud project, reached with an API client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatillionProvider {
    /// API base, e.g. `https://eu1.api.matillion.com/dpc` or `https://us1.api.matillion.com/dpc`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// OAuth token endpoint; `https://id.core.matillion.com/oauth/dpc/token` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub token_url: Option<String>,
    /// Project UUID: the project of AppConnections that set no `spec.project`.
    #[schemars(length(min = 36, max = 36), regex(pattern = UUID_PATTERN))]
    pub project_id: String,
    /// The API client's id and secret.
    pub auth: ClientCredentials,
}

/// A UUID in its 36-character form.
const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// A token bucket: `requestsPerSecond` sustained, `burst` at once. When the backend throttles
/// (429), the rate halves, down to `minRequestsPerSecond`, and climbs back to
/// `requestsPerSecond` while no throttle comes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second, 1 to 10000: the ceiling.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("rateLimit.requestsPerSecond must be between 1 and 10000"))]
    pub requests_per_second: i32,
    /// Requests allowed at once, 1 to 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("rateLimit.burst must be between 1 and 10000"))]
    pub burst: Option<i32>,
    /// The lowest rate throttling slows requests to, e.g. `0.5`; a tenth of
    /// `requestsPerSecond` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.01 && self <= 10000.0").message("rateLimit.minRequestsPerSecond must be between 0.01 and 10000"))]
    pub min_requests_per_second: Option<f64>,
}

/// Which namespaces may use a ClusterConnectionBackend.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendConditions {
    /// Namespaces whose labels match may use the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Result of the backend's auth and health check.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionBackendStatus {
    /// Provider type: `builtin`, `infisical`, `credible` or `matillion`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// When the check last ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<Time>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
