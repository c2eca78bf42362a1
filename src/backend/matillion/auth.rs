//! Matillion's OAuth client-credentials grant as a [`TokenSource`].
//!
//! From the contract: a form-encoded `POST` to the token endpoint with the audience
//! `https://api.matillion.com`; tokens live about 30 minutes (the lifetime when `expires_in` is
//! absent) and there is no refresh token, so a new one is fetched a few minutes before expiry,
//! and once more on a 401.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, Url};
use serde_json::Value;

use super::mapping;
use crate::backend::BackendError;
use crate::backend::client::{Body, Grant, GrantError, Http, Redactor, TokenSource};
use crate::secret::SecretString;

/// The audience every token is asked for.
const AUDIENCE: &str = "https://api.matillion.com";
/// A token's lifetime when the answer gives none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// How long before its expiry a token is replaced.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

pub(super) struct ClientCredentials {
    pub token_url: Url,
    pub client_id: SecretString,
    pub client_secret: SecretString,
}

#[async_trait]
impl TokenSource for ClientCredentials {
    async fn grant(&self, http: &Http) -> Result<Grant, GrantError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.expose()),
            ("client_secret", self.client_secret.expose()),
            ("audience", AUDIENCE),
        ];
        let url = self.token_url.clone();
        let reply = http
            .send_first("token", Method::POST, url, Some(Body::Form(&form)))
            .await?;
        if reply.status.is_success() {
            return Ok(grant(&reply.body)?);
        }
        let message = reply.message(mapping::oauth_message);
        let message = Redactor::none().apply(message, [self.client_secret.expose()]);
        Err(GrantError::from_reply(
            &reply,
            "Matillion token request",
            &message,
        ))
    }

    /// A few minutes before expiry, and never before 70% of the token's life.
    fn refresh_after(&self, lifetime: Duration) -> Duration {
        lifetime
            .saturating_sub(REFRESH_MARGIN)
            .max(lifetime.mul_f64(0.7))
    }

    fn grant_name(&self) -> &'static str {
        "token request"
    }

    fn secrets(&self) -> Vec<&str> {
        vec![self.client_secret.expose()]
    }
}

/// `access_token` and `expires_in` (30 minutes when absent or zero) of a token answer.
fn grant(body: &[u8]) -> Result<Grant, BackendError> {
    let unexpected = || BackendError::Unavailable {
        message: "unexpected answer from Matillion's token endpoint: no access_token".into(),
        retry_after: None,
    };
    let body: Value = serde_json::from_slice(body).map_err(|_| unexpected())?;
    let token = body
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(unexpected)?;
    let expires_in = body
        .get("expires_in")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0);
    Ok(Grant {
        token: SecretString::new(token.to_owned()),
        lifetime: Some(expires_in.map_or(DEFAULT_LIFETIME, Duration::from_secs)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_give_the_token_and_its_lifetime() {
        let grant =
            grant(br#"{"access_token":"t","token_type":"Bearer","expires_in":1800}"#).unwrap();
        assert_eq!(
            (grant.token.expose(), grant.lifetime),
            ("t", Some(Duration::from_secs(1800)))
        );
        for without in [
            br#"{"access_token":"t","token_type":"Bearer"}"#.as_slice(),
            br#"{"access_token":"t","expires_in":0}"#,
        ] {
            assert_eq!(
                super::grant(without).unwrap().lifetime,
                Some(DEFAULT_LIFETIME)
            );
        }
        for bad in [b"{}".as_slice(), br#"{"access_token":""}"#, b"<html>"] {
            assert!(super::grant(bad).unwrap_err().is_transient());
        }
    }

    #[test]
    fn tokens_are_replaced_a_few_minutes_before_expiry() {
        let source = ClientCredentials {
            token_url: Url::parse("https://id.example/oauth/dpc/token").unwrap(),
            client_id: SecretString::new("id".into()),
            client_secret: SecretString::new("secret".into()),
        };
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(source.refresh_after(secs(1800)), secs(1500));
        assert_eq!(source.refresh_after(secs(3600)), secs(3300));
        // Short-lived tokens keep 70% of their life.
        assert_eq!(source.refresh_after(secs(600)), secs(420));
        assert_eq!(source.refresh_after(secs(2)), Duration::from_millis(1400));
        assert_eq!(source.secrets(), ["secret"]);
    }
}
