pub mod apiserver;
pub mod crds;
pub mod fake;
