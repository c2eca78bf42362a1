//! Evaluates the CRDs' CEL rules client-side, exactly as written into the CRDs, so that
//! `appconn apply` refuses what the API server would refuse.

use std::sync::OnceLock;

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::Value;

use super::all_crds;

struct Compiled {
    kind: String,
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
                }
            })
            .collect()
    })
}

/// Checks `object` (a whole resource as JSON) against the CEL rules of its kind; `old` enables
/// the transition rules (immutable fields). Returns the failed rules' messages with their paths.
pub fn validate(kind: &str, object: &Value, old: Option<&Value>) -> Result<(), Vec<String>> {
    let Some(compiled) = compiled().iter().find(|c| c.kind == kind) else {
        return Ok(());
    };
    thread_local! {
        static VALIDATOR: Validator = Validator::new();
    }
    VALIDATOR
        .with(|v| v.validate_compiled(&compiled.schema, object, old))
        .map_err(|errors| {
            errors
                .into_vec()
                .into_iter()
                .map(|e| e.to_string())
                .collect()
        })
}
