//! Runs the health checks of deploy/argocd/, the files users paste into Argo CD's `argocd-cm`,
//! on sample AppConnections and backends and checks the health status and message Argo CD
//! would show for each.

use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Table};

const SCRIPT: &str = include_str!("../deploy/argocd/appconnection.lua");
const BACKEND_SCRIPT: &str = include_str!("../deploy/argocd/connectionbackend.lua");

/// The argocd-cm key of each kind and the script it holds.
const KEYS: [(&str, &str); 3] = [
    (
        "resource.customizations.health.appconn.io_AppConnection",
        SCRIPT,
    ),
    (
        "resource.customizations.health.appconn.io_ConnectionBackend",
        BACKEND_SCRIPT,
    ),
    (
        "resource.customizations.health.appconn.io_ClusterConnectionBackend",
        BACKEND_SCRIPT,
    ),
];

/// Evaluates the health script the way Argo CD does: the object as the global `obj` (JSON null
/// becomes nil), only the base and table libraries loaded, and the returned table read for
/// `status` and `message`.
fn health(object_yaml: &str) -> (String, String) {
    run(SCRIPT, object_yaml)
}

fn run(script: &str, object_yaml: &str) -> (String, String) {
    let object: serde_json::Value =
        serde_yaml::from_str(object_yaml).expect("sample is valid YAML");
    let lua = Lua::new_with(StdLib::TABLE, LuaOptions::default()).expect("Lua starts");
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let obj = lua
        .to_value_with(&object, options)
        .expect("object converts to Lua");
    lua.globals().set("obj", obj).expect("obj is set");
    let result: Table = lua
        .load(script)
        .set_name("health check")
        .eval()
        .expect("the health check runs and returns a table");
    let status: String = result.get("status").expect("hs.status is a string");
    let message: String = result.get("message").expect("hs.message is a string");
    (status, message)
}

fn assert_health(object_yaml: &str, status: &str, message: &str) {
    let (got_status, got_message) = health(object_yaml);
    assert_eq!(
        (got_status.as_str(), got_message.as_str()),
        (status, message),
        "for object:\n{object_yaml}"
    );
}

#[test]
fn new_object_without_status_is_progressing() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 1}
spec: {app: mssql}
"#,
        "Progressing",
        "Waiting for the operator to reconcile this AppConnection",
    );
}

#[test]
fn null_status_is_progressing() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 1}
spec: {app: mssql}
status: null
"#,
        "Progressing",
        "Waiting for the operator to reconcile this AppConnection",
    );
}

#[test]
fn status_without_observed_generation_is_progressing() {
    // Even a Ready=True cannot be trusted when the status does not say which spec it describes.
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 1}
spec: {app: mssql}
status:
  conditions:
  - {type: Ready, status: "True", reason: Synced, message: Connection is in sync}
"#,
        "Progressing",
        "Waiting for the operator to reconcile this AppConnection",
    );
}

#[test]
fn ready_left_over_from_an_older_generation_is_progressing() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 3}
spec: {app: mssql}
status:
  observedGeneration: 2
  conditions:
  - {type: Ready, status: "True", reason: Synced, message: Connection is in sync, observedGeneration: 2}
"#,
        "Progressing",
        "Waiting for the operator to reconcile generation 3 (last reconciled: 2)",
    );
}

#[test]
fn ready_condition_of_an_older_generation_is_progressing() {
    // status.observedGeneration moved on but the Ready condition was not rewritten yet.
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 5}
spec: {app: mssql}
status:
  observedGeneration: 5
  conditions:
  - {type: Ready, status: "True", reason: Synced, message: Connection is in sync, observedGeneration: 4}
"#,
        "Progressing",
        "Waiting for the Ready condition of generation 5",
    );
}

#[test]
fn observed_without_ready_condition_is_progressing() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 2}
spec: {app: mssql}
status:
  observedGeneration: 2
  conditions: []
"#,
        "Progressing",
        "Waiting for the Ready condition of generation 2",
    );
}

#[test]
fn ready_for_the_current_generation_is_healthy() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 4}
spec: {app: mssql, suspend: false}
status:
  id: 3c90c3cc-0d44-4b50-8888-8dd25736052a
  observedGeneration: 4
  conditions:
  - type: Ready
    status: "True"
    reason: Synced
    message: Connection warehouse-prod is in sync with infisical-prod
    observedGeneration: 4
    lastTransitionTime: "2026-11-26T10:00:00Z"
"#,
        "Healthy",
        "Connection warehouse-prod is in sync with infisical-prod",
    );
}

#[test]
fn ready_condition_is_found_among_others() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 1}
spec: {app: mssql}
status:
  observedGeneration: 1
  conditions:
  - {type: RotationDue, status: "False", reason: Scheduled, message: next rotation in 30 days}
  - {type: Ready, status: "True", reason: Synced, message: Connection is in sync}
"#,
        "Healthy",
        "Connection is in sync",
    );
}

#[test]
fn missing_secret_is_degraded_with_the_condition_message() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 2}
spec: {app: mssql}
status:
  observedGeneration: 2
  conditions:
  - type: Ready
    status: "False"
    reason: SecretNotFound
    message: Secret analytics/mssql (credentials.password) does not exist
    observedGeneration: 2
"#,
        "Degraded",
        "Secret analytics/mssql (credentials.password) does not exist",
    );
}

#[test]
fn unknown_readiness_after_observation_is_degraded() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 7}
spec: {app: mssql, backendRef: {kind: ClusterConnectionBackend, name: infisical-prod}}
status:
  observedGeneration: 7
  conditions:
  - type: Ready
    status: Unknown
    reason: BackendUnavailable
    message: "infisical-prod: 503 Service Unavailable, retrying in 8s"
    observedGeneration: 7
