//! The operator's cached form of an AppConnection, read straight from the watch's JSON.
//!
//! kube's `DeserializeGuard` reads an object into a generic value tree, copies the tree and reads
//! the copy into the type, every field of the metadata included; the cache then drops most of
//! the metadata again. [`CachedConnection`] skips what the operator never reads (managed fields,
//! labels, other tools' annotations such as kubectl's last-applied copy) without building it,
//! holds only spec and status as generic values before reading them, and still keeps an object
//! that does not parse, as its metadata and the reason, so that it can be reported.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::crd::{AppConnection, AppConnectionSpec, AppConnectionStatus};

/// The prefix of the annotations the operator reads (the create-pending mark).
const OWN_ANNOTATIONS: &str = "appconn.io/";

/// An AppConnection as the watch delivered it, or why it could not be read.
#[derive(Clone, Debug)]
pub struct CachedConnection(pub Result<AppConnection, InvalidObject>);

impl<'de> Deserialize<'de> for CachedConnection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The metadata is read as it comes; spec and status are held as generic values first
        // (they are small), so that an object whose spec does not parse keeps its metadata.
        let Parts {
            metadata,
            spec,
            status,
        } = Parts::deserialize(deserializer)?;
        let read = || -> Result<_, serde_json::Error> {
            let spec = spec.ok_or_else(|| de::Error::missing_field("spec"))?;
            Ok((
                AppConnectionSpec::deserialize(spec)?,
                Option::<AppConnectionStatus>::deserialize(status.unwrap_or_default())?,
            ))
        };
        Ok(CachedConnection(match read() {
            Ok((spec, status)) => Ok(AppConnection {
                metadata: metadata.0,
                spec,
                status,
            }),
            Err(e) => Err(InvalidObject {
                error: e.to_string(),
                metadata: metadata.0,
            }),
        }))
    }
}

#[derive(Deserialize)]
struct Parts {
    #[serde(default)]
    metadata: Metadata,
    spec: Option<serde_json::Value>,
    status: Option<serde_json::Value>,
}

/// A watched object that may not have parsed: kube's `DeserializeGuard` or a
/// [`CachedConnection`].
pub trait Guarded: Resource<DynamicType = ()> {
    type Object;

    fn parsed(&self) -> &Result<Self::Object, InvalidObject>;
}

impl<K: Resource<DynamicType = ()>> Guarded for DeserializeGuard<K> {
    type Object = K;

    fn parsed(&self) -> &Result<K, InvalidObject> {
        &self.0
    }
}

impl Guarded for CachedConnection {
    type Object = AppConnection;

    fn parsed(&self) -> &Result<AppConnection, InvalidObject> {
        &self.0
    }
}

impl Resource for CachedConnection {
    type DynamicType = ();
    type Scope = <AppConnection as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        AppConnection::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        AppConnection::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        AppConnection::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        AppConnection::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0
            .as_ref()
            .map_or_else(|e| &e.metadata, |c| &c.metadata)
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0
            .as_mut()
            .map_or_else(|e| &mut e.metadata, |c| &mut c.metadata)
    }
}

/// ObjectMeta without what the operator never reads. Unknown keys (`managedFields`, `labels`)
/// are skipped by the parser without being built.
#[derive(Default)]
struct Metadata(ObjectMeta);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            annotations: Option<OwnAnnotations>,
            creation_timestamp: Option<Time>,
            deletion_grace_period_seconds: Option<i64>,
            deletion_timestamp: Option<Time>,
            finalizers: Option<Vec<String>>,
            generate_name: Option<String>,
            generation: Option<i64>,
            name: Option<String>,
            namespace: Option<String>,
            owner_references: Option<Vec<OwnerReference>>,
            resource_version: Option<String>,
            uid: Option<String>,
        }
        let w = Wire::deserialize(deserializer)?;
        Ok(Metadata(ObjectMeta {
            annotations: w.annotations.map(|a| a.0),
            creation_timestamp: w.creation_timestamp,
            deletion_grace_period_seconds: w.deletion_grace_period_seconds,
            deletion_timestamp: w.deletion_timestamp,
            finalizers: w.finalizers,
            generate_name: w.generate_name,
            generation: w.generation,
            name: w.name,
            namespace: w.namespace,
            owner_references: w.owner_references,
            resource_version: w.resource_version,
            uid: w.uid,
            ..ObjectMeta::default()
        }))
    }
}

