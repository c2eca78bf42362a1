//! Structural-schema handling for custom resources: pruning, defaulting, OpenAPI value
//! validation and CEL `x-kubernetes-validations`, in the order the apiextensions server runs
//! them, so a CR the real server would reject is rejected here too.

use std::collections::BTreeSet;
use std::sync::{LazyLock, Mutex};

use kube_cel::cel::ParseErrors;
use kube_cel::{CompilationError, CompiledSchema, Validator, compile_schema};
use regex::Regex;
use serde_json::{Map, Value, json};

use super::cel_types::{Ty, check, decl_type, render_positioned, self_type_name};
use super::error::Cause;

const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// One served version's `openAPIV3Schema`, with its CEL rules compiled once.
pub(crate) struct CrSchema {
    pub root: Value,
    compiled: CompiledSchema,
}

impl std::fmt::Debug for CrSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrSchema").finish_non_exhaustive()
    }
}

static VALIDATOR: LazyLock<Mutex<Validator>> = LazyLock::new(|| Mutex::new(Validator::new()));

impl CrSchema {
    pub fn new(root: &Value) -> CrSchema {
        CrSchema {
            root: root.clone(),
            compiled: compile_schema(root),
        }
    }

    /// Drops fields the schema does not declare and returns their paths for `Warning` headers.
    pub fn prune(&self, obj: &mut Value) -> Vec<String> {
        let mut pruned = Vec::new();
        if let Some(map) = obj.as_object_mut() {
            let props = self.root.get("properties").and_then(Value::as_object);
            let preserve = preserves(&self.root);
            map.retain(|k, v| {
                if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    return true;
                }
                match props.and_then(|p| p.get(k)) {
                    Some(schema) => {
                        if v.is_null() && !nullable(schema) {
                            return false;
                        }
                        prune_value(schema, v, k, &mut pruned);
                        true
                    }
                    None if preserve => true,
                    None => {
                        pruned.push(k.clone());
                        false
                    }
                }
            });
        }
        pruned
    }

    /// Fills schema `default`s, as the server does before validation.
    pub fn apply_defaults(&self, obj: &Value) -> Value {
        kube_cel::apply_defaults(&self.root, obj)
    }

    /// OpenAPI and CEL validation; `old` enables transition rules and ratcheting.
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
        let mut causes = Vec::new();
        let without_meta = |v: &Value| {
            let mut body = v.clone();
            if let Some(m) = body.as_object_mut() {
                m.remove("metadata");
                m.remove("apiVersion");
                m.remove("kind");
            }
            body
        };
        let body = without_meta(obj);
        let old_body = old.map(without_meta);
        let mut root_schema = self.root.clone();
        if let Some(props) = root_schema
            .get_mut("properties")
            .and_then(Value::as_object_mut)
        {
            props.remove("metadata");
            props.remove("apiVersion");
            props.remove("kind");
        }
        if let Some(req) = root_schema
            .get_mut("required")
            .and_then(Value::as_array_mut)
        {
            req.retain(|r| !matches!(r.as_str(), Some("metadata" | "apiVersion" | "kind")));
        }
        validate_value(&root_schema, &body, old_body.as_ref(), "", &mut causes);
        let validator = VALIDATOR.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(errors) = validator.validate_compiled(&self.compiled, obj, old) {
            for e in errors.iter() {
                let field = e.field_path.trim_start_matches('.').to_string();
                let shown = type_name(lookup(obj, &field));
                let cause = match e.reason.as_deref() {
                    Some("FieldValueForbidden") => Cause::forbidden(field, &e.message),
                    Some("FieldValueRequired") => Cause::required(field, &e.message),
                    Some("FieldValueDuplicate") => Cause {
                        reason: "FieldValueDuplicate",
                        body: format!("Duplicate value: {}", e.message),
                        field,
                    },
                    _ => Cause::invalid(field, &json!(shown), &e.message),
                };
                causes.push(cause);
            }
        }
        if let Some(old) = old {
            // Ratcheting: errors on values the update leaves unchanged are not reported.
            causes.retain(|c| {
                let now = lookup(obj, &c.field);
                now.is_none() || now != lookup(old, &c.field)
            });
        }
        causes
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, pruned: &mut Vec<String>) {
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return;
    }
    match value {
        Value::Object(map) => {
            let embedded = schema
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                == Some(true);
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = preserves(schema);
            map.retain(|k, v| {
                if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    return true;
                }
                let child = props
                    .and_then(|p| p.get(k))
                    .or(additional.filter(|a| a.is_object()));
                match child {
                    Some(s) => {
                        if v.is_null() && !nullable(s) {
                            return false;
                        }
                        prune_value(s, v, &join(path, k), pruned);
                        true
                    }
                    None if preserve || additional == Some(&Value::Bool(true)) => true,
                    None => {
                        pruned.push(join(path, k));
                        false
                    }
                }
            });
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(item_schema, item, &format!("{path}[{i}]"), pruned);
                }
            }
        }
        _ => {}
    }
}

