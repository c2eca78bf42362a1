//! Pure translation between appconn's [`Desired`] and Credible's JSON: the connection types and
//! their fields, the request body, the comparison of what a GET returned with what would be
//! sent, connection paths, error messages and test verdicts. No I/O here.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::backend::{BackendError, ConnectionTest, Desired, Target};
use crate::secret::Credentials;

/// Credible's rule for connection names, as shown to users.
pub const NAME_RULE: &str = "Credible connection names may hold only letters, digits and \
     underscores (^[A-Za-z0-9_]+$), and \"duckdb\" is reserved; set spec.connectionName";

/// What JSON a field takes. Numbers stay numbers on the wire: Publisher's drivers read `port`
/// as a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    /// A JSON list (DuckDB's `attachedDatabases`).
    List,
}

use Kind::{List, Number, Text};

/// Each connection type and the fields of its `<type>Connection` block, from Publisher's API.
const TYPES: &[(&str, &[(&str, Kind)])] = &[
    (
        "postgres",
        &[
            ("host", Text),
            ("port", Number),
            ("databaseName", Text),
            ("userName", Text),
            ("password", Text),
            ("connectionString", Text),
        ],
    ),
    (
        "bigquery",
        &[
            ("defaultProjectId", Text),
            ("billingProjectId", Text),
            ("location", Text),
            ("serviceAccountKeyJson", Text),
            ("maximumBytesBilled", Text),
            ("queryTimeoutMilliseconds", Text),
        ],
    ),
    (
        "snowflake",
        &[
            ("account", Text),
            ("username", Text),
            ("password", Text),
            ("privateKey", Text),
            ("privateKeyPass", Text),
            ("warehouse", Text),
            ("database", Text),
            ("schema", Text),
            ("role", Text),
            ("responseTimeoutMilliseconds", Number),
        ],
    ),
    (
        "trino",
        &[
            ("server", Text),
            ("port", Number),
            ("catalog", Text),
            ("schema", Text),
            ("user", Text),
            ("password", Text),
            ("peakaKey", Text),
        ],
    ),
    (
        "mysql",
        &[
            ("host", Text),
            ("port", Number),
            ("database", Text),
            ("user", Text),
            ("password", Text),
        ],
    ),
    ("duckdb", &[("attachedDatabases", List)]),
    ("motherduck", &[("accessToken", Text), ("database", Text)]),
];

/// Field names a hosted server may leave out of what it returns, at any depth (the storage
/// credentials inside DuckDB's attached databases too): their absence is not a change.
const SECRETS: &[&str] = &[
    "password",
    "connectionString",
    "privateKey",
    "privateKeyPass",
    "serviceAccountKeyJson",
    "peakaKey",
    "accessToken",
    "secret",
    "secretAccessKey",
    "sessionToken",
    "sasUrl",
];

/// The connection types, as a person reads them.
pub fn types() -> String {
    TYPES
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn fields(app: &str) -> Result<&'static [(&'static str, Kind)], BackendError> {
    TYPES
        .iter()
        .find(|(name, _)| *name == app)
        .map(|(_, fields)| *fields)
        .ok_or_else(|| BackendError::InvalidSpec {
            message: format!(
                "Credible has no connection type {app:?} (spec.app); types: {}",
                types()
            ),
        })
}

/// The connection name, or `InvalidSpec` saying the rule.
pub fn connection_name(target: &Target) -> Result<&str, BackendError> {
    let name = target.connection_name.as_str();
    let valid = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name != "duckdb";
    if valid {
        Ok(name)
    } else {
        Err(BackendError::InvalidSpec {
            message: format!("{NAME_RULE}; got {name:?}"),
        })
    }
}

/// The checks that need no server: the name, the spec fields Credible has no place for, the
/// type, and every field of the block.
pub fn validate(desired: &Desired) -> Result<(), BackendError> {
    connection_name(&desired.target)?;
    let unused = [
        (
            desired.target.method.is_some(),
            "spec.method",
            "auth methods",
        ),
        (
            desired.description.is_some(),
            "spec.description",
            "descriptions",
        ),
        (
            desired.rotation.is_some(),
            "spec.rotation",
            "credential rotation",
        ),
    ];
    if let Some((_, field, what)) = unused.iter().find(|(set, _, _)| *set) {
        return Err(BackendError::InvalidSpec {
            message: format!("Credible connections have no {what}: remove {field}"),
        });
    }
    block(desired).map(|_| ())
}

