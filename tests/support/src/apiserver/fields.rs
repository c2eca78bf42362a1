//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Ownership is tracked as sets of leaf paths per (manager, operation, subresource), encoded as
//! `FieldsV1`. Lists are atomic unless the schema says `x-kubernetes-list-type: set|map`;
//! `metadata.finalizers` is a set and `metadata.ownerReferences` a map keyed by `uid`, as in
//! the real server.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Elem {
    Field(String),
    /// `k:{...}`: an item of an associative list, by its key fields as canonical JSON.
    Key(String),
    /// `v:...`: an item of a set list, by its canonical JSON.
    Value(String),
}

pub(crate) type Path = Vec<Elem>;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ListType {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// Which part of an object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    All,
    /// The main resource of a kind with a status subresource: everything but `status`.
    Main,
    /// The `status` subresource.
    Status,
}

const SYSTEM_META: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// List and map semantics of a resource's fields.
pub(crate) struct Types<'a> {
    pub schema: Option<&'a Value>,
}

impl Types<'_> {
    fn schema_node(&self, path: &[Elem]) -> Option<&Value> {
        let mut node = self.schema?;
        for e in path {
            node = match e {
                Elem::Field(f) => node
                    .get("properties")
                    .and_then(|p| p.get(f))
                    .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))?,
                Elem::Key(_) | Elem::Value(_) => node.get("items")?,
            };
        }
        Some(node)
    }

    pub fn list_type(&self, path: &[Elem]) -> ListType {
        if let [Elem::Field(a), Elem::Field(b)] = path
            && a == "metadata"
        {
            return match b.as_str() {
                "finalizers" => ListType::Set,
                "ownerReferences" => ListType::Map(vec!["uid".into()]),
                _ => ListType::Atomic,
            };
        }
        let Some(node) = self.schema_node(path) else {
            return ListType::Atomic;
        };
        match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListType::Set,
            Some("map") => ListType::Map(
                node.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| {
                        k.iter()
                            .filter_map(|k| k.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            _ => ListType::Atomic,
        }
    }

    fn atomic_map(&self, path: &[Elem]) -> bool {
        self.schema_node(path)
            .and_then(|n| n.get("x-kubernetes-map-type"))
            .and_then(Value::as_str)
            == Some("atomic")
    }
}

fn key_of(item: &Value, keys: &[String]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "{}:{}",
                json!(k),
                item.get(k).cloned().unwrap_or(Value::Null)
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// Whether `v` serialises to exactly `json` (how set items are identified).
fn json_is(v: &Value, json: &str) -> bool {
    serde_json::to_string(v).is_ok_and(|s| s == json)
}

fn item_matches_key(item: &Value, key: &str) -> bool {
    let Ok(Value::Object(k)) = serde_json::from_str::<Value>(key) else {
        return false;
    };
    k.iter()
        .all(|(f, v)| item.get(f).unwrap_or(&Value::Null) == v)
}

/// The paths a value owns when written whole: scalars, atomic lists and empty maps, plus set
/// items and associative-list items with their fields.
pub(crate) fn leaves(obj: &Value, types: &Types, scope: Scope) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        if !in_scope(k, scope) {
            continue;
        }
        let mut path = vec![Elem::Field(k.clone())];
        if k == "metadata" {
            if let Some(m) = v.as_object() {
                for (mk, mv) in m {
                    if SYSTEM_META.contains(&mk.as_str()) {
                        continue;
                    }
                    path.push(Elem::Field(mk.clone()));
                    collect(mv, &mut path, types, &mut out);
                    path.pop();
                }
            }
            continue;
        }
        collect(v, &mut path, types, &mut out);
    }
    out
}

fn in_scope(top: &str, scope: Scope) -> bool {
    if top == "apiVersion" || top == "kind" {
        return false;
    }
    match scope {
        Scope::All => true,
        Scope::Main => top != "status",
        Scope::Status => top == "status",
    }
}