fn type_name(v: Option<&Value>) -> &'static str {
    match v {
        Some(Value::Object(_)) | None => "object",
        Some(Value::Array(_)) => "array",
        Some(Value::String(_)) => "string",
        Some(Value::Bool(_)) => "boolean",
        Some(Value::Number(n)) if n.is_f64() => "number",
        Some(Value::Number(_)) => "integer",
        Some(Value::Null) => "null",
    }
}

/// Resolves a path like `spec.items[2].name` in an object.
pub(crate) fn lookup<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    if path.is_empty() {
        return Some(cur);
    }
    for part in path.split('.') {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        for idx in indices.split('[').filter(|s| !s.is_empty()) {
            let idx = idx.trim_end_matches(']');
            cur = match idx.parse::<usize>() {
                Ok(i) => cur.get(i)?,
                Err(_) => cur.get(idx.trim_matches('"'))?,
            };
        }
    }
    Some(cur)
}

fn is_integer(n: &serde_json::Number) -> bool {
    n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
}

static PATTERNS: LazyLock<Mutex<std::collections::HashMap<String, Option<Regex>>>> =
    LazyLock::new(Default::default);

fn pattern_matches(pattern: &str, s: &str) -> bool {
    let mut cache = PATTERNS.lock().unwrap_or_else(|e| e.into_inner());
    let re = cache
        .entry(pattern.to_string())
        .or_insert_with(|| Regex::new(pattern).ok());
    re.as_ref().is_none_or(|re| re.is_match(s))
}

fn in_body(path: &str) -> String {
    if path.is_empty() {
        "body".to_string()
    } else {
        format!("{path} in body")
    }
}

