//! The one reconcile core: resolve -> plan -> apply -> status. Resolve, plan and status are pure;
//! `core` carries a plan out through a backend and the driver's environment.

mod core;
mod labels;
pub mod lookup;
pub mod plan;
pub mod resolve;
pub mod status;
pub mod verdict;

pub use self::core::{
    EnvError, Environment, Event, EventType, Options, Outcome, Reconciler, Requeue, Verb,
};
pub use crate::backend::BackendLookupError;
pub use crate::crd::Reason;
pub use lookup::{BackendKey, BackendResources, ResolvedBackend, resolve_backend};
pub use plan::{Action, BackendInfo};
