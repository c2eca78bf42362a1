//! Evaluates the CRDs' CEL rules and their structural `oneOf`/`anyOf`/`not` validations
//! client-side, exactly as written into the CRDs, so that `appconn apply` refuses what the API
//! server would refuse.

use std::sync::OnceLock;

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::Value;

use super::all_crds;

struct Compiled {
    kind: String,
    /// The `openAPIV3Schema`, for the structural validations.
    root: Value,
    schema: CompiledSchema,
}

fn compiled() -> &'static [Compiled] {
    static SCHEMAS: OnceLock<Vec<Compiled>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        all_crds()
            .into_iter()
            .map(|crd| {
                let schema = crd.spec.versions[0]
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(|s| serde_json::to_value(s).expect("a schema serializes"))
                    .expect("every derived CRD has a schema");
                Compiled {
                    kind: crd.spec.names.kind,
                    schema: compile_schema(&schema),
                    root: schema,
                }
            })
            .collect()
    })
}

/// Checks `object` (a whole resource as JSON) against the rules of its kind; `old` enables the
/// transition rules (immutable fields). Returns the failed rules' messages with their paths.
pub fn validate(kind: &str, object: &Value, old: Option<&Value>) -> Result<(), Vec<String>> {
    let Some(compiled) = compiled().iter().find(|c| c.kind == kind) else {
        return Ok(());
    };
    let mut errors = Vec::new();
    junctors(&compiled.root, object, "", &mut errors);
    thread_local! {
        static VALIDATOR: Validator = Validator::new();
    }
    if let Err(failed) = VALIDATOR.with(|v| v.validate_compiled(&compiled.schema, object, old)) {
        errors.extend(failed.into_vec().into_iter().map(|e| e.to_string()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The `oneOf`, `anyOf` and `not` validations of `schema` and its children over `value`. The
/// CRDs use them only with `required` lists, which is all this evaluates.
fn junctors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(map) = value.as_object() else {
        if let (Some(items), Some(item)) = (value.as_array(), schema.get("items")) {
            for (i, v) in items.iter().enumerate() {
                junctors(item, v, &format!("{path}[{i}]"), errors);
            }
        }
        return;
    };
    let satisfied = |branch: &Value| {
        branch
            .get("required")
            .and_then(Value::as_array)
            .is_none_or(|fields| {
                fields
                    .iter()
                    .filter_map(Value::as_str)
                    .all(|f| map.contains_key(f))
            })
    };
    let names = |branches: &[Value]| {
        let names: Vec<String> = branches
            .iter()
            .flat_map(|b| b.get("required").and_then(Value::as_array).cloned())
            .flatten()
            .filter_map(|f| f.as_str().map(str::to_owned))
            .collect();
        names.join(" or ")
    };
    let shown = if path.is_empty() { "the object" } else { path };
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        match one.iter().filter(|b| satisfied(b)).count() {
            1 => {}
            0 => errors.push(format!(
                "{shown}: needs exactly one source, {}: none is set",
                names(one)
            )),
            _ => errors.push(format!(
                "{shown}: needs exactly one source, {}: more than one is set",
                names(one)
            )),
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && !any.iter().any(satisfied)
    {
        errors.push(format!("{shown}: set at least one of {}", names(any)));
    }
    if let Some(not) = schema.get("not")
        && satisfied(not)
    {
        errors.push(format!(
            "{shown}: must not set {}",
            names(std::slice::from_ref(not))
        ));
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (key, child) in map {
        if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
            let child_path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            junctors(child_schema, child, &child_path, errors);
        }
    }
}