fn validate_value(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if value.is_null() {
        if !nullable(schema) && schema.get("type").is_some() {
            causes.push(Cause::type_invalid(
                path,
                value,
                &format!(
                    "{} must be of type {}",
                    in_body(path),
                    schema["type"].as_str().unwrap_or("")
                ),
            ));
        }
        return;
    }
    if int_or_string {
        let ok = value.is_string() || value.as_number().is_some_and(is_integer);
        if !ok {
            causes.push(Cause::type_invalid(
                path,
                value,
                &format!("{} must be of type integer or string", in_body(path)),
            ));
            return;
        }
    } else if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.as_number().is_some_and(is_integer),
            "number" => value.is_number(),
            _ => true,
        };
        if !ok {
            causes.push(Cause::type_invalid(
                path,
                &json!(type_name(Some(value))),
                &format!(
                    "{} must be of type {t}: {:?}",
                    in_body(path),
                    type_name(Some(value))
                ),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let shown: Vec<String> = allowed
            .iter()
            .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
            .collect();
        causes.push(Cause::unsupported(path, value, &shown));
    }
    match value {
        Value::String(s) => {
            let chars = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooLong",
                    field: path.to_string(),
                    body: format!("Too long: may not be more than {max} bytes"),
                });
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                causes.push(Cause::invalid(
                    path,
                    value,
                    &format!("{} should be at least {min} chars long", in_body(path)),
                ));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && !pattern_matches(p, s)
            {
                causes.push(Cause::invalid(
                    path,
                    value,
                    &format!("{} should match '{p}'", in_body(path)),
                ));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let excl_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            let excl_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && (x > max || (excl_max && x == max))
            {
                let rel = if excl_max {
                    "less than"
                } else {
                    "less than or equal to"
                };
                causes.push(Cause::invalid(
                    path,
                    value,
                    &format!("{} should be {rel} {}", in_body(path), schema["maximum"]),
                ));
            }
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && (x < min || (excl_min && x == min))
            {
                let rel = if excl_min {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                causes.push(Cause::invalid(
                    path,
                    value,
                    &format!("{} should be {rel} {}", in_body(path), schema["minimum"]),
                ));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooMany",
                    field: path.to_string(),
                    body: format!("Too many: {}: must have at most {max} items", items.len()),
                });
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                causes.push(Cause::invalid(
                    path,
                    &json!(items.len()),
                    &format!("{} should have at least {min} items", in_body(path)),
                ));
            }
            match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("set") => {
                    let mut seen = BTreeSet::new();
                    for (i, item) in items.iter().enumerate() {
                        if !seen.insert(item.to_string()) {
                            causes.push(Cause {
                                reason: "FieldValueDuplicate",
                                field: format!("{path}[{i}]"),
                                body: format!("Duplicate value: {item}"),
                            });
                        }
                    }
                }
                Some("map") => {
                    let keys: Vec<&str> = schema
                        .get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|k| k.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut seen = BTreeSet::new();
                    for (i, item) in items.iter().enumerate() {
                        let key: Vec<String> = keys
                            .iter()
                            .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
                            .collect();
                        if !seen.insert(key.clone()) {
                            causes.push(Cause {
                                reason: "FieldValueDuplicate",
                                field: format!("{path}[{i}]"),
                                body: format!("Duplicate value: {}", key.join(",")),
                            });
                        }
                    }
                }
                _ => {}
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate_value(item_schema, item, None, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(map) => {
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        causes.push(Cause::required(join(path, r), ""));
                    }
                }
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && map.len() as u64 > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooMany",
                    field: path.to_string(),
                    body: format!("Too many: {}: must have at most {max} items", map.len()),
                });
            }
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && (map.len() as u64) < min
            {
                causes.push(Cause::invalid(
                    path,
                    &json!(map.len()),
                    &format!("{} should have at least {min} properties", in_body(path)),
                ));
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, v) in map {
                if let Some(s) = props.and_then(|p| p.get(k)).or(additional) {
                    let was = old.and_then(|o| o.get(k));
                    validate_value(s, v, was, &join(path, k), causes);
                }
            }
        }
        _ => {}
    }
    validate_junctors(schema, value, old, path, causes);
}

fn branch_causes(schema: &Value, value: &Value, path: &str) -> Vec<Cause> {
    let mut c = Vec::new();
    validate_value(schema, value, None, path, &mut c);
    c
}

/// A junctor failure as the server reports it: kube-openapi's message is not a field error, so
/// it comes with a nil field path and an empty value.
fn junctor_failure(path: &str, what: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: "<nil>".into(),
        body: format!("Invalid value: \"\": {} {what}", go_quote(path)),
    }
}

/// The errors of the failed branch kube-openapi reports alongside a junctor failure: the one
/// that matched most, approximated as the one with fewest errors, the first on a tie.
fn best_failure(results: Vec<Vec<Cause>>) -> Vec<Cause> {
    results
        .into_iter()
        .filter(|r| !r.is_empty())
        .reduce(|best, r| if r.len() < best.len() { r } else { best })
        .unwrap_or_default()
}

