//! Resolve: from the spec and the referenced Secrets to the credentials object. Pure.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::Reason;
use crate::crd::{AppConnection, ValueFormat};
use crate::secret::Credentials;

/// The data of one Secret, key -> bytes (already base64-decoded).
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// Why the credentials could not be resolved. Messages name Secrets, keys and fields, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("Secret {secret:?} not found in namespace {namespace:?}")]
    SecretNotFound { namespace: String, secret: String },
    #[error("Secret {secret:?} has no key {key:?} (field {field:?})")]
    SecretKeyNotFound {
        secret: String,
        key: String,
        field: String,
    },
    #[error("field {field:?}: {problem}")]
    InvalidCredential { field: String, problem: String },
    #[error("{0}")]
    InvalidSpec(String),
}

impl ResolveError {
    pub fn reason(&self) -> Reason {
        match self {
            ResolveError::SecretNotFound { .. } => Reason::SecretNotFound,
            ResolveError::SecretKeyNotFound { .. } => Reason::SecretKeyNotFound,
            ResolveError::InvalidCredential { .. } => Reason::InvalidCredential,
            ResolveError::InvalidSpec(_) => Reason::InvalidSpec,
        }
    }
}

/// Names of the Secrets (same namespace) an AppConnection reads.
pub fn referenced_secrets(conn: &AppConnection) -> BTreeSet<String> {
    let from_fields = conn
        .spec
        .credentials
        .values()
        .filter_map(|source| source.secret_key_ref.as_ref().map(|r| r.name.clone()));
    let from_whole = conn
        .spec
        .credentials_from
        .iter()
        .map(|f| f.secret_ref.name.clone());
    from_fields.chain(from_whole).collect()
}

/// Builds the credentials object from `credentials` and `credentialsFrom`.
///
/// `secrets` holds the referenced Secrets that exist; a missing entry means the Secret does not.
pub fn resolve(
    conn: &AppConnection,
    secrets: &BTreeMap<String, SecretData>,
) -> Result<Credentials, ResolveError> {
    let namespace = conn.metadata.namespace.clone().unwrap_or_default();
    let lookup = |name: &str| {
        secrets
            .get(name)
            .ok_or_else(|| ResolveError::SecretNotFound {
                namespace: namespace.clone(),
                secret: name.to_string(),
            })
    };

    let mut fields = BTreeMap::new();
    for (field, source) in &conn.spec.credentials {
        let value = match (&source.value, &source.secret_key_ref) {
            (Some(value), None) => value.clone(),
            (None, Some(selector)) => {
                let data = lookup(&selector.name)?;
                let bytes =
                    data.get(&selector.key)
                        .ok_or_else(|| ResolveError::SecretKeyNotFound {
                            secret: selector.name.clone(),
                            key: selector.key.clone(),
                            field: field.clone(),
                        })?;
                decode(field, bytes, selector.format.unwrap_or_default())?
            }
            _ => {
                return Err(ResolveError::InvalidSpec(format!(
                    "credentials.{field} needs exactly one source: value or secretKeyRef"
                )));
            }
        };
        fields.insert(field.clone(), value);
    }

    let mut origin: BTreeMap<String, String> = fields
        .keys()
        .map(|f| (f.clone(), "credentials".to_string()))
        .collect();
    for from in &conn.spec.credentials_from {
        let data = lookup(&from.secret_ref.name)?;
        let prefix = from.prefix.as_deref().unwrap_or_default();
        for (key, bytes) in data {
            let field = format!("{prefix}{key}");
            let here = format!("credentialsFrom Secret {:?}", from.secret_ref.name);
            if let Some(first) = origin.insert(field.clone(), here.clone()) {
                return Err(ResolveError::InvalidSpec(format!(
                    "credential field {field:?} comes from two places: {first} and {here}"
                )));
            }
            fields.insert(field.clone(), decode(&field, bytes, ValueFormat::String)?);
        }
    }
    Ok(Credentials::new(fields))
}

fn decode(field: &str, bytes: &[u8], format: ValueFormat) -> Result<Value, ResolveError> {
    let invalid = |problem: &str| ResolveError::InvalidCredential {
        field: field.to_string(),
        problem: problem.to_string(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("Secret value is not UTF-8 text"))?;
    match format {
        ValueFormat::String => Ok(Value::String(text.to_string())),
        ValueFormat::Number => {
            let trimmed = text.trim();
            match serde_json::from_str::<Value>(trimmed) {
                Ok(n @ Value::Number(_)) => Ok(n),
                _ => Err(invalid("Secret value is not a number (format: number)")),
            }
        }
        ValueFormat::Boolean => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "0" | "no" => Ok(Value::Bool(false)),
            _ => Err(invalid(
                "Secret value is not a boolean: use true/false (format: boolean)",
            )),
        },
        ValueFormat::Json => serde_json::from_str(text)
            .map_err(|_| invalid("Secret value is not valid JSON (format: json)")),
    }
}
