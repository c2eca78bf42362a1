pub mod apiserver;
pub mod fake;
