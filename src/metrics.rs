//! Prometheus metrics. Labels come from fixed sets only (reasons, results, provider types,
//! operation names, status classes): never an object name or an error text.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok`, `error`, `noop`, or `api-error` when the Kubernetes API failed the reconcile.
    pub result: &'static str,
    /// A condition reason; empty for `api-error`, which is about no backend and no spec.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
    pub operation: &'static str,
    /// `2xx`, `3xx`, `4xx`, `5xx` or `error` (no response); the built-in store: `ok` or
    /// `error`.
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadinessLabels {
    pub ready: &'static str,
    pub reason: &'static str,
}

/// All metrics of one process, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub backend_requests: Family<BackendLabels, Counter>,
    pub backend_request_duration: Family<BackendLabels, Histogram>,
    pub connections: Family<ReadinessLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("appconn");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by result and reason",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let backend_requests = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_requests",
            "Backend requests by backend type, operation and status class",
            backend_requests.clone(),
        );
        let backend_request_duration =
            Family::<BackendLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            });
        registry.register(
            "backend_request_duration_seconds",
            "Backend request latency",
            backend_request_duration.clone(),
        );
        let connections = Family::<ReadinessLabels, Gauge>::default();
        registry.register(
            "connections",
            "AppConnections by readiness and reason",
            connections.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_duration,
            backend_requests,
            backend_request_duration,
            connections,
        }
    }
}

impl Metrics {
    /// Records one backend request. `status` is the HTTP status, or None when no response came.
    pub fn observe_backend(
        &self,
        backend: &'static str,
        operation: &'static str,
        status: Option<u16>,
        elapsed: Duration,
    ) {
        let status_class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        let labels = BackendLabels {
            backend,
            operation,
            status_class,
        };
        self.backend_requests.get_or_create(&labels).inc();
        self.backend_request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// One operation on the built-in store, counted as a request to the `builtin` backend
    /// (status class `ok` or `error`).
    pub fn observe_store(&self, operation: &'static str, ok: bool, elapsed: Duration) {
        let labels = BackendLabels {
            backend: "builtin",
            operation,
            status_class: if ok { "ok" } else { "error" },
        };
        self.backend_requests.get_or_create(&labels).inc();
        self.backend_request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_reconcile(&self, result: &'static str, reason: Reason, elapsed: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                result,
                reason: reason.as_str(),
            })
            .inc();
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    /// A reconcile the Kubernetes API failed (a write refused, the server unreachable): an
    /// outage of the API is not a backend's.
    pub fn observe_api_error(&self, elapsed: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                result: "api-error",
                reason: "",
            })
            .inc();
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    /// The text exposition format for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
