use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{FieldMap, SecretKeySelector};

/// A connection to declare in a connection backend (Infisical App Connections, Credible Data,
/// Matillion) or in appconn's built-in store, with credentials taken from Kubernetes Secrets.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "appconn.io",
    version = "v1alpha1",
    kind = "AppConnection",
    namespaced,
    status = "AppConnectionStatus",
    shortname = "appconn",
    shortname = "appconns",
    category = "appconn",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"App","type":"string","jsonPath":".spec.app"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".status.backend.name"}"#,
    printcolumn = r#"{"name":"ID","type":"string","jsonPath":".status.id"}"#,
    printcolumn = r#"{"name":"Rotation","type":"string","jsonPath":".status.rotation.status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1}"#,
    cel
)]
#[x_kube(validation = Rule::new(
    "has(self.backendRef) == has(oldSelf.backendRef) && (!has(self.backendRef) || self.backendRef == oldSelf.backendRef)"
).message("spec.backendRef is immutable: delete and recreate the AppConnection to change it"))]
#[x_kube(validation = Rule::new(
    "has(self.method) == has(oldSelf.method) && (!has(self.method) || self.method == oldSelf.method)"
).message("spec.method is immutable: delete and recreate the AppConnection to change it"))]
#[x_kube(validation = Rule::new(
    "has(self.connectionName) == has(oldSelf.connectionName) && (!has(self.connectionName) || self.connectionName == oldSelf.connectionName)"
).message("spec.connectionName is immutable: delete and recreate the AppConnection to change it"))]
#[x_kube(validation = Rule::new(
    "has(self.project) == has(oldSelf.project) && (!has(self.project) || self.project == oldSelf.project)"
).message("spec.project is immutable: delete and recreate the AppConnection to change it"))]
#[serde(rename_all = "camelCase")]
pub struct AppConnectionSpec {
    /// The backend that holds the connection. Omitted: appconn's built-in store. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ref: Option<BackendRef>,

    /// The backend's app or type slug, e.g. `mssql` (Infisical), `postgres` (Credible). For
    /// Matillion, the platform connection type: `dwh`, `component-basic` or
    /// `cloud-platform-credentials`. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.app is immutable: delete and recreate the AppConnection to change it"))]
    #[schemars(length(min = 1, max = 64))]
    pub app: String,

    /// Authentication method, for backends that have one: Infisical's, e.g.
    /// `username-and-password`; Matillion's auth type, `generic-secret` or
    /// `cloud-provider-secret`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub method: Option<String>,

    /// Name of the connection at the backend; defaults to `metadata.name`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub connection_name: Option<String>,

    /// Backend project; defaults to the backend resource's project (for Matillion, a project
    /// UUID). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub project: Option<String>,

    /// Free text shown at the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub description: Option<String>,

    /// Credential fields, each from exactly one source: an inline `value` (which keeps its JSON
    /// type) or a `secretKeyRef` in this namespace. For Matillion, the connection properties:
    /// pointers into your vault such as `secretName` and `secretKey`, never secret values.
    #[serde(default, skip_serializing_if = "FieldMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub credentials: FieldMap<CredentialSource>,

    /// Secrets whose every key becomes a string credential field, optionally prefixed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub credentials_from: Vec<CredentialsFromSource>,

    /// Non-secret backend fields passed through as they are (e.g. Infisical's `gatewayId`;
    /// Matillion's `authProvider` and `secretsLocation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub settings: Option<FieldMap<Value>>,

    /// Credential rotation schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,

    /// What happens to the backend object when this resource is deleted: `Delete` (default)
    /// removes it, `Orphan` leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,

    /// Take over a backend object of the same name that appconn did not create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_existing: Option<bool>,

    /// How often the backend object is checked for drift, e.g. `10m` (default), `1h30m`;
    /// `0` turns drift checks off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0|([0-9]+(ms|s|m|h))+)$"), length(max = 32))]
    pub refresh_interval: Option<String>,

    /// Stop reconciling: nothing is written to the backend until this is false again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Test the connection at the backend after each write (Credible's connection test): a
    /// failed test makes the connection not Ready with reason `ConnectionTestFailed` and the
    /// backend's message, until a change passes it. Backends without a test ignore it
    /// (Infisical checks credentials on every write; the built-in store cannot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_connection: Option<bool>,
}