"#,
        "Degraded",
        "infisical-prod: 503 Service Unavailable, retrying in 8s",
    );
}

#[test]
fn degraded_without_message_falls_back_to_the_reason() {
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 1}
spec: {app: mssql}
status:
  observedGeneration: 1
  conditions:
  - {type: Ready, status: "False", reason: AlreadyExists, message: ""}
"#,
        "Degraded",
        "AlreadyExists",
    );
}

#[test]
fn suspended_object_is_suspended_whatever_its_status() {
    // A spec change to suspend: true bumps the generation; the application must still show
    // Suspended rather than Progressing forever.
    assert_health(
        r#"
apiVersion: appconn.io/v1alpha1
kind: AppConnection
metadata: {name: warehouse, namespace: analytics, generation: 9}
spec: {app: mssql, suspend: true}
status:
  observedGeneration: 8
  conditions:
  - {type: Ready, status: "False", reason: BackendRejected, message: name is taken}
"#,
        "Suspended",
        "Reconciliation is suspended (spec.suspend: true)",
    );
}

/// Argo CD evaluates health checks with gopher-lua, a Lua 5.1: the tests above run Lua 5.4, so
/// this keeps the script off the syntax 5.1 lacks (integer division, bitwise operators, goto).
#[test]
fn scripts_stick_to_lua_5_1_syntax() {
    for (line_number, line) in SCRIPT.lines().chain(BACKEND_SCRIPT.lines()).enumerate() {
        let code = line.split("--").next().unwrap_or_default();
        for token in ["//", "<<", ">>", "&", "|", "goto", "::"] {
            assert!(
                !code.contains(token),
                "line {}: `{token}` is not Lua 5.1: {line}",
                line_number + 1
            );
        }
        let without_not_equal = code.replace("~=", "");
        assert!(
            !without_not_equal.contains('~'),
            "line {}: `~` (bitwise) is not Lua 5.1: {line}",
            line_number + 1
        );
    }
}

/// The installation docs embed the scripts in an `argocd-cm` example; each copy must be its file,
/// and the example must show all three kinds.
#[test]
fn documented_argocd_cm_snippet_is_the_scripts() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let first_key = KEYS[0].0;
    let key_at = readme
        .find(&format!("  {first_key}: |"))
        .expect("the README shows the argocd-cm snippet");
    let block_start = readme[..key_at]
        .rfind("```yaml\n")
        .expect("snippet in a yaml block")
        + 8;
    let block_end = key_at + readme[key_at..].find("```").expect("yaml block is closed");
    let config_map: serde_yaml::Value =
        serde_yaml::from_str(&readme[block_start..block_end]).expect("snippet is YAML");
    assert_eq!(config_map["metadata"]["name"].as_str(), Some("argocd-cm"));
    for (key, script) in KEYS {
        let embedded = config_map["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("no script under {key}"));
        assert_eq!(embedded, script, "the README's {key} differs from its file");
    }
    assert!(
        !readme.contains("docs/install.md") && !SCRIPT.contains("docs/install.md"),
        "points to a file that does not exist"
    );
}

fn backend(status_yaml: &str) -> String {
    format!(
        "apiVersion: appconn.io/v1alpha1\nkind: ClusterConnectionBackend\n\
         metadata: {{name: infisical-prod, generation: 2}}\nspec: {{builtin: {{}}}}\n{status_yaml}"
    )
}

#[test]
fn backends_progress_until_checked_at_their_generation() {
    for status in ["", "status: null\n", "status: {type: infisical}\n"] {
        assert_eq!(
            run(BACKEND_SCRIPT, &backend(status)),
            (
                "Progressing".to_string(),
                "Waiting for the operator to check this backend".to_string()
            ),
            "{status}"
        );
    }
    let older = backend(
        "status:\n  observedGeneration: 1\n  conditions:\n  - {type: Ready, status: \"True\", \
         reason: Synced, message: fine, observedGeneration: 1}\n",
    );
    assert_eq!(
        run(BACKEND_SCRIPT, &older),
        (
            "Progressing".to_string(),
            "Waiting for the operator to check generation 2 (last checked: 1)".to_string()
        )
    );
}

#[test]
fn backends_are_healthy_when_ready_and_degraded_with_the_reason_otherwise() {
    let ready = backend(
        "status:\n  observedGeneration: 2\n  conditions:\n  - {type: Ready, status: \"True\", \
         reason: Synced, message: infisical accepted the credentials and is healthy, \
         observedGeneration: 2}\n",
    );
    assert_eq!(
        run(BACKEND_SCRIPT, &ready),
        (
            "Healthy".to_string(),
            "infisical accepted the credentials and is healthy".to_string()
        )
    );
    let refused = backend(
        "status:\n  observedGeneration: 2\n  conditions:\n  - {type: Ready, status: \"False\", \
         reason: BackendAuthFailed, message: 'authentication failed: Universal Auth login refused', \
         observedGeneration: 2}\n",
    );
    assert_eq!(
        run(BACKEND_SCRIPT, &refused),
        (
            "Degraded".to_string(),
            "authentication failed: Universal Auth login refused".to_string()
        )
    );
    let unexplained = backend(
        "status:\n  observedGeneration: 2\n  conditions:\n  - {type: Ready, status: Unknown, \
         reason: BackendUnavailable, observedGeneration: 2}\n",
    );
    assert_eq!(
        run(BACKEND_SCRIPT, &unexplained),
        ("Degraded".to_string(), "BackendUnavailable".to_string())
    );
}