/// `anyOf`, `oneOf`, `allOf` and `not`, in kube-openapi's order and wording; a value the update
/// leaves as it was is not judged again (ratcheting).
fn validate_junctors(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    if old == Some(value) {
        return;
    }
    let branches = |key: &str| -> Option<Vec<Vec<Cause>>> {
        let list = schema.get(key).and_then(Value::as_array)?;
        Some(list.iter().map(|s| branch_causes(s, value, path)).collect())
    };
    if let Some(results) = branches("anyOf")
        && !results.iter().any(Vec::is_empty)
    {
        causes.push(junctor_failure(
            path,
            "must validate at least one schema (anyOf)",
        ));
        causes.extend(best_failure(results));
    }
    if let Some(results) = branches("oneOf") {
        let valid = results.iter().filter(|r| r.is_empty()).count();
        if valid != 1 {
            let found = if valid == 0 {
                "Found none valid".to_string()
            } else {
                format!("Found {valid} valid alternatives")
            };
            causes.push(junctor_failure(
                path,
                &format!("must validate one and only one schema (oneOf). {found}"),
            ));
            if valid == 0 {
                causes.extend(best_failure(results));
            }
        }
    }
    if let Some(results) = branches("allOf") {
        let (total, valid) = (
            results.len(),
            results.iter().filter(|r| r.is_empty()).count(),
        );
        causes.extend(results.into_iter().flatten());
        if valid != total {
            let none = if valid == 0 { ". None validated" } else { "" };
            causes.push(junctor_failure(
                path,
                &format!("must validate all the schemas (allOf){none}"),
            ));
        }
    }
    if let Some(not) = schema.get("not")
        && branch_causes(not, value, path).is_empty()
    {
        causes.push(junctor_failure(path, "must not validate the schema (not)"));
    }
}

/// Non-structural schema parts a real server refuses in a CRD, plus uncompilable CEL rules.
pub(crate) fn structural_errors(schema: &Value, base: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        causes.push(Cause::unsupported(
            format!("{base}.type"),
            schema.get("type").unwrap_or(&json!("")),
            &["object".into()],
        ));
    }
    if let Some(meta) = schema.pointer("/properties/metadata") {
        let extra: Vec<&String> = meta
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| {
                p.keys()
                    .filter(|k| *k != "name" && *k != "generateName")
                    .collect()
            })
            .unwrap_or_default();
        if !extra.is_empty() {
            causes.push(Cause::forbidden(
                format!("{base}.properties[metadata]"),
                "must not specify anything other than name and generateName, but metadata is \
                 implicitly specified",
            ));
        }
    }
    walk_structural(schema, base, false, &mut causes);
    let compiled = compile_schema(schema);
    collect_compile_errors(
        &compiled,
        schema,
        base,
        (true, RuleScope::Outside, None),
        &mut causes,
    );
    causes
}

fn walk_structural(schema: &Value, path: &str, in_junctor: bool, causes: &mut Vec<Cause>) {
    let Some(obj) = schema.as_object() else {
        return;
    };
    let int_or_string = obj
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    let preserve = obj
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let has_type = obj
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    if !in_junctor && !has_type && !int_or_string && !preserve {
        causes.push(Cause::required(
            format!("{path}.type"),
            "must not be empty for specified object fields",
        ));
    }
    if in_junctor {
        for k in ["type", "default", "nullable", "additionalProperties"] {
            if obj.contains_key(k) {
                causes.push(Cause::forbidden(
                    format!("{path}.{k}"),
                    "must be empty to be structural",
                ));
            }
        }
    }
    if obj.contains_key("properties")
        && obj
            .get("additionalProperties")
            .is_some_and(Value::is_object)
    {
        causes.push(Cause::forbidden(
            format!("{path}.additionalProperties"),
            "additionalProperties and properties are mutual exclusive",
        ));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk_structural(v, &format!("{path}.properties[{k}]"), in_junctor, causes);
        }
    }
    if let Some(items) = obj.get("items") {
        if items.is_array() {
            causes.push(Cause::forbidden(
                format!("{path}.items"),
                "items must be a schema object and not an array",
            ));
        } else {
            walk_structural(items, &format!("{path}.items"), in_junctor, causes);
        }
    } else if !in_junctor && obj.get("type").and_then(Value::as_str) == Some("array") {
        causes.push(Cause::required(
            format!("{path}.items"),
            "must be specified",
        ));
    }
    if let Some(a) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        walk_structural(
            a,
            &format!("{path}.additionalProperties"),
            in_junctor,
            causes,
        );
    }
    for junctor in ["allOf", "anyOf", "oneOf"] {
        if let Some(list) = obj.get(junctor).and_then(Value::as_array) {
            for (i, s) in list.iter().enumerate() {
                walk_structural(s, &format!("{path}.{junctor}[{i}]"), true, causes);
            }
        }
    }
    if let Some(not) = obj.get("not") {
        walk_structural(not, &format!("{path}.not"), true, causes);
    }
}

