//! The one reconcile core: resolve -> plan -> apply -> status. Resolve, plan and status are pure;
//! `core` carries a plan out through a backend and the driver's environment.

mod core;
pub mod plan;
mod reason;
pub mod resolve;
pub mod status;

pub use self::core::{
    BackendLookupError, EnvError, Environment, Event, EventType, Options, Outcome, Reconciler,
    Requeue,
};
pub use plan::{Action, BackendInfo};
pub use reason::Reason;
