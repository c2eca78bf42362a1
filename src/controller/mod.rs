//! kube-runtime wiring: watches, the Secret and backend index, backoff, leader election.

mod backend_status;
mod backends;
mod backoff;
mod cached;
mod connections;
mod events;
mod index;
mod kube_env;
pub mod leader;
pub mod operator;
mod run;
mod secrets;
mod written;

pub use crate::crd::parse_duration;
pub use connections::Context;
pub use run::{ControllerConfig, run_controllers, wait_for_crds};
