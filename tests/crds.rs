//! `crds/` is the output of `appconn crds`, the CRDs are structural with bounded CEL costs, and
//! every CEL rule is present and accepts a good object and rejects a bad one.

use std::path::Path;

use appconn::crd::{self, AppConnection, ClusterConnectionBackend, ConnectionBackend};
use kube::CustomResourceExt;
use serde_json::{Value, json};

#[test]
fn crds_dir_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for (file, yaml) in crd::crds_yaml() {
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            committed == yaml,
            "crds/{file} is stale: run `cargo run -- crds --output-dir crds` and commit"
        );
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files,
        crd::crds_yaml().len(),
        "crds/ holds a file no CRD generates"
    );
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// Every node has a type unless it preserves unknown fields or is int-or-string; every list and
/// map under a CEL rule is bounded.
fn assert_structural(path: &str, node: &Value) {
    let obj = node
        .as_object()
        .unwrap_or_else(|| panic!("{path}: schema node is not an object"));
    let open = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true))
        || obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    assert!(obj.contains_key("type") || open, "{path}: no type");
    for forbidden in ["$ref", "default"] {
        assert!(
            !obj.contains_key(forbidden),
            "{path}: {forbidden} is not allowed here"
        );
    }
    // Junctors are structural only as value validations: no type, default, nullable or
    // additionalProperties inside them (a real server refuses the CRD otherwise).
    for junctor in ["anyOf", "oneOf", "allOf"] {
        for branch in obj
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for key in [
                "type",
                "default",
                "nullable",
                "additionalProperties",
                "$ref",
            ] {
                assert!(
                    branch.get(key).is_none(),
                    "{path}.{junctor}: {key} is not allowed in a junctor"
                );
            }
        }
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("array") => {
            assert!(
                obj.contains_key("maxItems")
                    || path.contains("status")
                    || path.contains("Selector"),
                "{path}: unbounded list"
            );
            assert_structural(&format!("{path}[]"), &obj["items"]);
        }
        Some("string") => {
            let enumerated = obj.contains_key("enum") || obj.contains_key("format");
            assert!(
                obj.contains_key("maxLength")
                    || enumerated
                    || path.contains("status")
                    || path.contains("Selector"),
                "{path}: unbounded string"
            );
        }
        Some("object") => {
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for (name, child) in props {
                    assert_structural(&format!("{path}.{name}"), child);
                }
            }
            if let Some(extra) = obj.get("additionalProperties") {
                assert!(
                    obj.contains_key("maxProperties")
                        || path.contains("status")
                        || path.contains("Selector"),
                    "{path}: unbounded map"
                );
                if extra.is_object() {
                    assert_structural(&format!("{path}.*"), extra);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn crds_are_structural_and_bounded() {
    for crd in crd::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        let schema = schema_of(&crd);
        assert_structural(&name, &schema["properties"]["spec"]);
        assert_structural(&format!("{name}.status"), &schema["properties"]["status"]);
        let compiled = kube::core::cel::compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{name}: CEL rules do not compile: {:?}",
            compiled.compilation_errors()
        );
    }
}

#[test]
fn every_cel_rule_is_in_the_generated_yaml() {
    let all: String = crd::crds_yaml().into_iter().map(|(_, y)| y).collect();
    for rule in [
        "self == oldSelf",
        "has(self.backendRef) == has(oldSelf.backendRef)",
        "has(self.method) == has(oldSelf.method)",
        "has(self.connectionName) == has(oldSelf.connectionName)",
        "has(self.project) == has(oldSelf.project)",
        "self >= 1 && self <= 365",
        "self >= 0 && self <= 23",
        "self >= 0 && self <= 59",
        "has(self.intervalDays)",
        "filter(x, x).size() == 1",
        "must name its namespace",
        "reads Secrets from its own namespace",
        "delete and recreate",
    ] {
        assert!(
            all.contains(rule),
            "CEL rule or message {rule:?} missing from the generated CRDs"
        );
    }
    let conn = serde_yaml::to_string(&AppConnection::crd()).unwrap();
    for column in [
        "Ready", "App", "Backend", "ID", "Rotation", "Age", "Message",
    ] {
        assert!(
            conn.contains(&format!("name: {column}")),
            "printer column {column} missing"
        );
    }
    for short in ["appconn", "appconns"] {
        assert!(
            conn.contains(&format!("- {short}")),
            "short name {short} missing"
        );
    }
}

fn connection(spec: Value) -> Value {
    json!({"apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
           "metadata": {"name": "c", "namespace": "ns"}, "spec": spec})
}

fn check(kind: &str, object: &Value, old: Option<&Value>) -> Result<(), String> {
    crd::validate::validate(kind, object, old).map_err(|e| e.join("; "))
}

