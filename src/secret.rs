//! Types that hold resolved secret material. None of them can be printed: `Debug` shows
//! `[REDACTED]` and there is no `Display`, so a value cannot reach a log line, an Event, a status
//! or an error message by accident. Code that needs the value calls `expose_secret()` and must not
//! let it escape further than the backend request it builds.

use std::collections::BTreeMap;

use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretBox};
use serde_json::Value;

/// The resolved credentials object of a connection: field name -> JSON value.
pub struct Credentials(SecretBox<Fields>);

/// The map inside [`Credentials`], wiped when dropped.
#[derive(Default)]
struct Fields(BTreeMap<String, Value>);

impl Zeroize for Fields {
    fn zeroize(&mut self) {
        for value in self.0.values_mut() {
            if let Value::String(s) = value {
                s.zeroize();
            }
        }
        self.0.clear();
    }
}

impl Credentials {
    pub fn new(fields: BTreeMap<String, Value>) -> Self {
        Self(SecretBox::new(Box::new(Fields(fields))))
    }

    /// The fields in clear. Only for building a backend request or the hashed canonical form.
    pub fn expose(&self) -> &BTreeMap<String, Value> {
        &self.0.expose_secret().0
    }

    /// Field names only: safe to show.
    pub fn field_names(&self) -> Vec<String> {
        self.expose().keys().cloned().collect()
    }
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self::new(self.expose().clone())
    }
}

/// Equal when every field is: for comparing what a backend returned, never for showing it.
impl PartialEq for Credentials {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}: [REDACTED])", self.field_names())
    }
}

/// One secret string (a token, a client secret).
#[derive(Clone)]
pub struct SecretString(secrecy::SecretString);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(secrecy::SecretString::from(value))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_values() {
        let creds = Credentials::new(BTreeMap::from([(
            "password".to_string(),
            Value::from("zebra-canary-7781"),
        )]));
        let shown = format!(
            "{creds:?} {:?}",
            SecretString::new("zebra-canary-7781".into())
        );
        assert!(shown.contains("password"));
        assert!(!shown.contains("zebra-canary-7781"), "{shown}");
    }
}
