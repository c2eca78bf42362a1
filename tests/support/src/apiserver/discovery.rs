//! Legacy (unaggregated) discovery documents, which kubectl and `kube::Discovery` read.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::resource::compare_versions;
use super::store::State;

pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": "v1.34.0",
        "gitCommit": "appconn-test-apiserver",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub(crate) fn core_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

pub(crate) fn groups(state: &State) -> Value {
    let mut by_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in state.defs.values().filter(|d| !d.group.is_empty()) {
        let versions = by_group.entry(&d.group).or_default();
        if !versions.contains(&d.version.as_str()) {
            versions.push(&d.version);
        }
    }
    let groups: Vec<Value> = by_group
        .into_iter()
        .map(|(group, mut versions)| {
            versions.sort_by(|a, b| compare_versions(a, b));
            let gv = |v: &str| json!({"groupVersion": format!("{group}/{v}"), "version": v});
            json!({
                "name": group,
                "versions": versions.iter().map(|v| gv(v)).collect::<Vec<_>>(),
                "preferredVersion": gv(versions[0]),
            })
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The APIResourceList of one group/version, or `None` when nothing is served there.
pub(crate) fn resources(state: &State, group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for d in state
        .defs
        .values()
        .filter(|d| d.group == group && d.version == version)
    {
        let mut r = Map::new();
        r.insert("name".into(), json!(d.plural));
        r.insert("singularName".into(), json!(d.singular));
        r.insert("namespaced".into(), json!(d.namespaced));
        r.insert("kind".into(), json!(d.kind));
        r.insert("verbs".into(), json!(d.verbs));
        if !d.short_names.is_empty() {
            r.insert("shortNames".into(), json!(d.short_names));
        }
        if !d.categories.is_empty() {
            r.insert("categories".into(), json!(d.categories));
        }
        list.push(Value::Object(r));
        for sub in &d.subresources {
            let verbs: &[&str] = if *sub == "finalize" {
                &["update"]
            } else {
                &["get", "patch", "update"]
            };
            list.push(json!({
                "name": format!("{}/{sub}", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": verbs,
            }));
        }
    }
    if list.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": list}),
    )
}

fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 index. kubectl reads it to learn that PATCH takes `fieldValidation`, so it
/// can validate server-side instead of downloading full schemas.
pub(crate) fn openapi_root(state: &State) -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(&str, &str)> = state
        .defs
        .values()
        .map(|d| (d.group.as_str(), d.version.as_str()))
        .collect();
    gvs.dedup();
    for (g, v) in gvs {
        let doc = openapi_group_version(state, g, v);
        let hash = hex::encode(Sha256::digest(doc.to_string().as_bytes()));
        let path = group_version_path(g, v);
        paths.insert(
            path.clone(),
            json!({
                "serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash.to_uppercase())
            }),
        );
    }
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document for one group/version: paths with their group-version-kind
/// and query parameters, no schemas.
pub(crate) fn openapi_group_version(state: &State, group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string"}});
    let params = json!([
        param("dryRun"),
        param("fieldManager"),
        param("fieldValidation"),
        param("force")
    ]);
    for d in state
        .defs
        .values()
        .filter(|d| d.group == group && d.version == version)
    {
        let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
        let base = if d.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}",
                group_version_path(group, version),
                d.plural
            )
        } else {
            format!("/{}/{}", group_version_path(group, version), d.plural)
        };
        let op = json!({"x-kubernetes-group-version-kind": gvk, "parameters": params,
                        "responses": {"200": {"description": "OK"}}});
        paths.insert(base.clone(), json!({"post": op, "get": op}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op, "put": op, "patch": op, "delete": op}),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.34.0"},
        "paths": paths,
    })
}
