//! Fake connection backends that follow the contracts in `backends/`, quirks included, on one
//! shared server harness with knobs for latency, injected failures, 429 + `Retry-After`, rate
//! limits and token expiry.

pub mod credible;
pub mod infisical;
pub mod matillion;
pub mod server;
mod tokens;
