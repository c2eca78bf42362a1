pub mod apiserver;
pub mod crds;
pub mod fake;
pub mod logs;
pub mod postgres;
pub mod tls;