/// The `appconn.io/` annotations of a map. A map that holds none is kept, empty: the operator's
/// patches of the create-pending mark rely on the cached map existing when the server's does.
struct OwnAnnotations(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for OwnAnnotations {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Own;
        impl<'de> Visitor<'de> for Own {
            type Value = OwnAnnotations;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut own = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key.starts_with(OWN_ANNOTATIONS) {
                        own.insert(key, map.next_value()?);
                    } else {
                        // Skipped by the parser: a last-applied copy is never built.
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(OwnAnnotations(own))
            }
        }
        deserializer.deserialize_map(Own)
    }
}

#[cfg(test)]
mod tests {
    use kube::api::WatchEvent;
    use serde_json::json;

    use super::*;

    fn object(spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
            "metadata": {
                "name": "c", "namespace": "n", "uid": "u-1", "resourceVersion": "42",
                "generation": 3, "finalizers": ["appconn.io/cleanup"],
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "deletionTimestamp": "2026-01-02T03:04:06Z",
                "labels": {"team": "data"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}",
                    "appconn.io/create-pending": "true",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": spec,
            "status": {"id": "id-1", "observedGeneration": 3},
        })
    }

    /// Read as a watch reads it: serde_json over the event's bytes, `type` first as an API
    /// server sends it (the object read as it comes); the other order (the object held by
    /// serde until the tag is known) must read the same.
    fn watched(object: serde_json::Value) -> CachedConnection {
        let read = |line: String| match serde_json::from_str(&line).unwrap() {
            WatchEvent::<CachedConnection>::Added(conn) => conn,
            _ => panic!("an ADDED event"),
        };
        let conn = read(format!(r#"{{"type": "ADDED", "object": {object}}}"#));
        let held = read(format!(r#"{{"object": {object}, "type": "ADDED"}}"#));
        assert_eq!(held.meta(), conn.meta());
        let content = |c: &CachedConnection| match &c.0 {
            Ok(c) => Ok((c.spec.clone(), c.status.clone())),
            Err(e) => Err(e.error.clone()),
        };
        assert_eq!(content(&held), content(&conn));
        conn
    }

    /// What kube's own guard reads of the same object, less what the cache leaves out.
    fn expected_meta(object: serde_json::Value) -> ObjectMeta {
        let guard: DeserializeGuard<AppConnection> = serde_json::from_value(object).unwrap();
        let mut meta = guard.meta().clone();
        meta.managed_fields = None;
        meta.labels = None;
        meta.annotations =
            Some([("appconn.io/create-pending".to_string(), "true".to_string())].into());
        meta
    }

    #[test]
    fn a_connection_is_read_without_what_the_operator_never_reads() {
        let object = object(json!({"app": "mssql"}));
        let conn = watched(object.clone());
        assert_eq!(conn.meta(), &expected_meta(object.clone()));
        let guard: DeserializeGuard<AppConnection> = serde_json::from_value(object).unwrap();
        let (ours, kubes) = (conn.0.unwrap(), guard.0.unwrap());
        assert_eq!(ours.spec, kubes.spec);
        assert_eq!(ours.status, kubes.status);
    }

    #[test]
    fn an_unreadable_connection_keeps_its_metadata_and_says_why() {
        let object = object(json!({"app": 5}));
        let conn = watched(object.clone());
        assert_eq!(conn.meta(), &expected_meta(object));
        let invalid = conn.0.unwrap_err();
        assert!(
            invalid
                .error
                .starts_with("invalid type: integer `5`, expected a string"),
            "{}",
            invalid.error
        );
    }

    #[test]
    fn annotations_without_own_keys_stay_an_empty_map_and_absent_ones_absent() {
        let mut with_others = object(json!({"app": "mssql"}));
        with_others["metadata"]["annotations"] = json!({"helm.sh/resource-policy": "keep"});
        assert_eq!(
            watched(with_others).meta().annotations,
            Some(BTreeMap::new())
        );
        let mut none = object(json!({"app": "mssql"}));
        none["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        assert_eq!(watched(none.clone()).meta().annotations, None);
        none["metadata"]["annotations"] = serde_json::Value::Null;
        assert_eq!(watched(none).meta().annotations, None);
    }

    #[test]
    fn a_connection_without_a_spec_is_unreadable() {
        let mut object = object(json!({}));
        object.as_object_mut().unwrap().remove("spec");
        let invalid = watched(object).0.unwrap_err();
        assert_eq!(invalid.error, "missing field `spec`");
        assert_eq!(invalid.metadata.name.as_deref(), Some("c"));
    }

    #[test]
    fn an_object_that_is_not_one_fails_the_read() {
        let line = br#"{"type": "ADDED", "object": {"metadata": 7, "spec": {}}}"#;
        assert!(serde_json::from_slice::<WatchEvent<CachedConnection>>(line).is_err());
    }
}