#[test]
fn connection_rules_accept_good_and_reject_bad() {
    let good = connection(json!({
        "app": "mssql", "method": "username-and-password", "connectionName": "w", "project": "p",
        "credentials": {"host": {"value": "h"}, "password": {"secretKeyRef": {"name": "s", "key": "k"}}},
        "rotation": {"enabled": true, "intervalDays": 30, "rotateAtUtc": {"hours": 11, "minutes": 29}}
    }));
    check("AppConnection", &good, None).unwrap();
    check("AppConnection", &good, Some(&good)).unwrap();

    let cases = [
        (
            json!({"app": "a", "credentials": {"x": {"value": "v", "secretKeyRef": {"name": "s", "key": "k"}}}}),
            "spec.credentials.x: needs exactly one source, value or secretKeyRef: more than one is set",
        ),
        (
            json!({"app": "a", "credentials": {"x": {}}}),
            "spec.credentials.x: needs exactly one source, value or secretKeyRef: none is set",
        ),
        (
            json!({"app": "a", "rotation": {"enabled": true, "intervalDays": 0}}),
            "between 1 and 365",
        ),
        (
            json!({"app": "a", "rotation": {"enabled": true, "intervalDays": 400}}),
            "between 1 and 365",
        ),
        (
            json!({"app": "a", "rotation": {"enabled": true}}),
            "intervalDays is required",
        ),
        (
            json!({"app": "a", "rotation": {"enabled": true, "intervalDays": 3, "rotateAtUtc": {"hours": 24, "minutes": 0}}}),
            "between 0 and 23",
        ),
        (
            json!({"app": "a", "rotation": {"enabled": true, "intervalDays": 3, "rotateAtUtc": {"hours": 1, "minutes": 60}}}),
            "between 0 and 59",
        ),
    ];
    for (spec, expected) in cases {
        let err =
            check("AppConnection", &connection(spec.clone()), None).expect_err(&spec.to_string());
        assert!(err.contains(expected), "{spec}: {err}");
    }

    for (field, changed) in [
        ("app", json!("postgres")),
        ("method", json!("other")),
        ("connectionName", json!("other")),
        ("project", json!("other")),
        (
            "backendRef",
            json!({"kind": "ConnectionBackend", "name": "b"}),
        ),
    ] {
        let mut new = good.clone();
        new["spec"][field] = changed;
        let err = check("AppConnection", &new, Some(&good)).expect_err(field);
        assert!(err.contains("delete and recreate"), "{field}: {err}");
    }
    let mut removed = good.clone();
    removed["spec"].as_object_mut().unwrap().remove("project");
    assert!(
        check("AppConnection", &removed, Some(&good))
            .unwrap_err()
            .contains("spec.project is immutable")
    );
    let mut described = good.clone();
    described["spec"]["description"] = json!("a new description is fine");
    check("AppConnection", &described, Some(&good)).unwrap();
}

fn backend(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": "appconn.io/v1alpha1", "kind": kind, "metadata": {"name": "b"}, "spec": spec})
}

#[test]
fn backend_rules_accept_good_and_reject_bad() {
    let sel = |ns: Option<&str>| {
        let mut r = json!({"secretKeyRef": {"name": "s", "key": "k"}});
        if let Some(ns) = ns {
            r["secretKeyRef"]["namespace"] = json!(ns);
        }
        r
    };
    let infisical = |ns: Option<&str>| json!({"infisical": {"url": "https://i", "auth": {"universalAuth": {"clientId": sel(ns), "clientSecret": sel(ns)}}}});
    check(
        "ConnectionBackend",
        &backend("ConnectionBackend", json!({"builtin": {}})),
        None,
    )
    .unwrap();
    check(
        "ConnectionBackend",
        &backend("ConnectionBackend", infisical(None)),
        None,
    )
    .unwrap();
    check(
        "ClusterConnectionBackend",
        &backend("ClusterConnectionBackend", infisical(Some("ops"))),
        None,
    )
    .unwrap();
    check(
        "ClusterConnectionBackend",
        &backend(
            "ClusterConnectionBackend",
            json!({"credible": {"url": "u", "project": "p"}}),
        ),
        None,
    )
    .unwrap();

    let err = check(
        "ConnectionBackend",
        &backend("ConnectionBackend", json!({})),
        None,
    )
    .unwrap_err();
    assert!(err.contains("exactly one provider"), "{err}");
    let mut two = infisical(None);
    two["builtin"] = json!({});
    assert!(
        check(
            "ConnectionBackend",
            &backend("ConnectionBackend", two),
            None
        )
        .unwrap_err()
        .contains("exactly one provider")
    );
    let err = check(
        "ClusterConnectionBackend",
        &backend("ClusterConnectionBackend", infisical(None)),
        None,
    )
    .unwrap_err();
    assert!(err.contains("must name its namespace"), "{err}");
    let err = check(
        "ConnectionBackend",
        &backend("ConnectionBackend", infisical(Some("ops"))),
        None,
    )
    .unwrap_err();
    assert!(err.contains("own namespace"), "{err}");
    let cred = json!({"credible": {"url": "u", "project": "p", "token": sel(None)}});
    assert!(
        check(
            "ClusterConnectionBackend",
            &backend("ClusterConnectionBackend", cred),
            None
        )
        .unwrap_err()
        .contains("must name its namespace")
    );
    let rl = json!({"builtin": {}, "rateLimit": {"requestsPerSecond": 0}});
    assert!(
        check("ConnectionBackend", &backend("ConnectionBackend", rl), None)
            .unwrap_err()
            .contains("requestsPerSecond")
    );
    // The derived types agree with the rules' view of the objects.
    let _: ConnectionBackend =
        serde_json::from_value(backend("ConnectionBackend", json!({"builtin": {}}))).unwrap();
    let _: ClusterConnectionBackend =
        serde_json::from_value(backend("ClusterConnectionBackend", infisical(Some("ops"))))
            .unwrap();
}
