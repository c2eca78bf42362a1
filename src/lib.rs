//! appconn: a Kubernetes operator that turns `AppConnection` resources into connections in a
//! connection backend or in its own built-in store.

pub mod backend;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod http;
pub mod keys;
pub mod kube_error;
pub mod metrics;
pub mod reconcile;
pub mod secret;
pub mod store;
pub mod telemetry;
