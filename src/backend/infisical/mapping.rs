//! Pure translation between appconn's [`Desired`] / [`Remote`] and Infisical's JSON: request
//! bodies, response objects, error messages and the `/options` catalogue. No I/O here.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::backend::{BackendError, Desired, Remote, RemoteRotation, RotationSchedule, Target};

/// App/method pairs whose credentials Infisical rotates itself; any other pair with
/// `isAutoRotationEnabled: true` is refused by the server.
pub const ROTATING: [(&str, &str); 3] = [
    ("azure-key-vault", "client-secret"),
    ("azure-client-secrets", "client-secret"),
    ("ldap", "simple-bind"),
];

/// Infisical's rule for connection names, as shown to users.
pub const NAME_RULE: &str =
    "Infisical connection names must be 1-64 characters: lowercase letters, digits and hyphens";

/// Top-level body fields appconn fills from the spec, with the spec field to use instead:
/// `settings` may not set them.
const RESERVED: [(&str, &str); 8] = [
    ("name", "spec.connectionName"),
    ("description", "spec.description"),
    ("app", "spec.app"),
    ("method", "spec.method"),
    ("credentials", "spec.credentials"),
    ("projectId", "spec.project"),
    ("isAutoRotationEnabled", "spec.rotation"),
    ("rotation", "spec.rotation"),
];

/// The connection name as Infisical stores it (trimmed), or `InvalidSpec` saying the rule.
pub fn connection_name(target: &Target) -> Result<&str, BackendError> {
    let name = target.connection_name.trim();
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(name)
    } else {
        Err(BackendError::InvalidSpec {
            message: format!("{NAME_RULE}; got {:?}", target.connection_name),
        })
    }
}

/// The auth method, which Infisical requires for every app.
pub fn method(target: &Target) -> Result<&str, BackendError> {
    match target.method.as_deref().map(str::trim) {
        Some(method) if !method.is_empty() => Ok(method),
        _ => Err(BackendError::InvalidSpec {
            message: format!(
                "Infisical needs spec.method for app {:?} (e.g. username-and-password)",
                target.app
            ),
        }),
    }
}

/// The checks that need no server: name rules, method present, no `settings` field that
/// appconn sets itself.
pub fn validate(desired: &Desired) -> Result<(), BackendError> {
    connection_name(&desired.target)?;
    method(&desired.target)?;
    if let Some((field, instead)) = RESERVED
        .iter()
        .find(|(f, _)| desired.settings.contains_key(*f))
    {
        return Err(BackendError::InvalidSpec {
            message: format!("settings.{field} cannot be set: appconn sends it from {instead}"),
        });
    }
    Ok(())
}

/// Whether Infisical rotates this app/method pair's credentials itself.
pub fn rotates(app: &str, method: Option<&str>) -> bool {
    method.is_some_and(|method| ROTATING.contains(&(app, method)))
}

/// `POST /api/v1/app-connections/{app}`: name, description, method, credentials, projectId,
/// rotation, and each `settings` field at the top level.
pub fn create_body(desired: &Desired, project: Option<&str>) -> Result<Value, BackendError> {
    let mut body = settings(desired);
    body.insert("name".into(), connection_name(&desired.target)?.into());
    if let Some(description) = &desired.description {
        body.insert("description".into(), description.clone().into());
    }
    body.insert("method".into(), method(&desired.target)?.into());
    body.insert("credentials".into(), credentials(desired));
    if let Some(project) = project {
        body.insert("projectId".into(), project.into());
    }
    if let Some(schedule) = desired.rotation {
        body.insert("isAutoRotationEnabled".into(), true.into());
        body.insert("rotation".into(), rotation(schedule));
    }
    Ok(Value::Object(body))
}

/// `PATCH /api/v1/app-connections/{app}/{id}`: the FULL credentials object, description (null
/// clears it), rotation on or off, and the settings. Never method, app or projectId: Infisical
/// cannot change those.
pub fn update_body(desired: &Desired) -> Value {
    let mut body = settings(desired);
    body.insert("description".into(), desired.description.clone().into());
    body.insert("credentials".into(), credentials(desired));
    body.insert(
        "isAutoRotationEnabled".into(),
        desired.rotation.is_some().into(),
    );
    if let Some(schedule) = desired.rotation {
        body.insert("rotation".into(), rotation(schedule));
    }
    Value::Object(body)
}

