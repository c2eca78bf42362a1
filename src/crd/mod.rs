//! The resource types of the `appconn.io` API group and the names shared by every driver.

mod backend;
mod connection;
mod selector;
pub mod validate;

pub use backend::*;
pub use connection::*;
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
    vec![
        AppConnection::crd(),
        ConnectionBackend::crd(),
        ClusterConnectionBackend::crd(),
    ]
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