/// Whether the nodes above have rules (so the server derives their CEL types) and whether
/// that failed, which fails every rule-bearing node below (`CELSchemaContext.TypeInfo`).
#[derive(Clone, Copy, PartialEq)]
enum RuleScope {
    Outside,
    Typed,
    Untyped,
}

const NO_CEL_TYPE: &str = "Internal error: internal error: failed to construct type information \
                           for x-kubernetes-validations rules: unable to convert structural \
                           schema to CEL declarations";

/// Refuses rules as CRD validation does: on a node with no CEL type, any rule; otherwise one
/// that does not parse, does not type-check against the node's CEL type, or is not a bool,
/// and a `messageExpression` that does not type-check. A node in rule scope takes its type from
/// its parent's (`inherited`) where that has it, else from its own schema, as the server does.
fn collect_compile_errors(
    compiled: &CompiledSchema,
    schema: &Value,
    path: &str,
    (root, scope, inherited): (bool, RuleScope, Option<Ty>),
    causes: &mut Vec<Cause>,
) {
    let rules = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty());
    let self_ty = if scope == RuleScope::Untyped || (scope == RuleScope::Outside && rules.is_none())
    {
        None
    } else {
        let embedded = schema
            .get("x-kubernetes-embedded-resource")
            .and_then(Value::as_bool)
            == Some(true);
        inherited.or_else(|| decl_type(schema, root || embedded, &self_type_name()))
    };
    let child_scope = match (scope, rules, &self_ty) {
        (RuleScope::Outside, None, _) => RuleScope::Outside,
        (_, _, Some(_)) => RuleScope::Typed,
        (_, _, None) => RuleScope::Untyped,
    };
    if let Some(rules) = rules {
        match &self_ty {
            None => causes.push(Cause {
                reason: "InternalError",
                field: format!("{path}.x-kubernetes-validations"),
                body: NO_CEL_TYPE.to_string(),
            }),
            Some(self_ty) => {
                for (i, (rule, result)) in rules.iter().zip(&compiled.validations).enumerate() {
                    let at = format!("{path}.x-kubernetes-validations[{i}]");
                    let refused = match result {
                        Err(CompilationError::MessageExpressionParse {
                            message_expression,
                            source,
                            ..
                        }) => Some((
                            "messageExpression",
                            format!(
                                "messageExpression compilation failed: {}",
                                parse_issues(message_expression, source.as_ref())
                            ),
                        )),
                        Err(CompilationError::Parse { rule, source }) => Some((
                            "rule",
                            format!(
                                "compilation failed: {}",
                                parse_issues(rule, source.as_ref())
                            ),
                        )),
                        Err(e) => Some(("rule", format!("compilation failed: {e}"))),
                        Ok(_) => rule_error(rule, self_ty),
                    };
                    if let Some((field, detail)) = refused {
                        causes.push(Cause {
                            reason: "FieldValueInvalid",
                            field: format!("{at}.{field}"),
                            body: format!("Invalid value: {}: {detail}", go_rule(rule)),
                        });
                    }
                }
            }
        }
    }
    for (k, child) in &compiled.properties {
        if let Some(s) = schema.pointer(&format!(
            "/properties/{}",
            k.replace('~', "~0").replace('/', "~1")
        )) {
            let at = format!("{path}.properties[{k}]");
            let inherited = self_ty.as_ref().and_then(|t| t.property(k));
            collect_compile_errors(child, s, &at, (false, child_scope, inherited), causes);
        }
    }
    if let (Some(child), Some(s)) = (&compiled.items, schema.get("items")) {
        let at = format!("{path}.items");
        let inherited = self_ty.as_ref().and_then(Ty::items);
        collect_compile_errors(child, s, &at, (false, child_scope, inherited), causes);
    }
    if let (Some(child), Some(s)) = (
        &compiled.additional_properties,
        schema.get("additionalProperties"),
    ) {
        let at = format!("{path}.additionalProperties");
        let inherited = self_ty.as_ref().and_then(Ty::values);
        collect_compile_errors(child, s, &at, (false, child_scope, inherited), causes);
    }
}