fn collect(v: &Value, path: &mut Path, types: &Types, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() && !types.atomic_map(path) => {
            for (k, child) in m {
                path.push(Elem::Field(k.clone()));
                collect(child, path, types, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match types.list_type(path) {
            ListType::Atomic => {
                out.insert(path.clone());
            }
            ListType::Set => {
                for item in items {
                    path.push(Elem::Value(item.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Map(keys) => {
                for item in items {
                    path.push(Elem::Key(key_of(item, &keys)));
                    out.insert(path.clone());
                    if let Some(fields) = item.as_object() {
                        for (k, child) in fields {
                            path.push(Elem::Field(k.clone()));
                            collect(child, path, types, out);
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

pub(crate) fn value_at<'a>(obj: &'a Value, path: &[Elem]) -> Option<&'a Value> {
    let mut cur = obj;
    for e in path {
        cur = match e {
            Elem::Field(f) => cur.as_object()?.get(f)?,
            Elem::Key(k) => cur.as_array()?.iter().find(|i| item_matches_key(i, k))?,
            Elem::Value(v) => cur.as_array()?.iter().find(|i| json_is(i, v))?,
        };
    }
    Some(cur)
}

fn remove_at(obj: &mut Value, path: &[Elem]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for e in parent_path {
        let next = match e {
            Elem::Field(f) => cur.as_object_mut().and_then(|m| m.get_mut(f)),
            Elem::Key(k) => cur
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| item_matches_key(i, k))),
            Elem::Value(v) => cur
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| json_is(i, v))),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Elem::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        Elem::Key(k) => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| !item_matches_key(i, k));
            }
        }
        Elem::Value(v) => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| !json_is(i, v));
            }
        }
    }
}

/// Every path in `set` plus all their ancestors.
fn closure(set: &BTreeSet<Path>) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    for p in set {
        for n in 1..=p.len() {
            out.insert(p[..n].to_vec());
        }
    }
    out
}

fn merge(live: Option<&Value>, config: &Value, path: &mut Path, types: &Types) -> Value {
    match (live, config) {
        (Some(Value::Object(l)), Value::Object(c)) if !types.atomic_map(path) => {
            let mut out = l.clone();
            for (k, cv) in c {
                if cv.is_null() {
                    out.remove(k);
                    continue;
                }
                path.push(Elem::Field(k.clone()));
                let merged = merge(l.get(k), cv, path, types);
                path.pop();
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Some(Value::Array(l)), Value::Array(c)) => match types.list_type(path) {
            ListType::Atomic => config.clone(),
            ListType::Set => {
                let mut out = l.clone();
                for item in c {
                    if !out.contains(item) {
                        out.push(item.clone());
                    }
                }
                Value::Array(out)
            }
            ListType::Map(keys) => {
                let mut out = l.clone();
                for item in c {
                    let key = key_of(item, &keys);
                    path.push(Elem::Key(key.clone()));
                    match out.iter().position(|i| key_of(i, &keys) == key) {
                        Some(idx) => {
                            let merged = merge(Some(&out[idx]), item, path, types);
                            out[idx] = merged;
                        }
                        None => out.push(item.clone()),
                    }
                    path.pop();
                }
                Value::Array(out)
            }
        },
        _ => strip_nulls(config),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: BTreeSet<Path>,
}

impl Entry {
    fn is(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }

    fn describe(&self) -> String {
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!(" with subresource {:?}", self.subresource)
        };
        format!(
            "conflict with {:?}{sub} using {}",
            self.manager, self.api_version
        )
    }
}

pub(crate) fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                decode(f, &mut Vec::new(), &mut fields);
            }
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                subresource: s("subresource"),
                fields,
            }
        })
        .collect()
}

pub(crate) fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), json!(e.manager));
            m.insert("operation".into(), json!(e.operation));
            m.insert("apiVersion".into(), json!(e.api_version));
            m.insert("time".into(), json!(e.time));
            m.insert("fieldsType".into(), json!("FieldsV1"));
            m.insert("fieldsV1".into(), encode(&e.fields));
            if !e.subresource.is_empty() {
                m.insert("subresource".into(), json!(e.subresource));
            }
            Value::Object(m)
        })
        .collect();
    let meta = super::meta::meta_mut(obj);
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn elem_key(e: &Elem) -> String {
    match e {
        Elem::Field(f) => format!("f:{f}"),
        Elem::Key(k) => format!("k:{k}"),
        Elem::Value(v) => format!("v:{v}"),
    }
}

fn encode(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in set {
        let mut node = &mut root;
        for e in p {
            node = node
                .entry(elem_key(e))
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("fieldsV1 nodes are objects");
        }
        node.insert(".".into(), json!({}));
    }
    // A node owned only by itself is written `{}`, not `{".":{}}`.
    fn tidy(v: &mut Value) {
        if let Some(m) = v.as_object_mut() {
            if m.len() == 1 && m.contains_key(".") {
                m.clear();
            }
            for child in m.values_mut() {
                tidy(child);
            }
        }
    }
    let mut out = Value::Object(root);
    tidy(&mut out);
    out
}

