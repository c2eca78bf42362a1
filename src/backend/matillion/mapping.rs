//! Pure translation between appconn's [`Desired`] / [`Remote`] and Matillion's JSON: the
//! connection body, the drift comparison, list pages and RFC 7807 problems. No I/O here.
//!
//! The mapping (README, "Matillion DPC"):
//!
//! | AppConnection            | Matillion                                         |
//! |--------------------------|---------------------------------------------------|
//! | `connectionName`         | `name`                                            |
//! | `app`                    | `platformConnectionType`, from its slug           |
//! | `method`                 | `authType`, from its slug                         |
//! | `settings.authProvider`  | `authProvider`                                    |
//! | `description`            | `connectionDetails.description`                   |
//! | `credentials`            | `connectionDetails.connectionProperties`          |
//! | `settings.secretsLocation` | `connectionDetails.secretsLocation`             |

use serde_json::{Map, Value};

use crate::backend::{BackendError, Desired, Remote, Target};
use crate::secret::Credentials;

/// Matillion's platform connection types; `spec.app` names one by its slug (`dwh`).
const PLATFORM_TYPES: [&str; 3] = ["DWH", "COMPONENT_BASIC", "CLOUD_PLATFORM_CREDENTIALS"];
/// Matillion's auth types; `spec.method` names one by its slug (`generic-secret`).
const AUTH_TYPES: [&str; 2] = ["GENERIC_SECRET", "CLOUD_PROVIDER_SECRET"];
/// The settings that have a place in the body; any other would be dropped by Matillion and
/// then read as drift forever.
const SETTINGS: [&str; 2] = ["authProvider", "secretsLocation"];
/// The body fields appconn writes, which a full replacement sets or unsets. The fields the
/// server fills in (`id`, `createdBy`, `createdDate`, `projectId`) are not among them.
const PUSHED: [&str; 5] = [
    "name",
    "platformConnectionType",
    "authProvider",
    "authType",
    "connectionDetails",
];

/// `dwh` → `DWH`, `component-basic` → `COMPONENT_BASIC`: the slug of one of `allowed`, any
/// case, with `-` or `_`.
fn from_slug(slug: &str, allowed: &[&'static str]) -> Option<&'static str> {
    let wanted = slug.trim().to_ascii_uppercase().replace('-', "_");
    allowed.iter().copied().find(|a| *a == wanted)
}

fn slugs(allowed: &[&str]) -> String {
    allowed
        .iter()
        .map(|a| a.to_ascii_lowercase().replace('_', "-"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The platform connection type `spec.app` names.
pub fn platform_type(target: &Target) -> Result<&'static str, BackendError> {
    from_slug(&target.app, &PLATFORM_TYPES).ok_or_else(|| BackendError::InvalidSpec {
        message: format!(
            "Matillion has no platform connection type {:?}; spec.app must be one of {}",
            target.app,
            slugs(&PLATFORM_TYPES)
        ),
    })
}

/// The auth type `spec.method` names; Matillion requires one.
pub fn auth_type(target: &Target) -> Result<&'static str, BackendError> {
    let Some(method) = target.method.as_deref() else {
        return Err(BackendError::InvalidSpec {
            message: format!(
                "Matillion needs spec.method, the auth type: one of {}",
                slugs(&AUTH_TYPES)
            ),
        });
    };
    from_slug(method, &AUTH_TYPES).ok_or_else(|| BackendError::InvalidSpec {
        message: format!(
            "Matillion has no auth type {method:?}; spec.method must be one of {}",
            slugs(&AUTH_TYPES)
        ),
    })
}

/// The connection name, which every route addresses the connection by.
pub fn connection_name(target: &Target) -> Result<&str, BackendError> {
    let name = target.connection_name.as_str();
    if name.trim().is_empty() || name.trim() != name {
        return Err(BackendError::InvalidSpec {
            message: format!(
                "Matillion connection names must not be blank or begin or end with white space; got {name:?}"
            ),
        });
    }
    Ok(name)
}

/// A project id is a UUID: Matillion answers anything else with a conversion error.
pub fn check_project(field: &str, project: &str) -> Result<(), BackendError> {
    let uuid = project.len() == 36 && uuid::Uuid::try_parse(project).is_ok();
    if uuid {
        Ok(())
    } else {
        Err(BackendError::InvalidSpec {
            message: format!("{field} must be a Matillion project UUID; got {project:?}"),
        })
    }
}

/// Everything Matillion would refuse that can be told without a call.
pub fn validate(desired: &Desired) -> Result<(), BackendError> {
    let invalid = |message: String| Err(BackendError::InvalidSpec { message });
    let target = &desired.target;
    connection_name(target)?;
    if let Some(project) = &target.project {
        check_project("spec.project", project)?;
    }
    let platform = platform_type(target)?;
    auth_type(target)?;
    if let Some(field) = desired
        .settings
        .keys()
        .find(|k| !SETTINGS.contains(&k.as_str()))
    {
        return invalid(format!(
            "settings.{field} has no place in a Matillion connection; settings may hold {}",
            SETTINGS.join(" and ")
        ));
    }
    match desired.settings.get("authProvider") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return invalid("settings.authProvider must be a string, e.g. SNOWFLAKE".into()),
    }
    match desired.settings.get("secretsLocation") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => {
            return invalid(
                "settings.secretsLocation must be an object, e.g. {type: AWS_SECRET_MANAGER, region: eu-west-1}"
                    .into(),
            );
        }
    }
    let secret_name = desired.credentials.expose().get("secretName");
    let named = secret_name
        .and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty());
    if platform == "COMPONENT_BASIC" && !named {
        return invalid(
            "a Matillion COMPONENT_BASIC connection needs credentials.secretName, the name of \
             its secret in your vault"
                .into(),
        );
    }
    if desired.rotation.is_some() {
        return invalid(
            "Matillion connections hold pointers into your vault, which appconn does not \
             rotate: remove spec.rotation"
                .into(),
        );
    }
    Ok(())
}

