//! One typed view of a backend resource's provider block: which provider it is, matched
//! exhaustively wherever a provider matters, instead of comparing type names.

use std::fmt;

use super::{
    BackendProvider, BackendSecretKeySelector, CredibleProvider, InfisicalProvider,
    MatillionProvider,
};

/// The provider block of a backend resource, exactly one of them.
#[derive(Clone, Copy, Debug)]
pub enum Provider<'a> {
    Builtin,
    Infisical(&'a InfisicalProvider),
    Credible(&'a CredibleProvider),
    Matillion(&'a MatillionProvider),
}

/// A provider's type, as `status.type` and `status.backend.type` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProviderType {
    Builtin,
    Infisical,
    Credible,
    Matillion,
}

impl ProviderType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Builtin => "builtin",
            ProviderType::Infisical => "infisical",
            ProviderType::Credible => "credible",
            ProviderType::Matillion => "matillion",
        }
    }
}

impl ProviderType {
    /// The product's name, for messages: "Infisical".
    pub fn display_name(self) -> &'static str {
        match self {
            ProviderType::Builtin => "the built-in store",
            ProviderType::Infisical => "Infisical",
            ProviderType::Credible => "Credible",
            ProviderType::Matillion => "Matillion",
        }
    }
}

impl fmt::Display for ProviderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ProviderType {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The message of a provider block with no provider or several.
pub const ONE_PROVIDER_MESSAGE: &str =
    "exactly one provider block is required: builtin, infisical, credible or matillion";

impl BackendProvider {
    /// The one provider block set; `Err` with [`ONE_PROVIDER_MESSAGE`] when none or several are.
    pub fn provider(&self) -> Result<Provider<'_>, &'static str> {
        let set = [
            self.builtin.as_ref().map(|_| Provider::Builtin),
            self.infisical.as_ref().map(Provider::Infisical),
            self.credible.as_ref().map(Provider::Credible),
            self.matillion.as_ref().map(Provider::Matillion),
        ];
        let mut set = set.into_iter().flatten();
        match (set.next(), set.next()) {
            (Some(one), None) => Ok(one),
            _ => Err(ONE_PROVIDER_MESSAGE),
        }
    }
}

impl Provider<'_> {
    pub fn type_(self) -> ProviderType {
        match self {
            Provider::Builtin => ProviderType::Builtin,
            Provider::Infisical(_) => ProviderType::Infisical,
            Provider::Credible(_) => ProviderType::Credible,
            Provider::Matillion(_) => ProviderType::Matillion,
        }
    }

    /// The project connections use when they name none.
    pub fn default_project(self) -> Option<String> {
        match self {
            Provider::Builtin => None,
            Provider::Infisical(infisical) => infisical.project_id.clone(),
            Provider::Credible(credible) => Some(credible.project.clone()),
            Provider::Matillion(matillion) => Some(matillion.project_id.clone()),
        }
    }
}

impl<'a> Provider<'a> {
    /// Every Secret key the provider's auth reads.
    pub fn secret_keys(self) -> Vec<&'a BackendSecretKeySelector> {
        match self {
            Provider::Builtin => Vec::new(),
            Provider::Infisical(infisical) => {
                let auth = &infisical.auth.universal_auth;
                vec![
                    &auth.client_id.secret_key_ref,
                    &auth.client_secret.secret_key_ref,
                ]
            }
            Provider::Credible(credible) => credible
                .token
                .iter()
                .map(|token| &token.secret_key_ref)
                .collect(),
            Provider::Matillion(matillion) => vec![
                &matillion.auth.client_id.secret_key_ref,
                &matillion.auth.client_secret.secret_key_ref,
            ],
        }
    }
}