fn decode(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(m) = v.as_object() else {
        return;
    };
    if m.is_empty() && !path.is_empty() {
        out.insert(path.clone());
        return;
    }
    for (k, child) in m {
        if k == "." {
            out.insert(path.clone());
            continue;
        }
        let elem = if let Some(f) = k.strip_prefix("f:") {
            Elem::Field(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            Elem::Key(key.to_string())
        } else if let Some(val) = k.strip_prefix("v:") {
            Elem::Value(val.to_string())
        } else {
            continue;
        };
        path.push(elem);
        decode(child, path, out);
        path.pop();
    }
}

/// A path as the real server prints it in conflict messages.
pub(crate) fn display_path(p: &[Elem]) -> String {
    let mut s = String::new();
    for e in p {
        match e {
            Elem::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Elem::Key(k) => {
                let inner = serde_json::from_str::<Value>(k)
                    .ok()
                    .and_then(|v| v.as_object().cloned())
                    .map(|m| {
                        m.iter()
                            .map(|(f, v)| format!("{f}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                s.push_str(&format!("[{inner}]"));
            }
            Elem::Value(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

/// Who made a write, for ownership bookkeeping.
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    pub subresource: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Ownership after a non-apply write: changed fields move to the writer, vanished ones are
/// forgotten.
pub(crate) fn record_update(
    mut entries: Vec<Entry>,
    old: Option<&Value>,
    new: &Value,
    writer: &Writer,
    types: &Types,
    scope: Scope,
) -> Vec<Entry> {
    let changed: BTreeSet<Path> = leaves(new, types, scope)
        .into_iter()
        .filter(|p| {
            let before = old.and_then(|o| value_at(o, p));
            match p.last() {
                Some(Elem::Key(_)) => before.is_none(),
                _ => before != value_at(new, p),
            }
        })
        .collect();
    for e in &mut entries {
        if !e.is(writer.manager, "Update", writer.subresource) {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.is(writer.manager, "Update", writer.subresource))
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = writer.now.to_string();
                e.api_version = writer.api_version.to_string();
            }
            None => entries.push(Entry {
                manager: writer.manager.to_string(),
                operation: "Update".into(),
                api_version: writer.api_version.to_string(),
                time: writer.now.to_string(),
                subresource: writer.subresource.to_string(),
                fields: changed,
            }),
        }
    }
    for e in &mut entries {
        e.fields.retain(|p| value_at(new, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
    entries
}

/// A server-side apply that another manager's fields stand in the way of.
#[derive(Debug)]
pub(crate) struct Conflicts(pub Vec<(Entry, Path)>);

impl Conflicts {
    pub fn message(&self) -> String {
        let n = self.0.len();
        if let [(e, p)] = self.0.as_slice() {
            return format!(
                "Apply failed with 1 conflict: {}: {}",
                e.describe(),
                display_path(p)
            );
        }
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for (e, p) in &self.0 {
            let d = e.describe().replacen("conflict with", "conflicts with", 1);
            match groups.iter_mut().find(|(g, _)| *g == d) {
                Some((_, paths)) => paths.push(display_path(p)),
                None => groups.push((d, vec![display_path(p)])),
            }
        }
        let body: Vec<String> = groups
            .iter()
            .map(|(d, paths)| {
                let lines: Vec<String> = paths.iter().map(|p| format!("- {p}")).collect();
                format!("{d}:\n{}", lines.join("\n"))
            })
            .collect();
        format!("Apply failed with {n} conflicts: {}", body.join("\n"))
    }

    pub fn causes(&self) -> Vec<Value> {
        self.0
            .iter()
            .map(|(e, p)| {
                json!({"type": "FieldManagerConflict", "message": e.describe(),
                       "field": display_path(p)})
            })
            .collect()
    }
}

/// Server-side apply of `config` onto `live` by `writer`; returns the merged object and the
/// new ownership, or the conflicts when not forced.
pub(crate) fn apply(
    live: &Value,
    config: &Value,
    mut entries: Vec<Entry>,
    writer: &Writer,
    force: bool,
    types: &Types,
    scope: Scope,
) -> Result<(Value, Vec<Entry>), Conflicts> {
    let mut scoped = Map::new();
    if let Some(c) = config.as_object() {
        for (k, v) in c {
            if k == "metadata" {
                let meta: Map<String, Value> = v
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| !SYSTEM_META.contains(&k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !meta.is_empty() && scope != Scope::Status {
                    scoped.insert(k.clone(), Value::Object(meta));
                }
            } else if in_scope(k, scope) {
                scoped.insert(k.clone(), v.clone());
            }
        }
    }
    let scoped = Value::Object(scoped);
    let new_set = leaves(&scoped, types, scope);
    let mut merged = merge(Some(live), &scoped, &mut Vec::new(), types);

    let mine = |e: &Entry| e.is(writer.manager, "Apply", writer.subresource);
    let prev_set = entries
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: BTreeSet<Path> = entries
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others = closure(&others);
    let new_closure = closure(&new_set);
    let mut dropped: Vec<Path> = closure(&prev_set)
        .into_iter()
        .filter(|p| !new_closure.contains(p) && !others.contains(p))
        .filter(|p| p.as_slice() != [Elem::Field("metadata".into())])
        .collect();
    dropped.sort_by_key(Vec::len);
    for p in &dropped {
        remove_at(&mut merged, p);
    }

    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| !mine(e)) {
        for p in &e.fields {
            let before = value_at(live, p);
            let after = value_at(&merged, p);
            let changed = match (p.last(), before, after) {
                (Some(Elem::Key(_) | Elem::Value(_)), _, after) => after.is_none(),
                (_, Some(Value::Object(b)), Some(Value::Object(_))) if b.is_empty() => false,
                _ => before != after,
            };
            if changed {
                conflicts.push((e.clone(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        if !force {
            return Err(Conflicts(conflicts));
        }
        for (c, p) in &conflicts {
            if let Some(e) = entries
                .iter_mut()
                .find(|e| e.is(&c.manager, &c.operation, &c.subresource))
            {
                e.fields.remove(p);
            }
        }
    }
    match entries.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            if e.fields != new_set {
                e.time = writer.now.to_string();
            }
            e.fields = new_set;
            e.api_version = writer.api_version.to_string();
        }
        None => entries.push(Entry {
            manager: writer.manager.to_string(),
            operation: "Apply".into(),
            api_version: writer.api_version.to_string(),
            time: writer.now.to_string(),
            subresource: writer.subresource.to_string(),
            fields: new_set,
        }),
    }
    for e in &mut entries {
        e.fields.retain(|p| value_at(&merged, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty() || mine(e));
    Ok((merged, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_SCHEMA: Types = Types { schema: None };

    fn writer(m: &'static str) -> Writer<'static> {
        Writer {
            manager: m,
            subresource: "",
            api_version: "v1",
            now: "2026-01-01T00:00:00Z",
        }
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["x/y"]},
                         "spec": {"n": 1, "list": [1, 2], "empty": {}}});
        let set = leaves(&obj, &NO_SCHEMA, Scope::All);
        let encoded = encode(&set);
        assert_eq!(
            encoded,
            json!({"f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {"v:\"x/y\"": {}}},
                   "f:spec": {"f:n": {}, "f:list": {}, "f:empty": {}}})
        );
        let mut back = BTreeSet::new();
        decode(&encoded, &mut Vec::new(), &mut back);
        assert_eq!(back, set);
    }

    #[test]
    fn apply_conflicts_and_force() {
        let live = json!({"spec": {"a": 1}});
        let entries = record_update(vec![], None, &live, &writer("b"), &NO_SCHEMA, Scope::All);
        let config = json!({"spec": {"a": 2, "c": 3}});
        let err = apply(
            &live,
            &config,
            entries.clone(),
            &writer("a"),
            false,
            &NO_SCHEMA,
            Scope::All,
        )
        .unwrap_err();
        assert_eq!(
            err.message(),
            "Apply failed with 1 conflict: conflict with \"b\" using v1: .spec.a"
        );
        let (merged, entries) = apply(
            &live,
            &config,
            entries,
            &writer("a"),
            true,
            &NO_SCHEMA,
            Scope::All,
        )
        .unwrap();
        assert_eq!(merged, json!({"spec": {"a": 2, "c": 3}}));
        assert_eq!(entries.len(), 1, "b lost its only field");
    }

    #[test]
    fn apply_same_value_shares_and_dropping_removes() {
        let live = json!({"spec": {"a": 1}});
        let entries = record_update(vec![], None, &live, &writer("b"), &NO_SCHEMA, Scope::All);
        let (merged, entries) = apply(
            &live,
            &json!({"spec": {"a": 1, "x": {"y": 1}}}),
            entries,
            &writer("a"),
            false,
            &NO_SCHEMA,
            Scope::All,
        )
        .unwrap();
        let (merged, _) = apply(
            &merged,
            &json!({"spec": {"a": 1}}),
            entries,
            &writer("a"),
            false,
            &NO_SCHEMA,
            Scope::All,
        )
        .unwrap();
        assert_eq!(merged, json!({"spec": {"a": 1}}));
    }

    #[test]
    fn map_lists_merge_by_key() {
        let schema = json!({"properties": {"status": {"properties": {"conditions": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {"type": "object"}}}}}});
        let types = Types {
            schema: Some(&schema),
        };
        let live = json!({"status": {"conditions": [{"type": "A", "status": "True"}]}});
        let entries = record_update(vec![], None, &live, &writer("b"), &types, Scope::All);
        let (merged, _) = apply(
            &live,
            &json!({"status": {"conditions": [{"type": "B", "status": "False"}]}}),
            entries,
            &writer("a"),
            false,
            &types,
            Scope::All,
        )
        .unwrap();
        assert_eq!(merged["status"]["conditions"].as_array().unwrap().len(), 2);
    }
}