/// The complete connection, as POST creates it and PUT replaces it (PUT unsets whatever is
/// left out, so it is always the whole object).
pub fn body(desired: &Desired) -> Result<Value, BackendError> {
    let target = &desired.target;
    let mut details = Map::new();
    if let Some(description) = &desired.description {
        details.insert("description".into(), description.clone().into());
    }
    let properties: Map<String, Value> = desired
        .credentials
        .expose()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    details.insert("connectionProperties".into(), Value::Object(properties));
    if let Some(location) = desired.settings.get("secretsLocation") {
        details.insert("secretsLocation".into(), location.clone());
    }
    let mut body = Map::new();
    body.insert("name".into(), connection_name(target)?.into());
    body.insert(
        "platformConnectionType".into(),
        platform_type(target)?.into(),
    );
    if let Some(provider) = desired.settings.get("authProvider") {
        body.insert("authProvider".into(), provider.clone());
    }
    body.insert("authType".into(), auth_type(target)?.into());
    body.insert("connectionDetails".into(), Value::Object(details));
    Ok(pushed(&Value::Object(body)))
}

/// The fields of `connection` appconn writes, with nulls and empty objects left out: Matillion
/// may answer an unset field either way.
fn pushed(connection: &Value) -> Value {
    let fields = PUSHED
        .iter()
        .filter_map(|f| Some((f.to_string(), connection.get(*f)?.clone())));
    prune(Value::Object(fields.collect())).unwrap_or(Value::Object(Map::new()))
}

/// `value` without null members or empty objects, at every level; None when nothing is left.
fn prune(value: Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Object(map) => {
            let map: Map<String, Value> = map
                .into_iter()
                .filter_map(|(k, v)| Some((k, prune(v)?)))
                .collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        other => Some(other),
    }
}

/// A connection as Matillion answers it → [`Remote`]. `known_id`: the id to keep when an
/// answer (a PUT's) leaves it out.
pub fn remote(connection: &Value, known_id: Option<&str>) -> Result<Remote, BackendError> {
    let unexpected = |what: &str| BackendError::Unavailable {
        message: format!("unexpected answer from Matillion: {what}"),
        retry_after: None,
    };
    if !connection.is_object() {
        return Err(unexpected("the connection is not an object"));
    }
    let text = |field: &str| connection.get(field).and_then(Value::as_str);
    let id = text("id")
        .or(known_id)
        .ok_or_else(|| unexpected("the connection has no id"))?;
    let name = text("name").ok_or_else(|| unexpected("the connection has no name"))?;
    Ok(Remote {
        id: id.to_owned(),
        connection_name: name.to_owned(),
        credentials_hash: None,
        rotation: None,
        content: Some(content(pushed(connection))),
    })
}

/// Whether the connection read back differs from what appconn would write, field by field.
/// Nothing secret travels through Matillion's API, so the comparison is exact.
pub fn differs(desired: &Desired, remote: &Remote) -> Option<bool> {
    let read = remote.content.as_ref()?;
    let wanted = body(desired).ok()?;
    let read = Value::Object(read.expose().clone().into_iter().collect());
    Some(read != wanted)
}

