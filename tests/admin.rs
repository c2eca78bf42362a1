//! The admin server over real HTTP: liveness, the readiness flip, metrics, unknown paths and
//! graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use appconn::http::{AdminState, OPENMETRICS_CONTENT_TYPE, Readiness, serve};
use appconn::metrics::Metrics;
use appconn::reconcile::Reason;
use reqwest::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Admin {
    base: String,
    metrics: Arc<Metrics>,
    ready: Readiness,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

async fn start() -> Admin {
    // reqwest is built without a rustls crypto provider: the process installs one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let metrics = Arc::new(Metrics::default());
    let ready = Readiness::default();
    let state = AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    Admin {
        base,
        metrics,
        ready,
        stop,
        server,
    }
}

async fn get(admin: &Admin, path: &str) -> (StatusCode, Option<String>, String) {
    let response = reqwest::get(format!("{}{path}", admin.base)).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn livez_is_ok_while_the_process_runs() {
    let admin = start().await;
    let (status, _, body) = get(&admin, "/livez").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn readyz_follows_the_readiness_flag() {
    let admin = start().await;

    let (status, _, body) = get(&admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "not ready: waiting for CRDs and watches to sync");

    admin.ready.set_ready(true);
    let (status, _, body) = get(&admin, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");

    admin.ready.set_ready(false);
    let (status, _, _) = get(&admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // Liveness does not depend on readiness.
    let (status, _, _) = get(&admin, "/livez").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_are_openmetrics_text_with_the_registered_families() {
    let admin = start().await;

    let (status, content_type, body) = get(&admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
    assert_eq!(
        OPENMETRICS_CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    // Families without samples yet are left out; the unlabelled histogram always has one.
    assert!(
        body.contains("# TYPE appconn_reconcile_duration_seconds histogram"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    admin
        .metrics
        .observe_backend("infisical", "create", Some(201), Duration::from_millis(12));
    admin
        .metrics
        .observe_backend("infisical", "get", None, Duration::from_millis(3));
    admin
        .metrics
        .observe_reconcile("ok", Reason::Synced, Duration::from_millis(40));
    admin.metrics.observe_reconcile(
        "error",
        Reason::BackendUnavailable,
        Duration::from_millis(7),
    );

    let (status, _, body) = get(&admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for family in [
        "# TYPE appconn_reconciles counter",
        "# TYPE appconn_reconcile_duration_seconds histogram",
        "# TYPE appconn_backend_requests counter",
        "# TYPE appconn_backend_request_duration_seconds histogram",
    ] {
        assert!(body.contains(family), "{family} missing in:\n{body}");
    }
    assert!(body.ends_with("# EOF\n"), "{body}");
    let create = r#"{backend="infisical",operation="create",status_class="2xx"}"#;
    let get_failed = r#"{backend="infisical",operation="get",status_class="error"}"#;
    for sample in [
        format!("appconn_backend_requests_total{create} 1"),
        format!("appconn_backend_requests_total{get_failed} 1"),
        format!("appconn_backend_request_duration_seconds_count{create} 1"),
        r#"appconn_reconciles_total{result="ok",reason="Synced"} 1"#.to_owned(),
        r#"appconn_reconciles_total{result="error",reason="BackendUnavailable"} 1"#.to_owned(),
        "appconn_reconcile_duration_seconds_count 2".to_owned(),
    ] {
        assert!(body.contains(&sample), "{sample} missing in:\n{body}");
    }
}

#[tokio::test]
async fn unknown_paths_are_not_found() {
    let admin = start().await;
    for path in ["/", "/healthz", "/metrics/extra", "/readyz/"] {
        let (status, _, _) = get(&admin, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let admin = start().await;
    let (status, _, _) = get(&admin, "/livez").await;
    assert_eq!(status, StatusCode::OK);

    admin.stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), admin.server)
        .await
        .expect("the server stops soon after shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(reqwest::get(format!("{}/livez", admin.base)).await.is_err());
}