/// The `<type>Connection` block: every credential and setting, each as its field's JSON kind.
fn block(desired: &Desired) -> Result<Map<String, Value>, BackendError> {
    let app = desired.target.app.as_str();
    let fields = fields(app)?;
    let allowed = || {
        fields
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    desired
        .credentials
        .expose()
        .iter()
        .chain(&desired.settings)
        .map(|(field, value)| {
            let Some((_, kind)) = fields.iter().find(|(name, _)| name == field) else {
                return Err(BackendError::InvalidSpec {
                    message: format!(
                        "a Credible {app} connection has no field {field:?}; its fields: {}",
                        allowed()
                    ),
                });
            };
            let value = typed(*kind, value).ok_or_else(|| BackendError::InvalidSpec {
                message: format!(
                    "field {field:?} of a Credible {app} connection {}",
                    match kind {
                        Text => "must be text",
                        Number => "must be a number (an inline number, or format: number)",
                        List => "must be a JSON list (an inline list, or format: json)",
                    }
                ),
            })?;
            Ok((field.clone(), value))
        })
        .collect()
}

/// `value` as `kind`: digits given as text become a number (Secrets hold text), a number
/// given for a text field its decimal text; None when it cannot be.
fn typed(kind: Kind, value: &Value) -> Option<Value> {
    match (kind, value) {
        (Text, Value::String(_)) | (Number, Value::Number(_)) | (List, Value::Array(_)) => {
            Some(value.clone())
        }
        (Text, Value::Number(number)) => Some(Value::String(number.to_string())),
        (Number, Value::String(text)) => match serde_json::from_str(text.trim()) {
            Ok(number @ Value::Number(_)) => Some(number),
            _ => None,
        },
        _ => None,
    }
}

/// The connection as appconn sends it on create, update and test: `name`, `type` and the whole
/// `<type>Connection` block (a PATCH replaces the block, so it always goes complete).
/// `attributes` and `resource` belong to the server.
pub fn body(desired: &Desired) -> Result<Value, BackendError> {
    let name = connection_name(&desired.target)?;
    let app = &desired.target.app;
    Ok(json!({
        "name": name,
        "type": app,
        format!("{app}Connection"): Value::Object(block(desired)?),
    }))
}

/// What of a connection GET returned is compared: its `type` and the block of the target's
/// type. Blocks of other types a change of type left behind do not matter.
pub fn content(connection: &Value, app: &str) -> Credentials {
    let key = format!("{app}Connection");
    let kept = ["type", key.as_str()]
        .into_iter()
        .filter_map(|k| Some((k.to_string(), connection.get(k)?.clone())))
        .collect::<BTreeMap<_, _>>();
    Credentials::new(kept)
}

/// Whether the connection as returned (`content`) differs from what would be sent: the type,
/// or any field of the block. A secret field the server left out is not a difference; a field
/// it holds that appconn would not send is.
pub fn differs(desired: &Desired, content: &Credentials) -> bool {
    let Ok(want) = body(desired) else {
        return true;
    };
    let got = content.expose();
    let key = format!("{}Connection", desired.target.app);
    got.get("type") != want.get("type")
        || got
            .get(&key)
            .zip(want.get(&key))
            .is_none_or(|(got, want)| !same(want, got))
}

fn same(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Object(want), Value::Object(got)) => {
            let sent = want.iter().all(|(field, w)| match got.get(field) {
                Some(g) => same(w, g),
                None => SECRETS.contains(&field.as_str()),
            });
            let nothing_else = got
                .iter()
                .all(|(field, g)| g.is_null() || want.contains_key(field));
            sent && nothing_else
        }
        (Value::Array(want), Value::Array(got)) => {
            want.len() == got.len() && want.iter().zip(got).all(|(w, g)| same(w, g))
        }
        _ => want == got,
    }
}

/// `status.id` of a connection: its path, `{segment}/{project}/connections/{name}`.
pub fn id(segment: &str, project: &str, name: &str) -> String {
    format!("{segment}/{project}/connections/{name}")
}

/// The project and name of a connection path as [`id`] makes it; None for anything else.
pub fn parse_id(id: &str) -> Option<(&str, &str)> {
    match id.split('/').collect::<Vec<_>>().as_slice() {
        [_, project, "connections", name] if !project.is_empty() && !name.is_empty() => {
            Some((project, name))
        }
        _ => None,
    }
}

/// The readable message of an error body in any of the three shapes Credible's API uses:
/// `{"code","message"}`, `{"message","details"}` or `{"error"}`.
pub fn error_message(body: &Value) -> Option<String> {
    ["message", "error", "details"]
        .into_iter()
        .find_map(|key| body.get(key)?.as_str().filter(|m| !m.is_empty()))
        .map(str::to_owned)
}

