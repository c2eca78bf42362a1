//! The resource types of the `appconn.io` API group and the names shared by every driver.

mod backend;
mod connection;
mod field_map;
mod provider;
mod reason;
mod schedule;
mod selector;
pub mod validate;

pub use backend::*;
pub use connection::*;
pub use field_map::FieldMap;
pub use provider::{Provider, ProviderType};
pub use reason::Reason;
pub use schedule::{RotationSchedule, parse_duration};
pub use selector::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every appconn resource.
pub const GROUP: &str = "appconn.io";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// Finalizer that keeps an AppConnection until its backend object is cleaned up.
pub const FINALIZER: &str = "appconn.io/cleanup";
/// Annotation set before a backend create, so a crash between create and status write is
/// recovered by adoption instead of a second create.
pub const CREATE_PENDING: &str = "appconn.io/create-pending";
/// The one field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "appconn";

/// Every CRD of the API group, in the order `appconn crds` prints them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    [
        AppConnection::crd(),
        ConnectionBackend::crd(),
        ClusterConnectionBackend::crd(),
    ]
    .into_iter()
    .map(flowing_descriptions)
    .collect()
}

/// Doc comments keep the hard line breaks of the source; `kubectl explain` prints them as
/// they are, mid-sentence. Lines of a paragraph are joined; blank lines and list items stay.
fn flowing_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = flow(text);
                        }
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes");
    walk(&mut value);
    serde_json::from_value(value).expect("a CRD with its descriptions reflowed")
}

/// `text` with the lines of each paragraph joined by a space.
fn flow(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            let mut out = String::new();
            for line in paragraph.lines().map(str::trim) {
                if !out.is_empty() {
                    let item = line.starts_with("- ") || line.starts_with("* ");
                    out.push(if item { '\n' } else { ' ' });
                }
                out.push_str(line);
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The CRDs as one multi-document YAML stream: the content of `crds/` and `appconn crds`.
pub fn crds_yaml() -> Vec<(String, String)> {
    all_crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes to YAML");
            (format!("{name}.yaml"), yaml)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_flow_as_paragraphs() {
        assert_eq!(
            flow(
                "Credential fields, each from an inline `value` (which keeps its JSON\ntype) or a Secret."
            ),
            "Credential fields, each from an inline `value` (which keeps its JSON type) or a Secret."
        );
        assert_eq!(flow("One.\nTwo.\n\nThree."), "One. Two.\n\nThree.");
        assert_eq!(flow("Either:\n- a\n- b"), "Either:\n- a\n- b");
        let yaml: String = crds_yaml().into_iter().map(|(_, y)| y).collect();
        assert!(
            yaml.contains("keeps its JSON type)"),
            "descriptions still break mid-sentence"
        );
    }
}
