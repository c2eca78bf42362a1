//! The store read API over HTTPS, with a CA made in the test: a client that trusts the CA reads
//! a connection, plain HTTP and clients that do not trust the CA are refused, and a replaced
//! certificate is what the next connection sees.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appconn::keys::InstallationKeys;
use appconn::secret::Credentials;
use appconn::store::api::{StoreApiState, serve_tls};
use appconn::store::tls::{CertReloader, TlsFiles};
use appconn::store::{NewRecord, SqlStore, StoreEngine};
use appconn_testkit::apiserver::{TestApiServer, UserInfo};
use appconn_testkit::tls::TestCa;
use jiff::Timestamp;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const CANARY: &str = "zebra-canary-7781";
const TOKEN: &str = "tok-analytics-reader-5f3e9a";
const USER: &str = "system:serviceaccount:analytics:reader";
const WAREHOUSE: &str = "/v1/namespaces/analytics/connections/warehouse";
const RELOAD: Duration = Duration::from_millis(100);

struct Harness {
    _api: TestApiServer,
    port: u16,
    ca: TestCa,
    tls_dir: tempfile::TempDir,
    _store_dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

/// The read API over HTTPS on a free port, its certificate files in `tls_dir` (empty when
/// `with_cert` is false), re-read every [`RELOAD`].
async fn start(with_cert: bool) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = TestApiServer::start().await;
    api.set_token(
        TOKEN,
        UserInfo {
            username: Some(USER.into()),
            uid: None,
            groups: None,
            extra: None,
        },
    );
    api.allow(
        USER,
        "get",
        "appconn.io",
        "appconnections/credentials",
        Some("analytics"),
    );
    let store_dir = tempfile::tempdir().unwrap();
    let keys = InstallationKeys::generate();
    let store = SqlStore::open(store_dir.path().join("appconn.db"), &keys.store_keys)
        .await
        .unwrap();
    store
        .insert(
            NewRecord {
                namespace: "analytics".into(),
                name: "warehouse".into(),
                connection_name: "warehouse-prod".into(),
                app: "mssql".into(),
                method: None,
                project: None,
                description: None,
                settings: BTreeMap::new(),
                credentials: Credentials::new(BTreeMap::from([(
                    "password".to_string(),
                    json!(CANARY),
                )])),
                credentials_hash: "hmac-sha256:00".into(),
                rotation: None,
            },
            Timestamp::now(),
        )
        .await
        .unwrap();

    let ca = TestCa::new("appconn test CA");
    let tls_dir = tempfile::tempdir().unwrap();
    if with_cert {
        ca.server_cert().write_to(tls_dir.path());
    }
    let certs = CertReloader::new(TlsFiles::in_dir(tls_dir.path()));
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = futures::FutureExt::shared(async {
        let _ = stopped.await;
    });
    certs.clone().watch(RELOAD, stopped.clone());
    // The first read is done before `watch` returns: no early handshake finds no certificate.
    assert_eq!(certs.has_certificate(), with_cert);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = StoreApiState {
        store: Arc::new(store),
        client: api.client(),
    };
    tokio::spawn(serve_tls(listener, state, certs, stopped));
    Harness {
        _api: api,
        port,
        ca,
        tls_dir,
        _store_dir: store_dir,
        _stop: stop,
    }
}

/// A client trusting only `ca_pem`. Each client opens its own connections (an HTTP/2
/// connection would otherwise be shared), so a new one sees the certificate served now.
fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .tls_info(true)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

struct Seen {
    status: StatusCode,
    body: String,
    /// DER of the certificate the server presented.
    peer: Vec<u8>,
}

async fn get(client: &reqwest::Client, url: &str) -> reqwest::Result<Seen> {
    let response = client.get(url).bearer_auth(TOKEN).send().await?;
    let peer = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(Seen {
        status: response.status(),
        peer,
        body: response.text().await?,
    })
}

