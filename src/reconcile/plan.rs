//! Plan: what to send, its keyed hash, and what to do about it. Pure.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde_json::{Value, json};

use super::Reason;
use crate::backend::{Desired, RotationSchedule, Target};
use crate::crd::{AppConnection, CREATE_PENDING, ProviderType};
use crate::keys::HashKey;
use crate::secret::Credentials;

/// The backend an AppConnection resolved to, as shown in `status.backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// `ConnectionBackend`, `ClusterConnectionBackend` or `Builtin`.
    pub kind: String,
    pub name: String,
    pub provider: ProviderType,
    /// Project used when the AppConnection sets none.
    pub default_project: Option<String>,
}

impl BackendInfo {
    /// The built-in store used when an AppConnection has no `backendRef`.
    pub fn builtin() -> Self {
        Self {
            kind: "Builtin".into(),
            name: "builtin".into(),
            provider: ProviderType::Builtin,
            default_project: None,
        }
    }
}

/// What the backend should be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// No backend object is recorded. `find_first`: a create may already have happened (the
    /// resource is marked create-pending), so look the name up before creating.
    Create { find_first: bool },
    /// Content changed since the last write.
    Update { id: String },
    /// Nothing changed here; read the backend object to catch drift.
    Verify { id: String },
    /// Nothing to do: no backend call.
    Noop { id: String },
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Update { .. } => "update",
            Action::Verify { .. } => "verify",
            Action::Noop { .. } => "noop",
        }
    }
}

/// A spec that is valid YAML but cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

impl PlanError {
    pub fn reason(&self) -> Reason {
        Reason::InvalidSpec
    }
}

/// The identity of the backend object, without credentials (enough to delete it).
pub fn target(conn: &AppConnection, backend: &BackendInfo) -> Target {
    Target {
        namespace: conn.metadata.namespace.clone().unwrap_or_default(),
        resource_name: conn.metadata.name.clone().unwrap_or_default(),
        connection_name: conn.connection_name().to_string(),
        app: conn.spec.app.clone(),
        method: conn.spec.method.clone(),
        project: conn
            .spec
            .project
            .clone()
            .or_else(|| backend.default_project.clone()),
    }
}

/// The rotation schedule the spec asks for, if rotation is on.
pub fn rotation_schedule(conn: &AppConnection) -> Result<Option<RotationSchedule>, PlanError> {
    let Some(rotation) = &conn.spec.rotation else {
        return Ok(None);
    };
    if !rotation.enabled.unwrap_or(false) {
        return Ok(None);
    }
    let days = rotation.interval_days.ok_or_else(|| {
        PlanError("rotation.intervalDays is required when rotation is enabled".into())
    })?;
    if !(1..=365).contains(&days) {
        return Err(PlanError(format!(
            "rotation.intervalDays must be between 1 and 365, got {days}"
        )));
    }
    let (hours, minutes) = rotation
        .rotate_at_utc
        .map(|at| (at.hours, at.minutes.unwrap_or(0)))
        .unwrap_or((0, 0));
    if !(0..=23).contains(&hours) || !(0..=59).contains(&minutes) {
        return Err(PlanError(format!(
            "rotation.rotateAtUtc must be a time of day, got {hours}:{minutes}"
        )));
    }
    Ok(Some(RotationSchedule {
        interval_days: days as u16,
        hours: hours as u8,
        minutes: minutes as u8,
    }))
}

/// Builds what will be sent and its hash.
pub fn desired(
    conn: &AppConnection,
    backend: &BackendInfo,
    credentials: Credentials,
    key: &HashKey,
) -> Result<Desired, PlanError> {
    let target = target(conn, backend);
    let rotation = rotation_schedule(conn)?;
    let settings: BTreeMap<String, Value> = conn
        .spec
        .settings
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(field) = settings
        .keys()
        .find(|k| credentials.expose().contains_key(*k))
    {
        return Err(PlanError(format!(
            "field {field:?} is both a credential and a setting: keep it in one place"
        )));
    }
    let mut content = json!({
        "app": target.app,
        "method": target.method,
        "connectionName": target.connection_name,
        "project": target.project,
        "description": conn.spec.description,
        "credentials": credentials.expose(),
        "settings": settings,
        "rotation": rotation.map(|r| json!({
            "intervalDays": r.interval_days, "hours": r.hours, "minutes": r.minutes
        })),
    });
    // A test asked for is part of what a write does, so turning it on writes (and tests)
    // once. Only then: the hash of an untested connection is what it always was.
    if conn.tests_connection() {
        content["testConnection"] = true.into();
    }
    let credentials_hash = key.hash(canonical_json(&content).as_bytes());
    Ok(Desired {
        target,
        description: conn.spec.description.clone(),
        credentials,
        settings,
        rotation,
        credentials_hash,
    })
}

/// Decides the action from the desired state and what the status recorded. A rotation that
/// has come due is checked like a drift check is.
pub fn decide(conn: &AppConnection, desired: &Desired, verify_due: bool, now: Timestamp) -> Action {
    let status = conn.status.as_ref();
    let Some(id) = status.and_then(|s| s.id.clone()) else {
        return Action::Create {
            find_first: awaits_adoption(conn),
        };
    };
    let recorded = status.and_then(|s| s.credentials_hash.as_deref());
    if recorded != Some(desired.credentials_hash.as_str()) {
        Action::Update { id }
    } else if verify_due || rotation_due(conn, now) {
        Action::Verify { id }
    } else {
        Action::Noop { id }
    }
}

/// Marked create-pending but without a recorded id: a create may have happened that the status
/// does not show yet.
pub fn awaits_adoption(conn: &AppConnection) -> bool {
    let marked = conn
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CREATE_PENDING));
    marked && conn.status.as_ref().and_then(|s| s.id.as_ref()).is_none()
}

/// Whether the recorded next rotation time has passed.
pub fn rotation_due(conn: &AppConnection, now: Timestamp) -> bool {
    conn.status
        .as_ref()
        .and_then(|s| s.rotation.as_ref())
        .and_then(|r| r.next_rotation_at.as_ref())
        .is_some_and(|at| at.0 <= now)
}

/// JSON with object keys sorted at every level and no insignificant white space, so equal
/// content always hashes equal.
pub fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let ordered: BTreeMap<&String, &Value> = map.iter().collect();
                out.push('{');
                for (i, (k, v)) in ordered.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}
