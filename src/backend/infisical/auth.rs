//! Universal Auth, Infisical's machine-identity login, as a [`TokenSource`].
//!
//! From the contract: a token is renewed (or replaced by a new login) at ~70% of its
//! `expiresIn` (0: it never expires); a 401, or a 403 with `"error":"TokenError"`, gets exactly
//! one new login; three refused logins lock the identity for five minutes, which the shared
//! client's cool-down on refused grants keeps it from reaching.

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

use super::message;
use crate::backend::BackendError;
use crate::backend::client::{Body, Grant, GrantError, Http, Redactor, Reply, TokenSource};
use crate::secret::SecretString;

pub(super) struct UniversalAuth {
    pub client_id: SecretString,
    pub client_secret: SecretString,
}

#[async_trait]
impl TokenSource for UniversalAuth {
    /// `POST /api/v1/auth/universal-auth/login`.
    async fn grant(&self, http: &Http) -> Result<Grant, GrantError> {
        let url = http.url(&["api", "v1", "auth", "universal-auth", "login"], &[]);
        let body = json!({
            "clientId": self.client_id.expose(),
            "clientSecret": self.client_secret.expose(),
        });
        let reply = http
            .send_first("login", Method::POST, url, Some(Body::Json(&body)))
            .await?;
        drop(body);
        if reply.status.is_success() {
            return Ok(grant(&reply.body)?);
        }
        let text = Redactor::none().apply(message(&reply), [self.client_secret.expose()]);
        // Refused unless transient: the credentials, the identity or the URL is wrong.
        Err(GrantError::from_reply(
            &reply,
            "Universal Auth login",
            &text,
        ))
    }

    /// `POST /api/v1/auth/token/renew`.
    async fn renew(
        &self,
        http: &Http,
        token: &SecretString,
    ) -> Option<Result<Grant, BackendError>> {
        let url = http.url(&["api", "v1", "auth", "token", "renew"], &[]);
        let body = json!({"accessToken": token.expose()});
        let reply = match http
            .send_first("renew", Method::POST, url, Some(Body::Json(&body)))
            .await
        {
            Ok(reply) => reply,
            Err(err) => return Some(Err(err)),
        };
        drop(body);
        if reply.status.is_success() {
            return Some(grant(&reply.body));
        }
        Some(Err(BackendError::Unavailable {
            message: format!("token renewal answered HTTP {}", reply.status.as_u16()),
            retry_after: None,
        }))
    }

    fn token_refused(&self, reply: &Reply) -> bool {
        reply.status == StatusCode::UNAUTHORIZED
            || (reply.status == StatusCode::FORBIDDEN
                && reply
                    .json_body()
                    .is_some_and(|b| b.get("error").and_then(Value::as_str) == Some("TokenError")))
    }

    fn grant_name(&self) -> &'static str {
        "login"
    }

    fn secrets(&self) -> Vec<&str> {
        vec![self.client_secret.expose()]
    }
}

/// `accessToken` + `expiresIn` of a login or renewal.
fn grant(body: &[u8]) -> Result<Grant, BackendError> {
    let unexpected = || BackendError::Unavailable {
        message: "unexpected answer from Infisical's login: no accessToken".to_string(),
        retry_after: None,
    };
    let body: Value = serde_json::from_slice(body).map_err(|_| unexpected())?;
    let token = body
        .get("accessToken")
        .and_then(Value::as_str)
        .ok_or_else(unexpected)?;
    let expires_in = body.get("expiresIn").and_then(Value::as_u64).unwrap_or(0);
    Ok(Grant {
        token: SecretString::new(token.to_owned()),
        // `expiresIn` 0: the token never expires.
        lifetime: (expires_in > 0).then(|| Duration::from_secs(expires_in)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_read_token_and_lifetime() {
        let grant = grant(br#"{"accessToken":"t","expiresIn":7200,"tokenType":"Bearer"}"#).unwrap();
        assert_eq!(
            (grant.token.expose(), grant.lifetime),
            ("t", Some(Duration::from_secs(7200)))
        );
        let forever = super::grant(br#"{"accessToken":"t","expiresIn":0}"#).unwrap();
        assert_eq!(forever.lifetime, None);
        assert!(super::grant(b"{}").unwrap_err().is_transient());
        assert!(super::grant(b"<html>").unwrap_err().is_transient());
    }
}