/// The field (`rule` or `messageExpression`) and detail of a parsed rule the server refuses.
fn rule_error(rule: &Value, self_ty: &Ty) -> Option<(&'static str, String)> {
    let text = rule.get("rule").and_then(Value::as_str).unwrap_or("");
    if text.trim().is_empty() {
        return None;
    }
    let optional_old_self = rule.get("optionalOldSelf").and_then(Value::as_bool) == Some(true);
    match check(text, self_ty, optional_old_self) {
        Err(issues) => return Some(("rule", format!("compilation failed: {issues}"))),
        Ok(t) if t.known_non_bool() => {
            return Some(("rule", "cel expression must evaluate to a bool".into()));
        }
        Ok(_) => {}
    }
    let message = rule.get("messageExpression").and_then(Value::as_str)?;
    if message.trim().is_empty() {
        return None;
    }
    check(message, self_ty, optional_old_self)
        .err()
        .map(|issues| {
            (
                "messageExpression",
                format!("messageExpression compilation failed: {issues}"),
            )
        })
}

/// The parser's errors, as cel-go's `issues.String()` shows them.
fn parse_issues(source: &str, error: &(dyn std::error::Error + 'static)) -> String {
    match error.downcast_ref::<ParseErrors>() {
        Some(errors) => render_positioned(
            source,
            errors
                .errors
                .iter()
                .map(|e| {
                    let at = |n: isize| usize::try_from(n).unwrap_or(0);
                    (at(e.pos.0), at(e.pos.1), e.msg.clone())
                })
                .collect(),
        ),
        None => error.to_string(),
    }
}

/// A rule as Go's `%#v` prints the `apiextensions.ValidationRule` a real server reports as the
/// invalid value.
fn go_rule(rule: &Value) -> String {
    let text = |k: &str| go_quote(rule.get(k).and_then(Value::as_str).unwrap_or(""));
    // A set pointer prints as its address, which no client can rely on.
    let pointer = |k: &str, ty: &str| match rule.get(k) {
        Some(v) if !v.is_null() => format!("(*{ty})(0xc000a1c0e0)"),
        _ => format!("(*{ty})(nil)"),
    };
    format!(
        "apiextensions.ValidationRule{{Rule:{}, Message:{}, MessageExpression:{}, Reason:{}, \
         FieldPath:{}, OptionalOldSelf:{}}}",
        text("rule"),
        text("message"),
        text("messageExpression"),
        pointer("reason", "apiextensions.FieldValueErrorReason"),
        text("fieldPath"),
        pointer("optionalOldSelf", "bool"),
    )
}

/// Go's `%q` of a string.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Keeps only the fields `ObjectMeta` has, as decoding into it does on the real server.
pub(crate) fn prune_object_meta(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, v| OBJECT_META_FIELDS.contains(&k.as_str()) && !v.is_null());
    }
    if obj.get("metadata").is_some_and(|m| !m.is_object()) {
        obj["metadata"] = Value::Object(Map::new());
    }
}