impl Harness {
    fn https(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

#[tokio::test]
async fn a_client_trusting_the_ca_reads_a_connection_over_https() {
    let h = start(true).await;
    // Served the moment the listener is up: the first read of the files happened at start.
    let seen = get(&client(&h.ca.pem()), &h.https(WAREHOUSE))
        .await
        .unwrap();
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.body);
    let body: Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(body["credentials"]["password"], CANARY);
    // By IP address too: the certificate names 127.0.0.1.
    let by_ip = format!("https://127.0.0.1:{}{WAREHOUSE}", h.port);
    assert_eq!(
        get(&client(&h.ca.pem()), &by_ip).await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn plain_http_and_untrusting_clients_are_refused() {
    let h = start(true).await;
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let err = plain
        .get(format!("http://localhost:{}{WAREHOUSE}", h.port))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect_err("plain HTTP must not be answered");
    assert!(!err.to_string().contains(CANARY), "{err}");

    let stranger = TestCa::new("another CA");
    match get(&client(&stranger.pem()), &h.https(WAREHOUSE)).await {
        Ok(seen) => panic!(
            "a client that does not trust the CA was answered {}",
            seen.status
        ),
        Err(err) => assert!(err.is_connect(), "{err:?}"),
    }
}

/// Polls until the server presents `der`, or fails after a few seconds.
async fn wait_for_certificate(h: &Harness, der: &[u8]) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(seen) = get(&client(&h.ca.pem()), &h.https(WAREHOUSE)).await
            && seen.peer == der
        {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_the_next_connection() {
    let h = start(false).await;
    let first = h.ca.server_cert();
    first.write_to(h.tls_dir.path());
    let seen = wait_for_certificate(&h, &first.der).await;
    assert_eq!(seen.status, StatusCode::OK);

    // cert-manager renews: a new key and certificate land in the Secret's files.
    let second = h.ca.server_cert();
    assert_ne!(second.der, first.der);
    second.write_to(h.tls_dir.path());
    let seen = wait_for_certificate(&h, &second.der).await;
    assert_eq!(seen.status, StatusCode::OK);
    // And it stays: nothing flips back to the old one.
    for _ in 0..3 {
        let seen = get(&client(&h.ca.pem()), &h.https(WAREHOUSE))
            .await
            .unwrap();
        assert_eq!(seen.peer, second.der);
    }
}

#[tokio::test]
async fn without_a_certificate_handshakes_fail_and_a_broken_one_keeps_the_last() {
    let h = start(false).await;
    // No files yet (the chart's optional Secret volume before the Secret exists): no HTTP
    // fallback, every handshake fails.
    tokio::time::sleep(RELOAD * 2).await;
    let err = get(&client(&h.ca.pem()), &h.https(WAREHOUSE)).await;
    assert!(err.is_err(), "served without a certificate");

    let good = h.ca.server_cert();
    good.write_to(h.tls_dir.path());
    wait_for_certificate(&h, &good.der).await;

    // A key that does not belong to the certificate is refused; the good pair stays.
    let other = h.ca.server_cert();
    std::fs::write(h.tls_dir.path().join("tls.key"), &other.key_pem).unwrap();
    tokio::time::sleep(RELOAD * 3).await;
    let seen = get(&client(&h.ca.pem()), &h.https(WAREHOUSE))
        .await
        .unwrap();
    assert_eq!(seen.peer, good.der);
}

#[test]
fn reload_errors_name_the_file_and_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let certs = CertReloader::new(TlsFiles::in_dir(dir.path()));
    let err = certs.reload().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read {}: no such file or directory",
            dir.path().join("tls.crt").display()
        )
    );
    let ca = TestCa::new("ca");
    let cert = ca.server_cert();
    write(dir.path(), "tls.crt", &cert.cert_pem);
    write(dir.path(), "tls.key", "not a key");
    let err = certs.reload().unwrap_err();
    assert!(
        err.to_string().ends_with("holds no usable PEM private key"),
        "{err}"
    );
    write(dir.path(), "tls.key", &ca.server_cert().key_pem);
    let err = certs.reload().unwrap_err();
    assert!(
        err.to_string().contains("does not match the certificate"),
        "{err}"
    );
    assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    write(dir.path(), "tls.key", &cert.key_pem);
    assert!(certs.reload().unwrap(), "a good pair is taken");
    assert!(
        !certs.reload().unwrap(),
        "unchanged files are not taken twice"
    );
    assert!(certs.has_certificate());
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}
