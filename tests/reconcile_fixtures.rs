//! The pure stages (resolve and plan) from YAML fixtures in tests/fixtures/reconcile: each
//! fixture is an AppConnection, the Secrets it may read, and the expected fields, action or
//! error.

use std::collections::BTreeMap;
use std::path::Path;

use appconn::crd::AppConnection;
use appconn::keys::HashKey;
use appconn::reconcile::plan::{self, Action, BackendInfo};
use appconn::reconcile::resolve::{self, SecretData};
use serde_json::{Value, json};

const CANARY: &str = "zebra-canary-7781";

#[derive(serde::Deserialize)]
struct Fixture {
    name: String,
    connection: Value,
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    expect: Expect,
}

#[derive(serde::Deserialize)]
struct Expect {
    fields: Option<BTreeMap<String, Value>>,
    action: Option<String>,
    target: Option<BTreeMap<String, String>>,
    error: Option<ExpectedError>,
}

#[derive(serde::Deserialize)]
struct ExpectedError {
    reason: String,
    message: String,
}

fn key() -> HashKey {
    HashKey::from_bytes([7; 32])
}

fn connection(mut value: Value) -> AppConnection {
    value["apiVersion"] = json!("appconn.io/v1alpha1");
    value["kind"] = json!("AppConnection");
    serde_json::from_value(value).expect("fixture connection parses")
}

/// What resolve and plan made of a fixture: fields, action, target.
type Planned = (BTreeMap<String, Value>, Action, appconn::backend::Target);

/// Runs resolve and plan; the planned result or (reason, message).
fn run(fixture: &Fixture) -> Result<Planned, (String, String)> {
    let secrets: BTreeMap<String, SecretData> = fixture
        .secrets
        .iter()
        .map(|(name, data)| {
            (
                name.clone(),
                data.iter()
                    .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                    .collect(),
            )
        })
        .collect();
    let mut conn = connection(fixture.connection.clone());
    let credentials = resolve::resolve(&conn, &secrets)
        .map_err(|e| (e.reason().as_str().to_string(), e.to_string()))?;
    let fields = credentials.expose().clone();
    let desired = plan::desired(&conn, &BackendInfo::builtin(), credentials, &key())
        .map_err(|e| (e.reason().as_str().to_string(), e.to_string()))?;
    if let Some(status) = conn.status.as_mut()
        && status.credentials_hash.as_deref() == Some("{{hash}}")
    {
        status.credentials_hash = Some(desired.credentials_hash.clone());
    }
    let action = plan::decide(&conn, &desired, false, jiff::Timestamp::now());
    Ok((fields, action, desired.target))
}

#[test]
fn fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reconcile");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let fixture: Fixture = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let label = format!(
            "{} ({})",
            fixture.name,
            path.file_name().unwrap().to_string_lossy()
        );
        match (run(&fixture), &fixture.expect.error) {
            (Ok((fields, action, target)), None) => {
                if let Some(expected) = &fixture.expect.fields {
                    assert_eq!(&fields, expected, "{label}");
                }
                if let Some(expected) = &fixture.expect.action {
                    let got = match &action {
                        Action::Create { find_first: true } => "create-find-first",
                        other => other.verb(),
                    };
                    assert_eq!(got, expected, "{label}");
                }
                if let Some(expected) = &fixture.expect.target {
                    let got = json!({"connectionName": target.connection_name, "namespace": target.namespace, "app": target.app});
                    for (k, v) in expected {
                        assert_eq!(got[k], json!(v), "{label}: target.{k}");
                    }
                }
            }
            (Err((reason, message)), Some(expected)) => {
                assert_eq!(reason, expected.reason, "{label}: {message}");
                assert!(message.contains(&expected.message), "{label}: {message}");
                assert!(
                    !message.contains(CANARY),
                    "{label}: a value leaked into {message}"
                );
            }
            (Ok(_), Some(e)) => panic!("{label}: expected {} but it planned", e.reason),
            (Err(e), None) => panic!("{label}: unexpected error {e:?}"),
        }
        count += 1;
    }
    assert!(count >= 10, "only {count} fixtures found");
}

#[test]
fn the_hash_is_keyed_canonical_and_covers_everything_sent() {
    let base = json!({
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {"app": "a", "credentials": {"b": {"value": 1}, "a": {"value": "x"}}}
    });
    let hash = |value: &Value, key: &HashKey| {
        let conn = connection(value.clone());
        let creds = resolve::resolve(&conn, &BTreeMap::new()).unwrap();
        plan::desired(&conn, &BackendInfo::builtin(), creds, key)
            .unwrap()
            .credentials_hash
    };
    let h = hash(&base, &key());
    assert!(
        h.starts_with("hmac-sha256:") && h.len() == "hmac-sha256:".len() + 64,
        "{h}"
    );
    let mut reordered = base.clone();
    reordered["spec"]["credentials"] = json!({"a": {"value": "x"}, "b": {"value": 1}});
    assert_eq!(hash(&reordered, &key()), h, "key order does not matter");
    assert_ne!(
        hash(&base, &HashKey::from_bytes([8; 32])),
        h,
        "the installation key matters"
    );
    for (path, value) in [
        ("/spec/credentials/b/value", json!("1")),
        ("/spec/description", json!("d")),
        ("/spec/settings", json!({"gatewayId": "g"})),
        ("/spec/method", json!("m")),
        (
            "/spec/rotation",
            json!({"enabled": true, "intervalDays": 30}),
        ),
    ] {
        let mut changed = base.clone();
        let (parent, leaf) = path.rsplit_once('/').unwrap();
        changed.pointer_mut(parent).unwrap()[leaf] = value;
        assert_ne!(
            hash(&changed, &key()),
            h,
            "{path} is part of what is hashed"
        );
    }
    let mut disabled = base.clone();
    disabled["spec"]["rotation"] = json!({"enabled": false, "intervalDays": 30});
    assert_eq!(
        hash(&disabled, &key()),
        h,
        "a disabled schedule sends nothing"
    );
}
