//! Universal Auth: login with lockout, renew up to the max TTL, and the bearer check.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::State;
use super::routes::{error, ok, validation};
use super::validate::required_string;
use crate::fake::server::{Reply, Request};
use crate::fake::tokens::Check;

pub(super) struct Identity {
    pub secret: String,
    /// Refused logins within the counter window.
    pub refused: Vec<Instant>,
    pub locked_until: Option<Instant>,
}

impl State {
    pub(super) fn login(&mut self, body: &Value) -> Reply {
        let mut issues = Vec::new();
        let client_id = required_string(body, "clientId", &mut issues);
        let client_secret = required_string(body, "clientSecret", &mut issues);
        if !issues.is_empty() {
            return validation(issues);
        }
        let (client_id, client_secret) = (client_id.unwrap(), client_secret.unwrap());
        let now = Instant::now();
        let (threshold, window, lockout) = (
            self.lockout_threshold,
            self.lockout_window,
            self.lockout_duration,
        );
        let Some(identity) = self.identities.get_mut(&client_id) else {
            return error(401, "UnauthorizedError", "Invalid credentials");
        };
        if let Some(until) = identity.locked_until {
            if now < until {
                return error(
                    401,
                    "UnauthorizedError",
                    format!(
                        "Identity is locked due to multiple failed login attempts. Try again in \
                         {} seconds.",
                        (until - now).as_secs().max(1)
                    ),
                );
            }
            identity.locked_until = None;
        }
        if identity.secret != client_secret {
            identity
                .refused
                .retain(|at| now.duration_since(*at) < window);
            identity.refused.push(now);
            if identity.refused.len() >= threshold {
                identity.refused.clear();
                identity.locked_until = Some(now + lockout);
            }
            return error(401, "UnauthorizedError", "Invalid credentials");
        }
        identity.refused.clear();
        let (expires_in, max_ttl) = (self.expires_in, self.max_ttl);
        let token = self.tokens.issue(
            "fake-jwt",
            &client_id,
            (expires_in > 0).then(|| Duration::from_secs(expires_in)),
            (max_ttl > 0).then(|| Duration::from_secs(max_ttl)),
        );
        ok(json!({
            "accessToken": token,
            "expiresIn": expires_in,
            "accessTokenMaxTTL": max_ttl,
            "tokenType": "Bearer",
        }))
    }

    pub(super) fn renew(&mut self, body: &Value) -> Reply {
        let mut issues = Vec::new();
        let Some(token) = required_string(body, "accessToken", &mut issues) else {
            return validation(issues);
        };
        let now = Instant::now();
        let expires_in = self.expires_in;
        let Some(issued) = self.tokens.get_mut(&token) else {
            return error(401, "UnauthorizedError", "Invalid access token");
        };
        if issued.revoked || issued.expired(now) {
            return error(
                401,
                "UnauthorizedError",
                "Failed to renew: access token expired",
            );
        }
        if issued.max_until.is_some_and(|max| now >= max) {
            return error(
                401,
                "UnauthorizedError",
                "Failed to renew access token due to max TTL expiration",
            );
        }
        let mut lifetime = Duration::from_secs(expires_in);
        if let Some(max) = issued.max_until {
            lifetime = lifetime.min(max - now);
        }
        issued.expires_at = (expires_in > 0).then(|| now + lifetime);
        let max_ttl = issued
            .max_until
            .map_or(0, |max| (max - issued.issued).as_secs());
        ok(json!({
            "accessToken": token,
            "expiresIn": if expires_in > 0 { lifetime.as_secs() } else { 0 },
            "accessTokenMaxTTL": max_ttl,
            "tokenType": "Bearer",
        }))
    }

    pub(super) fn authenticate(&self, request: &Request) -> Result<(), Reply> {
        match self.tokens.check(request.bearer()) {
            Check::Missing => Err(error(
                401,
                "UnauthorizedError",
                "Missing Authorization header",
            )),
            Check::Unknown => Err(error(401, "UnauthorizedError", "Invalid token")),
            Check::Revoked => Err(error(
                401,
                "UnauthorizedError",
                "Failed to authorize: access token revoked",
            )),
            Check::Expired => Err(error(
                403,
                "TokenError",
                "Your token has expired. Please re-authenticate.",
            )),
            Check::Valid(_) => Ok(()),
        }
    }
}