/// The pushed fields of a connection, kept where they cannot be printed.
fn content(pushed: Value) -> Credentials {
    match pushed {
        Value::Object(fields) => Credentials::new(fields.into_iter().collect()),
        _ => Credentials::new(Default::default()),
    }
}

/// The `name` of a listed connection.
pub fn name_of(connection: &Value) -> Option<&str> {
    connection.get("name").and_then(Value::as_str)
}

/// The `id` of a listed connection.
pub fn id_of(connection: &Value) -> Option<&str> {
    connection.get("id").and_then(Value::as_str)
}

/// One page of the list route.
#[derive(Debug, PartialEq)]
pub struct Page {
    pub results: Vec<Value>,
    /// Whether a next page may hold more.
    pub more: bool,
}

/// `{page, size, total, results}` → [`Page`]. `page` is the index asked for. Without a
/// `total`, a full page may be followed by another.
pub fn page(body: &Value, page: u64) -> Result<Page, BackendError> {
    let results = body
        .get("results")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| BackendError::Unavailable {
            message: "unexpected answer from Matillion to a list: no results".into(),
            retry_after: None,
        })?;
    let size = body
        .get("size")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        .unwrap_or(results.len() as u64);
    let more = !results.is_empty()
        && match body.get("total").and_then(Value::as_u64) {
            Some(total) => (page + 1).saturating_mul(size) < total,
            None => results.len() as u64 >= size,
        };
    Ok(Page { results, more })
}

/// The readable message of an RFC 7807 problem: its `detail`, then each violation as
/// `field: message`; its `title` when it has neither.
pub fn problem_message(body: &Value) -> Option<String> {
    let text = |v: &Value, field: &str| {
        v.get(field)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let head = text(body, "detail");
    let violations: Vec<String> = body
        .get("violations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let message = text(v, "message")?;
            Some(match text(v, "field") {
                Some(field) => format!("{field}: {message}"),
                None => message,
            })
        })
        .collect();
    match (head, violations.is_empty()) {
        (Some(head), true) => Some(head),
        (Some(head), false) => Some(format!("{head}: {}", violations.join("; "))),
        (None, false) => Some(violations.join("; ")),
        (None, true) => text(body, "title"),
    }
}

/// Whether a 400 says that `name` is taken: a message about a duplicate that names the
/// connection or is about the `name` field. The public material does not say which status a
/// taken name gets; a 409 is one always.
pub fn names_duplicate(body: &Value, name: &str) -> bool {
    let duplicate = |message: &str| {
        let lower = message.to_lowercase();
        lower.contains("already exist") || lower.contains("duplicate")
    };
    let detail = body.get("detail").and_then(Value::as_str).unwrap_or("");
    if duplicate(detail) && detail.contains(name) {
        return true;
    }
    body.get("violations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|v| {
            let message = v.get("message").and_then(Value::as_str).unwrap_or("");
            let field = v.get("field").and_then(Value::as_str);
            duplicate(message) && (message.contains(name) || field == Some("name"))
        })
}

