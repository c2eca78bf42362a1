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
    /// Versions read from the API before the scope's first list came to them: a connection
    /// reconciled early is not taken for changed (and its Secrets read again) only because the
    /// list is slower. Dropped when the scope's first list is done, which then knows better (a
    /// Secret read and then deleted before the list is not kept).
    provisional: RwLock<HashMap<(String, String), String>>,
}

#[derive(Default)]
struct Scope {
    current: HashMap<(String, String), String>,
    /// Filled during a re-list, swapped in when it is done: Secrets deleted meanwhile go.
    listing: Option<HashMap<(String, String), String>>,
    /// The first list is done. Until then listed Secrets go straight into `current` (there is
    /// nothing to forget yet), so a connection reconciled during a long first list is compared
    /// against every Secret listed so far.
    listed: bool,
}

impl SecretVersions {
    /// The version the watch last saw; None for a Secret it has not seen (or that is gone).
    pub fn get(&self, namespace: &str, name: &str) -> Option<String> {
        let key = (namespace.to_string(), name.to_string());
        let scopes = self.scopes.read().expect("secret versions lock");
        let listed = [Some(namespace.to_string()), None]
            .iter()
            .filter_map(|scope| scopes.get(scope)?.current.get(&key))
            .next()
            .cloned();
        listed.or_else(|| {
            self.provisional
                .read()
                .expect("secret versions lock")
                .get(&key)
                .cloned()
        })
    }

    /// A version read from the API: kept until the first list of the Secret's scope is done,
    /// if that list has not come to the Secret yet.
    pub fn read(&self, namespace: &str, name: &str, version: &str) {
        let scopes = self.scopes.read().expect("secret versions lock");
        let known = [Some(namespace.to_string()), None].iter().any(|scope| {
            scopes.get(scope).is_some_and(|s| {
                s.listed
                    || s.current
                        .contains_key(&(namespace.to_string(), name.to_string()))
            })
        });
        if !known {
            self.provisional
                .write()
                .expect("secret versions lock")
                .insert(
                    (namespace.to_string(), name.to_string()),
                    version.to_string(),
                );
        }
    }

    /// Follows one event of the watch of `scope` (a namespace, or None for all).
    pub fn apply(&self, scope: Option<&str>, event: &Event<PartialObjectMeta<Secret>>) {
        let scope_name = scope;
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
            // A first list that starts over after a failure is a re-list of what it saw.
            Event::Init if scope.listed || !scope.current.is_empty() => {
                scope.listing = Some(HashMap::new());
            }
            Event::Init => {}
            Event::InitApply(secret) => {
                if let Some((key, version)) = entry(secret) {
                    match scope.listing.as_mut() {
                        Some(listing) => listing.insert(key, version),
                        None => scope.current.insert(key, version),
                    };
                }
            }
            Event::InitDone => {
                if let Some(listed) = scope.listing.take() {
                    scope.current = listed;
                }
                if !scope.listed {
                    scope.listed = true;
                    let covers = |ns: &str| scope_name.is_none_or(|s| s == ns);
                    let mut provisional = self.provisional.write().expect("secret versions lock");
                    provisional.retain(|(ns, _), _| !covers(ns));
                    provisional.shrink_to_fit();
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
        assert_eq!(
            versions.get("a", "s1").as_deref(),
            Some("1"),
            "the first list is seen as it comes"
        );
        versions.apply(all, &Event::InitApply(secret("a", "s2", "2")));
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
        assert_eq!(
            versions.get("a", "s3"),
            None,
            "a re-list is swapped in when it is done"
        );
        assert_eq!(versions.get("a", "s1").as_deref(), Some("5"));
        versions.apply(all, &Event::InitDone);
        assert_eq!(versions.get("a", "s1"), None);
        assert_eq!(versions.get("b", "other"), None);
        assert_eq!(versions.get("a", "s3").as_deref(), Some("7"));
        // A namespace's own scope.
        versions.apply(Some("c"), &Event::Apply(secret("c", "s", "9")));
        assert_eq!(versions.get("c", "s").as_deref(), Some("9"));
    }

    #[test]
    fn versions_read_before_the_first_list_count_until_it_is_done() {
        let versions = SecretVersions::default();
        let scope = Some("a");
        versions.apply(scope, &Event::Init);
        versions.apply(scope, &Event::InitApply(secret("a", "listed", "1")));
        // Read from the API while the list is under way.
        versions.read("a", "early", "4");
        versions.read("a", "gone", "5");
        versions.read("a", "listed", "1");
        assert_eq!(versions.get("a", "early").as_deref(), Some("4"));
        assert_eq!(versions.get("a", "gone").as_deref(), Some("5"));
        // The list comes to one of them; the other was deleted before the list.
        versions.apply(scope, &Event::InitApply(secret("a", "early", "4")));
        versions.apply(scope, &Event::InitDone);
        assert_eq!(versions.get("a", "early").as_deref(), Some("4"));
        assert_eq!(versions.get("a", "gone"), None, "the list knows better");
        // After the first list, reads are never taken for what the watch saw.
        versions.read("a", "later", "9");
        assert_eq!(versions.get("a", "later"), None);
    }

    #[test]
    fn a_first_list_that_starts_over_forgets_what_went_meanwhile() {
        let versions = SecretVersions::default();
        versions.apply(None, &Event::Init);
        versions.apply(None, &Event::InitApply(secret("a", "deleted", "1")));
        // The list failed half-way and starts again; the Secret was deleted in between.
        versions.apply(None, &Event::Init);
        versions.apply(None, &Event::InitApply(secret("a", "kept", "2")));
        versions.apply(None, &Event::InitDone);
        assert_eq!(versions.get("a", "deleted"), None);
        assert_eq!(versions.get("a", "kept").as_deref(), Some("2"));
    }
}
