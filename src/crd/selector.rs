use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a Secret value is turned into a credential field.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValueFormat {
    /// The Secret bytes as a UTF-8 string (the default).
    #[default]
    String,
    /// The Secret bytes parsed as a JSON number, e.g. `1433`.
    Number,
    /// `true` or `false` (also `1`/`0`, `yes`/`no`, case-insensitive).
    Boolean,
    /// Any JSON document, e.g. a service-account key file.
    Json,
}

/// A key of a Secret in the same namespace as the resource that names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret, in the resource's own namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// How the value is decoded; `string` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ValueFormat>,
}

/// A key of a Secret that holds a backend's authentication material.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendSecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// Namespace of the Secret. Required on a ClusterConnectionBackend; not allowed on a
    /// ConnectionBackend, which reads Secrets from its own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// A backend credential taken from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretValueSource {
    /// The Secret key holding the value.
    pub secret_key_ref: BackendSecretKeySelector,
}
