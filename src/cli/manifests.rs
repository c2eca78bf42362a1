//! Reads manifests from files: multi-document YAML, directories in a stable order, strict fields,
//! the CRDs' CEL rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::{self, AppConnection, ClusterConnectionBackend, ConnectionBackend};
use crate::reconcile::resolve::SecretData;

/// A whole input that cannot be used: nothing is applied.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{path}: no manifests found (no .yaml, .yml or .json files)")]
    Empty { path: PathBuf },
}

/// One object from the files that was refused; the others still apply.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// `Kind namespace/name` or `file#document`.
    pub object: String,
    pub message: String,
}

/// Everything read from the files.
#[derive(Default)]
pub struct Manifests {
    pub connections: Vec<AppConnection>,
    pub backends: Vec<ConnectionBackend>,
    pub cluster_backends: Vec<ClusterConnectionBackend>,
    /// (namespace, name) -> data.
    pub secrets: BTreeMap<(String, String), SecretData>,
    /// Namespace -> labels, from `Namespace` manifests (for `namespaceSelector`s).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Documents refused as invalid.
    pub rejected: Vec<Rejected>,
    /// Documents of kinds appconn does not handle, reported and skipped.
    pub skipped: Vec<String>,
}

/// Reads a file, or every `.yaml`/`.yml`/`.json` file under a directory in path order.
pub fn load(path: &Path) -> Result<Manifests, InputError> {
    let files = files(path)?;
    if files.is_empty() {
        return Err(InputError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut manifests = Manifests::default();
    let mut any = false;
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| InputError::Read {
            path: file.clone(),
            source,
        })?;
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value: serde_yaml::Value =
                serde::Deserialize::deserialize(document).map_err(|e| InputError::Yaml {
                    path: file.clone(),
                    message: e.to_string(),
                })?;
            if value.is_null() {
                continue;
            }
            any = true;
            let json: Value = serde_json::to_value(&value).map_err(|e| InputError::Yaml {
                path: file.clone(),
                message: e.to_string(),
            })?;
            let label = format!("{}#{}", file.display(), index + 1);
            manifests.add(json, &label);
        }
    }
    if !any {
        return Err(InputError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(manifests)
}

fn files(path: &Path) -> Result<Vec<PathBuf>, InputError> {
    let meta = std::fs::metadata(path).map_err(|source| InputError::Read {
        path: path.into(),
        source,
    })?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| InputError::Read {
            path: path.into(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            out.extend(files(&entry)?);
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(entry);
        }
    }
    Ok(out)
}

impl Manifests {
    fn add(&mut self, mut json: Value, label: &str) {
        let kind = json
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let api_version = json
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let appconn_api = format!("{}/{}", crd::GROUP, crd::VERSION);
        let namespaced = !matches!(kind.as_str(), "ClusterConnectionBackend" | "Namespace");
        if namespaced {
            let meta = json.as_object_mut().and_then(|o| {
                o.entry("metadata")
                    .or_insert_with(|| Value::Object(Default::default()))
                    .as_object_mut()
            });
            if let Some(meta) = meta {
                meta.entry("namespace")
                    .or_insert_with(|| Value::from("default"));
            }
        }
        let object = describe(&kind, &json).unwrap_or_else(|| label.to_string());
        let reject = |message: String| Rejected {
            object: object.clone(),
            message,
        };
        let result = match (api_version.as_str(), kind.as_str()) {
            (v, "AppConnection") if v == appconn_api => {
                checked::<AppConnection>(&kind, &json).map(|c| self.connections.push(c))
            }
            (v, "ConnectionBackend") if v == appconn_api => {
                checked::<ConnectionBackend>(&kind, &json).map(|b| self.backends.push(b))
            }
            (v, "ClusterConnectionBackend") if v == appconn_api => {
                checked::<ClusterConnectionBackend>(&kind, &json)
                    .map(|b| self.cluster_backends.push(b))
            }
            ("v1", "Secret") => secret(&json).map(|(key, data)| {
                self.secrets.insert(key, data);
            }),
            ("v1", "Namespace") => namespace(&json).map(|(name, labels)| {
                self.namespaces.insert(name, labels);
            }),
            ("", _) | (_, "") => {
                Err("not a Kubernetes object: apiVersion and kind are required".into())
            }
            _ => {
                self.skipped.push(format!(
                    "{object} ({api_version}): not handled by appconn, skipped"
                ));
                Ok(())
            }
        };
        if let Err(message) = result {
            self.rejected.push(reject(message));
        }
    }
}

fn describe(kind: &str, json: &Value) -> Option<String> {
    let meta = json.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    Some(match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    })
}

/// Deserializes with unknown fields refused (like `kubectl apply --validate=strict`) and the
/// CRD's CEL rules applied.
fn checked<T: DeserializeOwned>(kind: &str, json: &Value) -> Result<T, String> {
    if json
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("metadata.name is required".into());
    }
    let mut unknown = Vec::new();
    // serde_ignored writes `?` for an Option layer: drop it from the path a person reads.
    let object: T = serde_ignored::deserialize(json, |path| {
        unknown.push(path.to_string().replace(".?", ""))
    })
    .map_err(|e| format!("invalid {kind}: {e}"))?;
    // apiVersion and kind are checked by the caller; status is the operator's to write.
    let unknown: Vec<String> = unknown
        .into_iter()
        .filter(|p| !matches!(p.as_str(), "apiVersion" | "kind") && !p.starts_with("status"))
        .collect();
    if let Some(path) = unknown.first() {
        if path.ends_with("secretKeyRef.namespace") {
            return Err(format!(
                "{path}: Secret references are same-namespace only; remove the namespace and put the Secret next to the {kind}"
            ));
        }
        return Err(format!("unknown field {path}"));
    }
    crd::validate::validate(kind, json, None).map_err(|errors| errors.join("; "))?;
    Ok(object)
}

fn namespace(json: &Value) -> Result<(String, BTreeMap<String, String>), String> {
    let name = json
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("Namespace without metadata.name")?;
    let mut labels = BTreeMap::new();
    if let Some(map) = json.pointer("/metadata/labels").and_then(Value::as_object) {
        for (key, value) in map {
            let value = value
                .as_str()
                .ok_or_else(|| format!("metadata.labels.{key} must be a string"))?;
            labels.insert(key.clone(), value.to_string());
        }
    }
    Ok((name.to_string(), labels))
}

fn secret(json: &Value) -> Result<((String, String), SecretData), String> {
    let name = json
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .ok_or("Secret without metadata.name")?
        .to_string();
    let namespace = json
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let mut data = SecretData::new();
    if let Some(map) = json.get("data").and_then(Value::as_object) {
        for (key, value) in map {
            let encoded = value
                .as_str()
                .ok_or_else(|| format!("data.{key} must be a string"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| format!("data.{key} is not valid base64"))?;
            data.insert(key.clone(), bytes);
        }
    }
    if let Some(map) = json.get("stringData").and_then(Value::as_object) {
        for (key, value) in map {
            let text = value
                .as_str()
                .ok_or_else(|| format!("stringData.{key} must be a string"))?;
            data.insert(key.clone(), text.as_bytes().to_vec());
        }
    }
    Ok(((namespace, name), data))
}