/// The backend resource an AppConnection uses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// `ConnectionBackend` (same namespace) or `ClusterConnectionBackend`.
    pub kind: BackendKind,
    /// Name of the backend resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kind of a backend resource.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BackendKind {
    /// A namespaced ConnectionBackend in the AppConnection's namespace.
    ConnectionBackend,
    /// A cluster-scoped ClusterConnectionBackend.
    ClusterConnectionBackend,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::ConnectionBackend => "ConnectionBackend",
            BackendKind::ClusterConnectionBackend => "ClusterConnectionBackend",
        }
    }
}

/// One credential field: exactly one of `value` and `secretKeyRef`.
// `value` has no `type` (it keeps its JSON type), so the API server hides it from CEL: "exactly
// one" is a structural `oneOf` of `required` lists, which a real server accepts beside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("oneOf" = [{"required": ["value"]}, {"required": ["secretKeyRef"]}]))]
#[serde(rename_all = "camelCase")]
pub struct CredentialSource {
    /// An inline, non-secret value; keeps its JSON type (string, number, boolean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub value: Option<Value>,
    /// A key of a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
}

/// A Secret whose keys all become credential fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsFromSource {
    /// The Secret, in this namespace.
    pub secret_ref: SecretRef,
    /// Prefix added to every key to form the field name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub prefix: Option<String>,
}

/// A Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Credential rotation schedule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.enabled) || !self.enabled || has(self.intervalDays)").message("rotation.intervalDays is required when rotation is enabled"))]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Rotate the credentials on a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Days between rotations, 1 to 365.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 365").message("rotation.intervalDays must be between 1 and 365"))]
    pub interval_days: Option<i32>,
    /// Time of day (UTC) at which rotation happens; 00:00 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_at_utc: Option<RotateAt>,
}

/// A time of day in UTC.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotateAt {
    /// Hour, 0 to 23.
    #[x_kube(validation = Rule::new("self >= 0 && self <= 23").message("rotateAtUtc.hours must be between 0 and 23"))]
    pub hours: i32,
    /// Minute, 0 to 59; 0 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 59").message("rotateAtUtc.minutes must be between 0 and 59"))]
    pub minutes: Option<i32>,
}

/// What happens to the backend object when the AppConnection is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Remove the backend object, then let the resource go.
    #[default]
    Delete,
    /// Leave the backend object as it is.
    Orphan,
}

/// What the operator last did and saw.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppConnectionStatus {
    /// Identity of the connection at the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Name of the connection at the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_name: Option<String>,
    /// The backend that holds the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendStatusRef>,
    /// `hmac-sha256:<hex>`: the operator's keyed hash of everything it last wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_hash: Option<String>,
    /// The credentials hash as the backend reported it, where it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_credentials_hash: Option<String>,
    /// Bumped on every write that changed content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Last time the backend object was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Rotation state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The backend resource and its provider type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatusRef {
    /// `ConnectionBackend`, `ClusterConnectionBackend`, or `Builtin`.
    pub kind: String,
    /// Name of the backend resource (`builtin` for the built-in store).
    pub name: String,
    /// Provider: `builtin`, `infisical`, `credible` or `matillion`.
    #[serde(rename = "type")]
    pub type_: String,
}

/// Rotation state of a connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// Whether rotation is on.
    pub enabled: bool,
    /// `success`, `failed`, `pending` or `overdue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The last message from the rotation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<String>,
    /// When the credentials last changed by rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    /// When the next rotation is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
}

fn any_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

pub(crate) fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 64,
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl AppConnection {
    /// The name at the backend: `spec.connectionName`, else `metadata.name`.
    pub fn connection_name(&self) -> &str {
        self.spec
            .connection_name
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or_default()
    }

    pub fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy.unwrap_or_default()
    }

    pub fn suspended(&self) -> bool {
        self.spec.suspend.unwrap_or(false)
    }

    /// Whether the connection is tested after each write.
    pub fn tests_connection(&self) -> bool {
        self.spec.test_connection.unwrap_or(false)
    }
}
