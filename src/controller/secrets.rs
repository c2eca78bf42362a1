//! The resourceVersion of every Secret in the watched scopes, from the one metadata watch per
//! scope: what a connection's last reconcile read is compared against, so that Secrets are read
//! again only after they changed. Only names and versions are kept, never data, labels or
//! annotations (kubectl's last-applied copy of a Secret holds its data).

use std::collections::HashMap;
use std::sync::RwLock;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

/// Secret (namespace, name) -> resourceVersion, per watch scope (a namespace, or all).
#[derive(Default)]
pub struct SecretVersions {
    scopes: RwLock<HashMap<Option<String>, Scope>>,
}

#[derive(Default)]
struct Scope {
    current: HashMap<(String, String), String>,
    /// Filled during a (re-)list, swapped in when it is done: Secrets deleted meanwhile go.
    listing: Option<HashMap<(String, String), String>>,
}

impl SecretVersions {
    /// The version the watch last saw; None for a Secret it has not seen (or that is gone).
    pub fn get(&self, namespace: &str, name: &str) -> Option<String> {
        let key = (namespace.to_string(), name.to_string());
        let scopes = self.scopes.read().expect("secret versions lock");
        [Some(namespace.to_string()), None]
            .iter()
            .filter_map(|scope| scopes.get(scope)?.current.get(&key))
            .next()
            .cloned()
    }

    /// Follows one event of the watch of `scope` (a namespace, or None for all).
    pub fn apply(&self, scope: Option<&str>, event: &Event<PartialObjectMeta<Secret>>) {
        let mut scopes = self.scopes.write().expect("secret versions lock");
        let scope = scopes.entry(scope.map(str::to_string)).or_default();
        match event {
            Event::Apply(secret) => {
                if let Some((key, version)) = entry(secret) {
                    scope.current.insert(key, version);
                }
            }
            Event::Delete(secret) => {
                scope
                    .current
                    .remove(&(secret.namespace().unwrap_or_default(), secret.name_any()));
            }
            Event::Init => scope.listing = Some(HashMap::new()),
            Event::InitApply(secret) => {
                if let (Some(listing), Some((key, version))) =
                    (scope.listing.as_mut(), entry(secret))
                {
                    listing.insert(key, version);
                }
            }
            Event::InitDone => {
                if let Some(listed) = scope.listing.take() {
                    scope.current = listed;
                }
            }
        }
    }
}

fn entry(secret: &PartialObjectMeta<Secret>) -> Option<((String, String), String)> {
    Some((
        (secret.namespace()?, secret.name_any()),
        secret.resource_version()?,
    ))
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn secret(ns: &str, name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn versions_follow_changes_deletes_and_relists() {
        let versions = SecretVersions::default();
        let all = None;
        versions.apply(all, &Event::Init);
        versions.apply(all, &Event::InitApply(secret("a", "s1", "1")));
        versions.apply(all, &Event::InitApply(secret("a", "s2", "2")));
        assert_eq!(versions.get("a", "s1"), None, "not before the list is done");
        versions.apply(all, &Event::InitDone);
        assert_eq!(versions.get("a", "s1").as_deref(), Some("1"));
        versions.apply(all, &Event::Apply(secret("a", "s1", "5")));
        assert_eq!(versions.get("a", "s1").as_deref(), Some("5"));
        versions.apply(all, &Event::Delete(secret("a", "s2", "6")));
        assert_eq!(versions.get("a", "s2"), None);
        // A re-list without s1 or b's Secret: they went while the watch was down.
        versions.apply(all, &Event::Apply(secret("b", "other", "3")));
        versions.apply(all, &Event::Init);
        versions.apply(all, &Event::InitApply(secret("a", "s3", "7")));
        versions.apply(all, &Event::InitDone);
        assert_eq!(versions.get("a", "s1"), None);
        assert_eq!(versions.get("b", "other"), None);
        assert_eq!(versions.get("a", "s3").as_deref(), Some("7"));
        // A namespace's own scope.
        versions.apply(Some("c"), &Event::Apply(secret("c", "s", "9")));
        assert_eq!(versions.get("c", "s").as_deref(), Some("9"));
    }
}