/// The verdict of `POST /connections/test`, which answers 200 whether or not the connection
/// works: `status` says which. The message is the driver's, unredacted.
pub fn test_verdict(body: &Value) -> Option<ConnectionTest> {
    let message = body
        .get("errorMessage")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match body.get("status")?.as_str()? {
        "ok" => Some(ConnectionTest {
            ok: true,
            message: String::new(),
        }),
        "failed" => Some(ConnectionTest {
            ok: false,
            message: if message.is_empty() {
                "the test failed without a message".to_string()
            } else {
                message.to_string()
            },
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`Desired`] for `app` with these credentials and settings.
    fn desired(app: &str, name: &str, credentials: &Value, settings: &Value) -> Desired {
        let object = |v: &Value| -> BTreeMap<String, Value> {
            v.as_object()
                .map(|m| m.clone().into_iter().collect())
                .unwrap_or_default()
        };
        Desired {
            target: Target {
                namespace: "analytics".into(),
                resource_name: name.into(),
                connection_name: name.into(),
                app: app.into(),
                method: None,
                project: Some("analytics".into()),
            },
            description: None,
            credentials: Credentials::new(object(credentials)),
            settings: object(settings),
            rotation: None,
            credentials_hash: "hmac-sha256:00".into(),
        }
    }

    fn fixture(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    const FIXTURES: [(&str, &str); 7] = [
        ("postgres", include_str!("fixtures/postgres.json")),
        ("bigquery", include_str!("fixtures/bigquery.json")),
        ("snowflake", include_str!("fixtures/snowflake.json")),
        ("trino", include_str!("fixtures/trino.json")),
        ("mysql", include_str!("fixtures/mysql.json")),
        ("duckdb", include_str!("fixtures/duckdb.json")),
        ("motherduck", include_str!("fixtures/motherduck.json")),
    ];

    fn from_fixture(fixture: &Value) -> Desired {
        let app = fixture["app"].as_str().unwrap();
        let name = fixture["connectionName"].as_str().unwrap();
        desired(app, name, &fixture["credentials"], &fixture["settings"])
    }

    #[test]
    fn every_type_maps_to_its_block() {
        assert_eq!(FIXTURES.len(), TYPES.len(), "a fixture per type");
        for (app, text) in FIXTURES {
            let fixture = fixture(text);
            let desired = from_fixture(&fixture);
            validate(&desired).unwrap_or_else(|e| panic!("{app}: {e}"));
            assert_eq!(body(&desired).unwrap(), fixture["body"], "{app}");
        }
    }

    #[test]
    fn what_a_get_returns_is_compared_field_by_field() {
        for (app, text) in FIXTURES {
            let fixture = fixture(text);
            let desired = from_fixture(&fixture);
            let read = |connection: &Value| differs(&desired, &content(connection, app));
            assert!(!read(&fixture["get"]), "{app}: as written");
            assert!(!read(&fixture["getStripped"]), "{app}: secrets stripped");
            for (i, edited) in fixture["getEdited"].as_array().unwrap().iter().enumerate() {
                assert!(read(edited), "{app}: edit {i} is a change");
            }
        }
    }

    #[test]
    fn a_changed_type_or_a_missing_block_is_a_change() {
        let fixture = fixture(FIXTURES[0].1);
        let desired = from_fixture(&fixture);
        let mut other_type = fixture["get"].clone();
        other_type["type"] = json!("mysql");
        assert!(differs(&desired, &content(&other_type, "postgres")));
        let mut no_block = fixture["get"].clone();
        no_block
            .as_object_mut()
            .unwrap()
            .remove("postgresConnection");
        assert!(differs(&desired, &content(&no_block, "postgres")));
        let mut beside = fixture["get"].clone();
        beside["snowflakeConnection"] = json!({"account": "left-over"});
        assert!(
            !differs(&desired, &content(&beside, "postgres")),
            "another type's block left beside is not compared"
        );
    }

    #[test]
    fn unknown_fields_and_wrong_kinds_are_refused_naming_the_field() {
        let fixture = fixture(FIXTURES[0].1);
        let mut desired = from_fixture(&fixture);
        desired
            .settings
            .insert("hostname".into(), json!("db.internal"));
        let err = validate(&desired).unwrap_err();
        assert!(matches!(err, BackendError::InvalidSpec { .. }));
        assert_eq!(
            err.to_string(),
            "a Credible postgres connection has no field \"hostname\"; its fields: host, port, \
             databaseName, userName, password, connectionString"
        );

        let mut desired = from_fixture(&fixture);
        let mut fields = desired.credentials.expose().clone();
        fields.insert("port".into(), json!("zebra-canary-7781"));
        desired.credentials = Credentials::new(fields);
        let err = validate(&desired).unwrap_err().to_string();
        assert_eq!(
            err,
            "field \"port\" of a Credible postgres connection must be a number (an inline \
             number, or format: number)"
        );
        let mut fields = desired.credentials.expose().clone();
        fields.insert("port".into(), json!(" 5432 "));
        desired.credentials = Credentials::new(fields);
        assert_eq!(body(&desired).unwrap()["postgresConnection"]["port"], 5432);

        let duckdb = desired_with("duckdb", json!({"attachedDatabases": "[]"}));
        assert!(
            validate(&duckdb)
                .unwrap_err()
                .to_string()
                .contains("must be a JSON list")
        );
        let bigquery = desired_with("bigquery", json!({"maximumBytesBilled": 1000000}));
        assert_eq!(
            body(&bigquery).unwrap()["bigqueryConnection"]["maximumBytesBilled"],
            "1000000"
        );
        let bool_text = desired_with("mysql", json!({"host": true}));
        assert!(validate(&bool_text).is_err());
    }

    fn desired_with(app: &str, credentials: Value) -> Desired {
        desired(app, "c", &credentials, &json!({}))
    }

    #[test]
    fn spec_fields_credible_has_no_place_for_are_refused() {
        let fixture = fixture(FIXTURES[0].1);
        type Change = fn(&mut Desired);
        let cases: [(Change, &str); 4] = [
            (
                |d| d.target.method = Some("password".into()),
                "Credible connections have no auth methods: remove spec.method",
            ),
            (
                |d| d.description = Some("x".into()),
                "Credible connections have no descriptions: remove spec.description",
            ),
            (
                |d| {
                    d.rotation = Some(crate::backend::RotationSchedule {
                        interval_days: 1,
                        hours: 0,
                        minutes: 0,
                    })
                },
                "Credible connections have no credential rotation: remove spec.rotation",
            ),
            (
                |d| d.target.app = "oracle".into(),
                "Credible has no connection type \"oracle\" (spec.app); types: postgres, \
                 bigquery, snowflake, trino, mysql, duckdb, motherduck",
            ),
        ];
        for (change, message) in cases {
            let mut desired = from_fixture(&fixture);
            change(&mut desired);
            let err = validate(&desired).unwrap_err();
            assert!(matches!(err, BackendError::InvalidSpec { .. }), "{err:?}");
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn names_follow_credibles_rule() {
        let mut desired = from_fixture(&fixture(FIXTURES[0].1));
        for good in ["a", "Warehouse_01", "pg", "duckdb_main", "DUCKDB"] {
            desired.target.connection_name = good.into();
            assert!(validate(&desired).is_ok(), "{good:?}");
            assert_eq!(body(&desired).unwrap()["name"], good);
        }
        for bad in [
            "",
            "warehouse-prod",
            "ware house",
            "ware.house",
            "wäre",
            "duckdb",
        ] {
            desired.target.connection_name = bad.into();
            let err = validate(&desired).unwrap_err();
            assert!(matches!(err, BackendError::InvalidSpec { .. }), "{bad:?}");
            assert!(err.to_string().starts_with(NAME_RULE), "{err}");
        }
    }

    #[test]
    fn ids_are_paths() {
        let id = id("environments", "analytics", "warehouse");
        assert_eq!(id, "environments/analytics/connections/warehouse");
        assert_eq!(parse_id(&id), Some(("analytics", "warehouse")));
        for bad in [
            "",
            "3c90c3cc-0d44-4b50-8888-8dd25736052a",
            "projects//connections/w",
            "projects/a/b/w",
            "projects/a/connections/w/x",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn error_messages_in_every_shape() {
        for (body, message) in [
            (
                json!({"code": 404, "message": "Connection pg1 not found"}),
                Some("Connection pg1 not found"),
            ),
            (
                json!({"message": "Bad config", "details": "Bad Request"}),
                Some("Bad config"),
            ),
            (
                json!({"error": "Unsupported connection type"}),
                Some("Unsupported connection type"),
            ),
            (json!({"details": "only details"}), Some("only details")),
            (json!({"message": ""}), None),
            (json!([1]), None),
        ] {
            assert_eq!(error_message(&body).as_deref(), message, "{body}");
        }
    }

    #[test]
    fn test_verdicts_come_from_the_body() {
        let ok = test_verdict(&json!({"status": "ok", "errorMessage": ""})).unwrap();
        assert!(ok.ok);
        let failed = test_verdict(&json!({"status": "failed",
            "errorMessage": "password authentication failed for user \"u\""}))
        .unwrap();
        assert_eq!(
            (failed.ok, failed.message.as_str()),
            (false, "password authentication failed for user \"u\"")
        );
        let bare = test_verdict(&json!({"status": "failed"})).unwrap();
        assert_eq!(bare.message, "the test failed without a message");
        assert!(test_verdict(&json!({"status": "maybe"})).is_none());
        assert!(test_verdict(&json!({})).is_none());
    }
}
