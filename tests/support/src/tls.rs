//! Certificates for TLS tests: a CA made in the test, and server certificates it signs for
//! `localhost` and `127.0.0.1`, written as cert-manager writes a Secret (`tls.crt`, `tls.key`).

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and its key, PEM, and the certificate's DER (what a client sees).
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    /// The CA certificate, PEM: what a client trusts.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A fresh certificate and key for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> ServerCert {
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server parameters");
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a server certificate");
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl ServerCert {
    /// Writes `tls.crt` and `tls.key` into `dir`, each replaced whole (a temporary file renamed
    /// over it), as a Secret volume's files change.
    pub fn write_to(&self, dir: &Path) {
        for (name, text) in [("tls.crt", &self.cert_pem), ("tls.key", &self.key_pem)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("writing a certificate file");
            std::fs::rename(&tmp, dir.join(name)).expect("moving a certificate file in place");
        }
    }
}
