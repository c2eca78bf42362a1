//! Runs deploy/argocd/health.lua, the file users paste into Argo CD's `argocd-cm`, on sample
//! AppConnections and checks the health status and message Argo CD would show for each.

use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Table};

const SCRIPT: &str = include_str!("../deploy/argocd/health.lua");

/// Evaluates the health script the way Argo CD does: the object as the global `obj` (JSON null
/// becomes nil), only the base and table libraries loaded, and the returned table read for
/// `status` and `message`.
fn health(object_yaml: &str) -> (String, String) {
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
        .load(SCRIPT)
        .set_name("health.lua")
        .eval()
        .expect("health.lua runs and returns a table");
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
fn script_sticks_to_lua_5_1_syntax() {
    for (line_number, line) in SCRIPT.lines().enumerate() {
        let code = line.split("--").next().unwrap_or_default();
        for token in ["//", "<<", ">>", "&", "|", "goto", "::"] {
            assert!(
                !code.contains(token),
                "health.lua:{}: `{token}` is not Lua 5.1: {line}",
                line_number + 1
            );
        }
        let without_not_equal = code.replace("~=", "");
        assert!(
            !without_not_equal.contains('~'),
            "health.lua:{}: `~` (bitwise) is not Lua 5.1: {line}",
            line_number + 1
        );
    }
}

/// The installation docs embed the script in an `argocd-cm` example; that copy must be the file.
/// The docs live in docs/install.md or, once merged, in README.md: every one of them that
/// carries the snippet is checked, and at least one must.
#[test]
fn documented_argocd_cm_snippet_is_the_script() {
    const KEY: &str = "resource.customizations.health.appconn.io_AppConnection";
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for doc in ["README.md", "docs/install.md"] {
        let Ok(text) = std::fs::read_to_string(root.join(doc)) else {
            continue;
        };
        let Some(key_at) = text.find(&format!("  {KEY}: |")) else {
            continue;
        };
        let block_start = text[..key_at]
            .rfind("```yaml\n")
            .expect("snippet in a yaml block")
            + 8;
        let block_end = key_at + text[key_at..].find("```").expect("yaml block is closed");
        let config_map: serde_yaml::Value =
            serde_yaml::from_str(&text[block_start..block_end]).expect("snippet is YAML");
        assert_eq!(
            config_map["metadata"]["name"].as_str(),
            Some("argocd-cm"),
            "{doc}"
        );
        let embedded = config_map["data"][KEY]
            .as_str()
            .expect("script under the key");
        assert_eq!(
            embedded, SCRIPT,
            "{doc}: the argocd-cm snippet differs from health.lua"
        );
        checked += 1;
    }
    assert!(checked > 0, "no doc shows the argocd-cm snippet");
}
