//! Bearer tokens a fake issues, expires and revokes: Infisical's logins and Matillion's OAuth
//! endpoint keep them the same way.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub(crate) struct Token {
    pub issued: Instant,
    pub expires_at: Option<Instant>,
    /// The end of the token's renewals, where the backend has renewals.
    pub max_until: Option<Instant>,
    pub revoked: bool,
    /// Who the token was issued to.
    pub subject: String,
}

impl Token {
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// What a request's bearer token is worth.
pub(crate) enum Check<'a> {
    Missing,
    Unknown,
    Revoked,
    Expired,
    Valid(&'a Token),
}

#[derive(Default)]
pub(crate) struct Tokens {
    issued: BTreeMap<String, Token>,
}

impl Tokens {
    /// A new token `{prefix}.{random}.{random}` for `subject`; `None` lifetimes never end.
    pub fn issue(
        &mut self,
        prefix: &str,
        subject: &str,
        lifetime: Option<Duration>,
        max_ttl: Option<Duration>,
    ) -> String {
        let now = Instant::now();
        let token = format!(
            "{prefix}.{}.{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.issued.insert(
            token.clone(),
            Token {
                issued: now,
                expires_at: lifetime.map(|l| now + l),
                max_until: max_ttl.map(|m| now + m),
                revoked: false,
                subject: subject.to_owned(),
            },
        );
        token
    }

    /// Revocation is checked before expiry.
    pub fn check(&self, bearer: Option<&str>) -> Check<'_> {
        let Some(bearer) = bearer else {
            return Check::Missing;
        };
        match self.issued.get(bearer) {
            None => Check::Unknown,
            Some(token) if token.revoked => Check::Revoked,
            Some(token) if token.expired(Instant::now()) => Check::Expired,
            Some(token) => Check::Valid(token),
        }
    }

    pub fn get_mut(&mut self, token: &str) -> Option<&mut Token> {
        self.issued.get_mut(token)
    }

    /// Every token issued so far expires now.
    pub fn expire_all(&mut self) {
        let now = Instant::now();
        for token in self.issued.values_mut() {
            token.expires_at = Some(now);
        }
    }

    pub fn revoke_all(&mut self) {
        for token in self.issued.values_mut() {
            token.revoked = true;
        }
    }
}
