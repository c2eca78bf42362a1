//! HTTP plumbing shared by the backends that speak HTTP: the client with its timeouts and CA
//! bundle, `Retry-After`, and the classification of a failed request into a [`BackendError`].
//!
//! Nothing here sees a request or response body: messages are built by the caller from fields
//! that cannot hold a secret, or from the kind of failure.

use std::error::Error as _;
use std::time::Duration;

use jiff::Timestamp;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::BackendError;

/// Longest `Retry-After` honoured: a broken or hostile value must not stop a backend for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// Connect and total timeouts of every request to one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake.
    pub connect: Duration,
    /// The whole request, response body included.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            total: Duration::from_secs(30),
        }
    }
}

/// A client for one backend: connect and total timeouts, no redirects (an API that redirects is
/// misconfigured, and a redirect must not carry a bearer token elsewhere), and, when a PEM CA
/// bundle is given, trust in exactly that bundle instead of the system roots.
pub fn client(
    timeouts: Timeouts,
    ca_bundle: Option<&str>,
) -> Result<reqwest::Client, BackendError> {
    // reqwest is built without a crypto provider of its own; ring is the one the kube client
    // uses. Installing it is idempotent: an error only means a provider is already there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.total)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("appconn/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca_bundle {
        let invalid = || BackendError::InvalidSpec {
            message:
                "caBundle must hold at least one PEM certificate (-----BEGIN CERTIFICATE-----)"
                    .to_string(),
        };
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|_| invalid())?;
        if certs.is_empty() {
            return Err(invalid());
        }
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|err| BackendError::Unavailable {
        message: format!("cannot build the HTTP client: {}", root_cause(&err)),
        retry_after: None,
    })
}

/// A backend's base URL from its resource: http(s) and able to take a path, or `InvalidSpec`
/// naming `field`.
pub fn base_url(field: &str, url: &str) -> Result<reqwest::Url, BackendError> {
    reqwest::Url::parse(url.trim())
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base())
        .ok_or_else(|| BackendError::InvalidSpec {
            message: format!("{field} {url:?} is not an http(s) URL"),
        })
}

/// The `Retry-After` of a response, in seconds or as an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, Timestamp::now())
}

/// Parses a `Retry-After` value: delay seconds, or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = jiff::fmt::rfc2822::DateTimeParser::new()
                .parse_timestamp(value)
                .ok()?;
            Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Classifies a non-2xx response. `message` must come from a field that cannot hold a secret
/// (the server's error message); `retry_after` from [`retry_after`].
///
/// 401/403 are auth failures, 404 is [`BackendError::NotFound`] (callers decide what absence
/// means for their operation), 408, 429 and 5xx are transient, every other 4xx is a rejection.
pub fn status_error(
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
) -> BackendError {
    match status.as_u16() {
        401 | 403 => BackendError::Auth { message },
        404 => BackendError::NotFound,
        408 | 429 | 500..=599 => BackendError::Unavailable {
            message,
            retry_after,
        },
        300..=399 => BackendError::Rejected {
            message: format!(
                "unexpected redirect (HTTP {}): check the backend URL",
                status.as_u16()
            ),
        },
        _ => BackendError::Rejected { message },
    }
}

/// Classifies a request that got no response: always transient.
pub fn transport_error(err: &reqwest::Error) -> BackendError {
    let message = if err.is_timeout() {
        "request timed out".to_string()
    } else if err.is_connect() {
        format!("cannot connect: {}", root_cause(err))
    } else {
        format!("request failed: {}", root_cause(err))
    };
    BackendError::Unavailable {
        message,
        retry_after: None,
    }
}

/// The innermost error's text (e.g. "Connection refused"), without the URL reqwest adds.
fn root_cause(err: &reqwest::Error) -> String {
    let mut cause = None;
    let mut source = err.source();
    while let Some(inner) = source {
        cause = Some(inner);
        source = inner.source();
    }
    match cause {
        Some(cause) => cause.to_string(),
        None if err.is_builder() => "invalid request".to_string(),
        None if err.is_decode() => "cannot decode the response".to_string(),
        None if err.is_body() => "cannot read the response body".to_string(),
        None => "no response".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Thu, 26 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Thu, 26 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);

        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn statuses_are_classified() {
        let classify = |code: u16| {
            status_error(
                StatusCode::from_u16(code).unwrap(),
                "m".into(),
                Some(Duration::ZERO),
            )
        };
        assert!(matches!(classify(400), BackendError::Rejected { .. }));
        assert!(matches!(classify(422), BackendError::Rejected { .. }));
        assert!(matches!(classify(401), BackendError::Auth { .. }));
        assert!(matches!(classify(403), BackendError::Auth { .. }));
        assert!(matches!(classify(404), BackendError::NotFound));
        assert!(matches!(classify(302), BackendError::Rejected { .. }));
        for code in [408, 429, 500, 502, 503, 504] {
            let err = classify(code);
            assert!(err.is_transient(), "{code}");
            assert_eq!(err.retry_after(), Some(Duration::ZERO));
        }
    }

    #[test]
    fn ca_bundle_must_hold_a_certificate() {
        assert!(client(Timeouts::default(), None).is_ok());
        for bad in ["", "not a certificate"] {
            let err = client(Timeouts::default(), Some(bad)).unwrap_err();
            assert!(matches!(err, BackendError::InvalidSpec { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn refused_connections_and_timeouts_are_transient() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let http = client(Timeouts::default(), None).unwrap();
        let err = http
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        let err = transport_error(&err);
        assert!(err.is_transient());
        assert!(err.to_string().contains("cannot connect"), "{err}");
        assert!(!err.to_string().contains("127.0.0.1"), "{err}");

        // A listener that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            total: Duration::from_millis(200),
        };
        let http = client(timeouts, None).unwrap();
        let err = http
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap_err();
        let err = transport_error(&err);
        assert!(err.is_transient());
        assert_eq!(err.to_string(), "backend unavailable: request timed out");
        keep.abort();
    }
}
