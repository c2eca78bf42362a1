//! HTTPS for the store read API. The certificate and key come from `tls.crt` and `tls.key`
//! (cert-manager's Secret layout, mounted as a volume), and are read again whenever their
//! content changes: kubelet swaps a mounted Secret's files in place, and each new TLS handshake
//! then sees the new certificate. Until a usable pair is there, handshakes fail: the API never
//! falls back to plain HTTP.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::keys::describe_io;

/// A handshake that takes longer is dropped, so idle sockets cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may finish after shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the certificate chain and its private key are, both PEM.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `tls.crt` and `tls.key` in `dir`: a `kubernetes.io/tls` Secret mounted there.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

/// Why the files cannot serve. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no usable PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The current certificate, read again from its files when they change.
pub struct CertReloader {
    files: TlsFiles,
    current: RwLock<Option<Loaded>>,
}

struct Loaded {
    /// SHA-256 of both files, to tell a change without keeping the key's bytes.
    fingerprint: [u8; 32],
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertReloader")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Starts with no certificate: call [`Self::reload`] to read the files.
    pub fn new(files: TlsFiles) -> Arc<Self> {
        Arc::new(Self {
            files,
            current: RwLock::new(None),
        })
    }

    /// Whether a certificate is being served.
    pub fn has_certificate(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Reads the files; `Ok(true)` when they held a new, usable pair, now served. A pair that
    /// does not load leaves the one served before in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::Read {
                path: path.into(),
                reason: describe_io(&e),
            })
        };
        let cert_pem = read(&self.files.cert)?;
        let key_pem = secrecy::zeroize::Zeroizing::new(read(&self.files.key)?);
        let mut digest = Sha256::new();
        digest.update(Sha256::digest(&cert_pem));
        digest.update(Sha256::digest(key_pem.as_slice()));
        let fingerprint: [u8; 32] = digest.finalize().into();
        let unchanged = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|l| l.fingerprint == fingerprint);
        if unchanged {
            return Ok(false);
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.files.cert.clone(),
            });
        }
        let no_key = || TlsError::NoKey {
            path: self.files.key.clone(),
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| no_key())?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| no_key())?;
        let certified = CertifiedKey::new(chain, signer);
        if certified.keys_match().is_err() {
            return Err(TlsError::Mismatch {
                cert: self.files.cert.clone(),
                key: self.files.key.clone(),
            });
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Loaded {
            fingerprint,
            certified: Arc::new(certified),
        });
        Ok(true)
    }

    /// Reads the files now, before it returns, so that a server started next has the certificate
    /// for its first handshake; then again every `every`, in a task of its own, until `shutdown`.
    /// Each change and each failure is logged once.
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let mut last_error: Option<String> = None;
        self.reload_logged(&mut last_error);
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(every) => {}
                }
                self.reload_logged(&mut last_error);
            }
        })
    }

    /// One [`Self::reload`], logged unless it repeats `last_error`.
    fn reload_logged(&self, last_error: &mut Option<String>) {
        match self.reload() {
            Ok(true) => {
                tracing::info!(cert = %self.files.cert.display(), "store API certificate loaded");
                *last_error = None;
            }
            Ok(false) => *last_error = None,
            Err(e) => {
                let shown = e.to_string();
                if last_error.as_ref() != Some(&shown) {
                    if self.has_certificate() {
                        tracing::warn!(error = %shown, "store API certificate not reloaded; serving the previous one");
                    } else {
                        tracing::warn!(error = %shown, "store API has no certificate yet: TLS handshakes fail until it has");
                    }
                    *last_error = Some(shown);
                }
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.certified.clone())
    }
}

/// Serves `app` over HTTPS (HTTP/1.1 and HTTP/2) on `listener` until `shutdown`, then lets
/// in-flight requests finish for a few seconds.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    certs: Arc<CertReloader>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: pause instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "store API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // A plain-HTTP client or a failed handshake only costs this connection.
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "store API TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let connection = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "store API connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    Ok(())
}
