//! Conversion between the stored form of an object and the version a request speaks.
//!
//! Custom resources use the `None` conversion strategy (only `apiVersion` changes), and
//! `events.k8s.io/v1` events are the core events renamed, as the real server converts them.

use serde_json::{Map, Value, json};

use super::resource::{Behaviour, ResourceDef};

/// `(core/v1 field, events.k8s.io/v1 field)`.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("message", "note"),
    ("involvedObject", "regarding"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename(obj: &mut Value, from_core: bool) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let mut renamed = Map::new();
    for (k, v) in std::mem::take(map) {
        let name = EVENT_FIELDS
            .iter()
            .find(|(core, v1)| if from_core { core == &k } else { v1 == &k })
            .map(|(core, v1)| if from_core { v1 } else { core })
            .map_or(k, |s| s.to_string());
        renamed.insert(name, v);
    }
    *map = renamed;
}

/// Stored form to the request's version.
pub(crate) fn outgoing(def: &ResourceDef, obj: &mut Value) {
    match def.behaviour {
        Behaviour::EventV1 => {
            rename(obj, true);
            obj["apiVersion"] = json!(def.api_version());
        }
        Behaviour::Custom => obj["apiVersion"] = json!(def.api_version()),
        _ => {}
    }
}

/// The request's version to the stored form.
pub(crate) fn incoming(def: &ResourceDef, obj: &mut Value) {
    match def.behaviour {
        Behaviour::EventV1 => {
            rename(obj, false);
            obj["apiVersion"] = json!(def.storage_api_version);
        }
        Behaviour::Custom => obj["apiVersion"] = json!(def.storage_api_version),
        _ => {}
    }
}