/// An OAuth error's `error: error_description`.
pub fn oauth_message(body: &Value) -> Option<String> {
    let error = body.get("error").and_then(Value::as_str)?;
    Some(
        match body.get("error_description").and_then(Value::as_str) {
            Some(description) => format!("{error}: {description}"),
            None => error.to_owned(),
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::backend::RotationSchedule;
    use crate::secret::Credentials;

    /// A [`Desired`] from a fixture's `desired` object.
    fn desired(fixture: &Value) -> Desired {
        let d = &fixture["desired"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let object = |v: &Value| -> BTreeMap<String, Value> {
            v.as_object()
                .map(|m| m.clone().into_iter().collect())
                .unwrap_or_default()
        };
        Desired {
            target: Target {
                namespace: "analytics".into(),
                resource_name: text(&d["connectionName"]).unwrap(),
                connection_name: text(&d["connectionName"]).unwrap(),
                app: text(&d["app"]).unwrap(),
                method: text(&d["method"]),
                project: text(&d["project"]),
            },
            description: text(&d["description"]),
            credentials: Credentials::new(object(&d["credentials"])),
            settings: object(&d["settings"]),
            rotation: None,
            credentials_hash: "hmac-sha256:00".into(),
        }
    }

    fn fixture(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    const CONNECTIONS: [(&str, &str); 3] = [
        ("dwh", include_str!("fixtures/dwh.json")),
        (
            "component-basic",
            include_str!("fixtures/component-basic.json"),
        ),
        (
            "cloud-credentials",
            include_str!("fixtures/cloud-credentials.json"),
        ),
    ];

    #[test]
    fn bodies_match_the_fixtures() {
        for (name, text) in CONNECTIONS {
            let fixture = fixture(text);
            let desired = desired(&fixture);
            validate(&desired).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(body(&desired).unwrap(), fixture["body"], "{name}");
        }
    }

    #[test]
    fn answers_map_to_remote_and_compare_equal_to_what_was_sent() {
        for (name, text) in CONNECTIONS {
            let fixture = fixture(text);
            let desired = desired(&fixture);
            let remote = remote(&fixture["response"], None).unwrap();
            assert_eq!(remote.id, fixture["response"]["id"], "{name}");
            assert_eq!(remote.connection_name, desired.target.connection_name);
            assert_eq!(remote.credentials_hash, None);
            assert_eq!(
                differs(&desired, &remote),
                Some(false),
                "{name}: the server's own fields are not drift"
            );
        }
    }

    #[test]
    fn any_pushed_field_changed_outside_is_drift() {
        let fixture = fixture(CONNECTIONS[0].1);
        let desired = desired(&fixture);
        let changes = [
            json!({"authProvider": "DATABRICKS"}),
            json!({"authProvider": null}),
            json!({"authType": "CLOUD_PROVIDER_SECRET"}),
            json!({"platformConnectionType": "COMPONENT_BASIC"}),
            json!({"name": "renamed"}),
            json!({"connectionDetails": {"description": "Analytics warehouse",
                   "connectionProperties": {"secretName": "prod/snowflake", "secretKey": "pw"},
                   "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}}),
            json!({"connectionDetails": {"description": "Analytics warehouse",
                   "connectionProperties": {"secretName": "prod/snowflake", "secretKey": "password"}}}),
            json!({"connectionDetails": {"description": "edited",
                   "connectionProperties": {"secretName": "prod/snowflake", "secretKey": "password"},
                   "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}}),
        ];
        for change in changes {
            let mut answer = fixture["response"].clone();
            for (k, v) in change.as_object().unwrap() {
                answer[k] = v.clone();
            }
            let remote = remote(&answer, None).unwrap();
            assert_eq!(differs(&desired, &remote), Some(true), "{change}");
        }
        let mut same = fixture["response"].clone();
        same["lastModifiedDate"] = json!("2026-11-26T10:00:00Z");
        same["createdBy"] = json!("someone-else@clients");
        same["connectionDetails"]["secretsLocation"]["extra"] = Value::Null;
        let remote = remote(&same, None).unwrap();
        assert_eq!(
            differs(&desired, &remote),
            Some(false),
            "unknown fields, server fields and nulls are not drift"
        );
        let no_content = Remote {
            content: None,
            ..remote
        };
        assert_eq!(differs(&desired, &no_content), None);
    }

    #[test]
    fn slugs_and_enums_name_the_same_types() {
        let mut desired = desired(&fixture(CONNECTIONS[0].1));
        for (app, want) in [
            ("dwh", "DWH"),
            ("DWH", "DWH"),
            ("cloud-platform-credentials", "CLOUD_PLATFORM_CREDENTIALS"),
            ("Cloud_Platform_Credentials", "CLOUD_PLATFORM_CREDENTIALS"),
        ] {
            desired.target.app = app.into();
            assert_eq!(platform_type(&desired.target).unwrap(), want, "{app}");
        }
        for (method, want) in [
            ("generic-secret", "GENERIC_SECRET"),
            ("CLOUD_PROVIDER_SECRET", "CLOUD_PROVIDER_SECRET"),
        ] {
            desired.target.method = Some(method.into());
            assert_eq!(auth_type(&desired.target).unwrap(), want, "{method}");
        }
    }

    #[test]
    fn what_matillion_would_refuse_is_invalid_spec() {
        let base = desired(&fixture(CONNECTIONS[0].1));
        type Change = Box<dyn Fn(&mut Desired)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|d| d.target.app = "warehouse".into()),
                "Matillion has no platform connection type \"warehouse\"; spec.app must be one \
                 of dwh, component-basic, cloud-platform-credentials",
            ),
            (
                Box::new(|d| d.target.method = None),
                "Matillion needs spec.method, the auth type: one of generic-secret, \
                 cloud-provider-secret",
            ),
            (
                Box::new(|d| d.target.method = Some("password".into())),
                "Matillion has no auth type \"password\"; spec.method must be one of \
                 generic-secret, cloud-provider-secret",
            ),
            (
                Box::new(|d| {
                    d.target.app = "component-basic".into();
                    d.credentials =
                        Credentials::new([("secretKey".to_string(), json!("password"))].into());
                }),
                "a Matillion COMPONENT_BASIC connection needs credentials.secretName, the name \
                 of its secret in your vault",
            ),
            (
                Box::new(|d| d.target.project = Some("analytics".into())),
                "spec.project must be a Matillion project UUID; got \"analytics\"",
            ),
            (
                Box::new(|d| {
                    d.settings.insert("gatewayId".into(), json!("g"));
                }),
                "settings.gatewayId has no place in a Matillion connection; settings may hold \
                 authProvider and secretsLocation",
            ),
            (
                Box::new(|d| {
                    d.settings.insert("authProvider".into(), json!(7));
                }),
                "settings.authProvider must be a string, e.g. SNOWFLAKE",
            ),
            (
                Box::new(|d| {
                    d.settings
                        .insert("secretsLocation".into(), json!("eu-west-1"));
                }),
                "settings.secretsLocation must be an object, e.g. {type: AWS_SECRET_MANAGER, \
                 region: eu-west-1}",
            ),
            (
                Box::new(|d| {
                    d.rotation = Some(RotationSchedule {
                        interval_days: 30,
                        hours: 0,
                        minutes: 0,
                    });
                }),
                "Matillion connections hold pointers into your vault, which appconn does not \
                 rotate: remove spec.rotation",
            ),
            (
                Box::new(|d| d.target.connection_name = " padded".into()),
                "Matillion connection names must not be blank or begin or end with white \
                 space; got \" padded\"",
            ),
        ];
        for (change, message) in cases {
            let mut d = base.clone();
            change(&mut d);
            let err = validate(&d).unwrap_err();
            assert!(matches!(err, BackendError::InvalidSpec { .. }), "{err:?}");
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn pages_say_whether_more_may_follow() {
        let c = |n: &str| json!({"name": n});
        let cases = [
            (
                json!({"page": 0, "size": 2, "total": 5, "results": [c("a"), c("b")]}),
                0,
                true,
            ),
            (
                json!({"page": 2, "size": 2, "total": 5, "results": [c("e")]}),
                2,
                false,
            ),
            (
                json!({"page": 1, "size": 2, "total": 4, "results": [c("c"), c("d")]}),
                1,
                false,
            ),
            (json!({"results": [c("a"), c("b")], "size": 2}), 0, true),
            (json!({"results": [c("a")], "size": 2}), 0, false),
            (
                json!({"page": 0, "size": 2, "total": 9, "results": []}),
                0,
                false,
            ),
        ];
        for (body, index, more) in cases {
            assert_eq!(page(&body, index).unwrap().more, more, "{body}");
        }
        assert!(page(&json!({"page": 0}), 0).unwrap_err().is_transient());
    }

    #[test]
    fn problems_read_as_messages_and_duplicates_are_recognised() {
        for case in fixture(include_str!("fixtures/errors.json"))
            .as_array()
            .unwrap()
        {
            assert_eq!(
                problem_message(&case["body"]).as_deref(),
                case["message"].as_str(),
                "{case}"
            );
            assert_eq!(
                names_duplicate(&case["body"], "warehouse"),
                case["duplicate"] == true,
                "{case}"
            );
        }
    }

    #[test]
    fn answers_without_an_id_keep_the_known_one() {
        let answer = json!({"name": "wh", "platformConnectionType": "DWH"});
        assert_eq!(remote(&answer, Some("id-1")).unwrap().id, "id-1");
        assert!(remote(&answer, None).unwrap_err().is_transient());
        assert!(
            remote(&json!([1]), Some("id-1"))
                .unwrap_err()
                .is_transient()
        );
        assert!(
            remote(&json!({"id": "x"}), None)
                .unwrap_err()
                .is_transient()
        );
    }

    #[test]
    fn oauth_errors_read_as_error_and_description() {
        let body = json!({"error": "access_denied", "error_description": "Unauthorized"});
        assert_eq!(
            oauth_message(&body).as_deref(),
            Some("access_denied: Unauthorized")
        );
        assert_eq!(
            oauth_message(&json!({"error": "invalid_client"})).as_deref(),
            Some("invalid_client")
        );
        assert_eq!(oauth_message(&json!({"message": "x"})), None);
    }

    #[test]
    fn project_ids_are_uuids() {
        assert!(check_project("p", "2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60").is_ok());
        for bad in [
            "",
            "analytics",
            "2f6d9a4e8b1c4d3e9f5a1b2c3d4e5f60",
            "{2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60}",
        ] {
            assert!(check_project("p", bad).is_err(), "{bad}");
        }
    }
}