/// Settings a PATCH can unset (with null). A PATCH merges, so a setting dropped from the spec
/// stays set at Infisical unless it is sent as null; `isPlatformManagedCredentials` only ever
/// moves to true and is not among them.
const CLEARABLE: [&str; 1] = ["gatewayId"];

/// Whether a clearable setting is absent from the spec: then the current object says whether
/// it must be unset.
pub fn may_clear(desired: &Desired) -> bool {
    CLEARABLE.iter().any(|k| !desired.settings.contains_key(*k))
}

/// Adds a null for each clearable setting the spec dropped that `current` (the connection as
/// Infisical returns it) still has.
pub fn clear_dropped(body: &mut Value, desired: &Desired, current: &Value) {
    let connection = current.get("appConnection").unwrap_or(&Value::Null);
    for key in CLEARABLE {
        let set = connection.get(key).is_some_and(|v| !v.is_null());
        if set && !desired.settings.contains_key(key) {
            body[key] = Value::Null;
        }
    }
}

fn settings(desired: &Desired) -> Map<String, Value> {
    desired
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn credentials(desired: &Desired) -> Value {
    Value::Object(
        desired
            .credentials
            .expose()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

fn rotation(schedule: RotationSchedule) -> Value {
    json!({
        "rotationInterval": schedule.interval_days,
        "rotateAtUtc": {"hours": schedule.hours, "minutes": schedule.minutes},
    })
}

/// `{"appConnection": {...}}` → [`Remote`]. Rotation is reported only when auto-rotation is on.
pub fn remote(body: &Value) -> Result<Remote, BackendError> {
    let unexpected = |what: &str| BackendError::Unavailable {
        message: format!("unexpected answer from Infisical: {what}"),
        retry_after: None,
    };
    let connection = body
        .get("appConnection")
        .ok_or_else(|| unexpected("no appConnection"))?;
    let text =
        |value: &Value, field: &str| value.get(field).and_then(Value::as_str).map(str::to_owned);
    let id = text(connection, "id").ok_or_else(|| unexpected("the connection has no id"))?;
    let connection_name =
        text(connection, "name").ok_or_else(|| unexpected("the connection has no name"))?;
    let rotation =
        (connection.get("isAutoRotationEnabled") == Some(&Value::Bool(true))).then(|| {
            let rotation = connection.get("rotation").unwrap_or(&Value::Null);
            RemoteRotation {
                status: text(rotation, "rotationStatus"),
                last_message: text(rotation, "lastRotationMessage"),
                last_rotation_time: None,
                next_rotation_at: text(rotation, "nextRotationAt")
                    .and_then(|t| t.parse::<Timestamp>().ok()),
            }
        });
    Ok(Remote {
        id,
        connection_name,
        credentials_hash: text(connection, "credentialsHash"),
        rotation,
        content: None,
    })
}

/// The readable message of an error body: a 400's `message` as it is, a 422's array of issues
/// joined as `path: message; ...`.
pub fn error_message(body: &Value) -> Option<String> {
    match body.get("message")? {
        Value::String(message) => Some(message.clone()),
        Value::Array(issues) => {
            let issues: Vec<String> = issues.iter().map(issue).collect();
            (!issues.is_empty()).then(|| issues.join("; "))
        }
        _ => None,
    }
}

/// One zod issue: `{"path": ["credentials", "port"], "message": "Expected number, ..."}`.
fn issue(issue: &Value) -> String {
    let message = match issue.get("message") {
        Some(Value::String(message)) => message.clone(),
        _ => "invalid value".to_string(),
    };
    let path: Vec<String> = issue
        .get("path")
        .and_then(Value::as_array)
        .map(|path| {
            path.iter()
                .map(|part| match part {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    if path.is_empty() {
        message
    } else {
        format!("{}: {message}", path.join("."))
    }
}

/// `GET /api/v1/app-connections/options` → app → its methods.
pub fn options(body: &Value) -> BTreeMap<String, Vec<String>> {
    body.get("appConnectionOptions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|option| {
            let app = option.get("app")?.as_str()?.to_owned();
            let methods = option
                .get("methods")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect();
            Some((app, methods))
        })
        .collect()
}

/// `InvalidSpec` listing the valid apps, or the app's valid methods, when the pair is unknown.
pub fn check_app_method(
    options: &BTreeMap<String, Vec<String>>,
    app: &str,
    method: &str,
) -> Result<(), BackendError> {
    let Some(methods) = options.get(app) else {
        let apps: Vec<&str> = options.keys().map(String::as_str).collect();
        return Err(BackendError::InvalidSpec {
            message: format!(
                "Infisical has no app {app:?}; valid apps: {}",
                apps.join(", ")
            ),
        });
    };
    if methods.iter().any(|m| m == method) {
        Ok(())
    } else {
        Err(BackendError::InvalidSpec {
            message: format!(
                "Infisical app {app:?} has no method {method:?}; valid methods: {}",
                methods.join(", ")
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Credentials;

    /// Builds a [`Desired`] from a fixture's `desired` object.
    fn desired(fixture: &Value) -> Desired {
        let d = &fixture["desired"];
        let t = &d["target"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let object = |v: &Value| -> BTreeMap<String, Value> {
            v.as_object()
                .map(|m| m.clone().into_iter().collect())
                .unwrap_or_default()
        };
        Desired {
            target: Target {
                namespace: text(&t["namespace"]).unwrap(),
                resource_name: text(&t["resourceName"]).unwrap(),
                connection_name: text(&t["connectionName"]).unwrap(),
                app: text(&t["app"]).unwrap(),
                method: text(&t["method"]),
                project: text(&t["project"]),
            },
            description: text(&d["description"]),
            credentials: Credentials::new(object(&d["credentials"])),
            settings: object(&d["settings"]),
            rotation: d["rotation"].as_object().map(|r| RotationSchedule {
                interval_days: r["intervalDays"].as_u64().unwrap() as u16,
                hours: r["hours"].as_u64().unwrap() as u8,
                minutes: r["minutes"].as_u64().unwrap() as u8,
            }),
            credentials_hash: "hmac-sha256:00".into(),
        }
    }

    fn fixture(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    const QUICKSTART: [(&str, &str); 3] = [
        ("databricks", include_str!("fixtures/databricks.json")),
        ("mssql", include_str!("fixtures/mssql.json")),
        (
            "azure-key-vault",
            include_str!("fixtures/azure-key-vault.json"),
        ),
    ];

    #[test]
    fn quickstart_bodies_match_the_fixtures() {
        for (app, text) in QUICKSTART {
            let fixture = fixture(text);
            let desired = desired(&fixture);
            validate(&desired).unwrap();
            let project = fixture["project"].as_str();
            assert_eq!(
                create_body(&desired, project).unwrap(),
                fixture["createBody"],
                "{app}"
            );
            assert_eq!(update_body(&desired), fixture["updateBody"], "{app}");
        }
    }

    #[test]
    fn quickstart_responses_map_to_remote() {
        for (app, text) in QUICKSTART {
            let fixture = fixture(text);
            let remote = remote(&fixture["response"]).unwrap();
            let expected = &fixture["remote"];
            assert_eq!(remote.id, expected["id"], "{app}");
            assert_eq!(remote.connection_name, expected["connectionName"], "{app}");
            assert_eq!(
                remote.credentials_hash.as_deref(),
                expected["credentialsHash"].as_str()
            );
            match (&remote.rotation, expected["rotation"].as_object()) {
                (None, None) => {}
                (Some(rotation), Some(want)) => {
                    assert_eq!(rotation.status.as_deref(), want["status"].as_str(), "{app}");
                    assert_eq!(
                        rotation.last_message.as_deref(),
                        want["lastMessage"].as_str()
                    );
                    assert_eq!(
                        rotation.next_rotation_at.map(|t| t.to_string()).as_deref(),
                        want["nextRotationAt"].as_str(),
                        "{app}"
                    );
                }
                (got, want) => panic!("{app}: rotation {got:?}, fixture {want:?}"),
            }
            let desired = desired(&fixture);
            assert_eq!(
                rotates(&desired.target.app, desired.target.method.as_deref())
                    && desired.rotation.is_some(),
                expected["rotatesItself"] == true,
                "{app}"
            );
        }
    }

    #[test]
    fn settings_go_to_the_top_level_and_cannot_shadow_fields() {
        let mut desired = desired(&fixture(QUICKSTART[1].1));
        desired.settings.insert("gatewayId".into(), Value::Null);
        desired
            .settings
            .insert("isPlatformManagedCredentials".into(), true.into());
        let body = create_body(&desired, None).unwrap();
        assert_eq!(body["gatewayId"], Value::Null);
        assert_eq!(body["isPlatformManagedCredentials"], true);
        assert!(
            body.get("projectId").is_none(),
            "no project: an org-level connection"
        );
        let body = update_body(&desired);
        assert_eq!(body["isPlatformManagedCredentials"], true);
        for field in ["method", "app", "projectId", "name"] {
            assert!(body.get(field).is_none(), "PATCH must not send {field}");
        }

        desired.settings.insert("credentials".into(), json!({}));
        let err = validate(&desired).unwrap_err();
        assert_eq!(
            err.to_string(),
            "settings.credentials cannot be set: appconn sends it from spec.credentials"
        );
    }

    #[test]
    fn a_dropped_gateway_is_cleared_only_where_it_is_set() {
        let mut desired = desired(&fixture(QUICKSTART[1].1));
        assert!(may_clear(&desired));
        let set = json!({"appConnection": {"id": "x", "gatewayId": "g-1"}});
        let unset = json!({"appConnection": {"id": "x", "gatewayId": null}});
        let mut body = update_body(&desired);
        clear_dropped(&mut body, &desired, &unset);
        assert!(body.get("gatewayId").is_none(), "nothing to clear: {body}");
        clear_dropped(&mut body, &desired, &set);
        assert_eq!(body["gatewayId"], Value::Null);
        desired.settings.insert("gatewayId".into(), "g-2".into());
        assert!(!may_clear(&desired));
        let mut body = update_body(&desired);
        clear_dropped(&mut body, &desired, &set);
        assert_eq!(
            body["gatewayId"], "g-2",
            "a declared gateway is sent as declared"
        );
    }

    #[test]
    fn names_follow_the_slug_rule() {
        let mut desired = desired(&fixture(QUICKSTART[0].1));
        for good in [
            "a",
            "warehouse-prod",
            "db-01",
            &"x".repeat(64),
            "  padded  ",
        ] {
            desired.target.connection_name = good.into();
            assert!(validate(&desired).is_ok(), "{good:?}");
        }
        desired.target.connection_name = "  padded  ".into();
        assert_eq!(create_body(&desired, None).unwrap()["name"], "padded");
        for bad in [
            "",
            "   ",
            "Warehouse",
            "ware_house",
            "ware.house",
            "wäre",
            &"x".repeat(65),
        ] {
            desired.target.connection_name = bad.into();
            let err = validate(&desired).unwrap_err();
            assert!(matches!(err, BackendError::InvalidSpec { .. }), "{bad:?}");
            assert!(err.to_string().starts_with(NAME_RULE), "{err}");
        }
    }

    #[test]
    fn method_is_required() {
        let mut desired = desired(&fixture(QUICKSTART[0].1));
        for missing in [None, Some(""), Some("  ")] {
            desired.target.method = missing.map(str::to_owned);
            let err = validate(&desired).unwrap_err();
            assert!(err.to_string().contains("needs spec.method"), "{err}");
        }
    }

    #[test]
    fn error_messages_are_readable() {
        for case in fixture(include_str!("fixtures/errors.json"))
            .as_array()
            .unwrap()
        {
            assert_eq!(
                error_message(&case["body"]).as_deref(),
                case["message"].as_str(),
                "{case}"
            );
        }
    }

    #[test]
    fn unknown_apps_and_methods_list_the_valid_ones() {
        let options = options(&fixture(include_str!("fixtures/options.json")));
        assert_eq!(options["mssql"], ["username-and-password"]);
        assert!(check_app_method(&options, "azure-key-vault", "client-secret").is_ok());
        let err = check_app_method(&options, "snowflake", "password").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Infisical has no app \"snowflake\"; valid apps: azure-key-vault, databricks, mssql"
        );
        let err = check_app_method(&options, "azure-key-vault", "password").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Infisical app \"azure-key-vault\" has no method \"password\"; valid methods: oauth, \
             client-secret, certificate"
        );
        assert!(matches!(err, BackendError::InvalidSpec { .. }));
    }

    #[test]
    fn unusable_answers_are_not_remotes() {
        for body in [
            json!({}),
            json!({"appConnection": {"name": "x"}}),
            json!("<html>"),
        ] {
            let err = remote(&body).unwrap_err();
            assert!(err.is_transient(), "{err:?}");
        }
    }
}
