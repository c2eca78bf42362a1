//! Fake connection backends that follow the contracts in `backends/`, quirks included, with
//! knobs for latency, injected failures, 429 + `Retry-After` and token expiry.

pub mod infisical;
