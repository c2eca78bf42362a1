//! JSON merge, JSON (RFC 6902) and strategic merge patches.

use serde_json::{Map, Value};

use super::error::ApiError;

pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902 patch with the real server's (evanphx/json-patch) leniency: a `test` for `null`
/// passes when the key is missing, which kube-runtime's finalizer helper relies on.
pub(crate) fn json_patch(target: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    let patch: json_patch::Patch =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    for op in patch.0 {
        if let json_patch::PatchOperation::Test(t) = &op
            && t.value.is_null()
            && target.pointer(t.path.as_str()).is_none()
        {
            let parent = t.path.parent().map_or("", |p| p.as_str());
            if target.pointer(parent).is_some() {
                continue;
            }
        }
        json_patch::patch(target, &[op])
            .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?;
    }
    Ok(())
}

/// Fields whose lists merge instead of being replaced: `None` merges primitives as a set,
/// `Some(key)` merges objects by that key (the `patchMergeKey` of the built-in types served).
fn merge_key(path: &[&str]) -> Option<Option<&'static str>> {
    match path {
        ["metadata", "finalizers"] => Some(None),
        ["metadata", "ownerReferences"] => Some(Some("uid")),
        ["secrets"] | ["imagePullSecrets"] => Some(Some("name")),
        _ => None,
    }
}

/// Strategic merge patch for the built-in kinds: a merge patch except for the merge-keyed lists
/// above and the `$patch`, `$deleteFromPrimitiveList`, `$setElementOrder` and `$retainKeys`
/// directives.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) {
    strategic(target, patch, &mut Vec::new());
}

fn strategic<'a>(target: &mut Value, patch: &'a Value, path: &mut Vec<&'a str>) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = p.clone();
            replaced.remove("$patch");
            *target = Value::Object(replaced);
            return;
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(remove)) = (
                target.get_mut(field).and_then(Value::as_array_mut),
                v.as_array(),
            ) {
                list.retain(|item| !remove.contains(item));
            }
            continue;
        }
        let t = target.as_object_mut().expect("made an object above");
        if v.is_null() {
            t.remove(k);
            continue;
        }
        path.push(k);
        match (merge_key(path), v) {
            (Some(key), Value::Array(items)) => {
                let existing = t.entry(k.clone()).or_insert_with(|| Value::Array(vec![]));
                if !existing.is_array() {
                    *existing = Value::Array(vec![]);
                }
                let list = existing.as_array_mut().expect("made an array above");
                for item in items {
                    match key {
                        None => {
                            if !list.contains(item) {
                                list.push(item.clone());
                            }
                        }
                        Some(key) => {
                            let id = item.get(key);
                            let delete =
                                item.get("$patch").and_then(Value::as_str) == Some("delete");
                            match list.iter().position(|i| i.get(key) == id) {
                                Some(idx) if delete => {
                                    list.remove(idx);
                                }
                                Some(idx) => {
                                    let mut merged = list[idx].clone();
                                    json_patch::merge(&mut merged, item);
                                    list[idx] = merged;
                                }
                                None if delete => {}
                                None => list.push(item.clone()),
                            }
                        }
                    }
                }
            }
            (_, Value::Object(_)) => {
                let child = t.entry(k.clone()).or_insert(Value::Null);
                strategic(child, v, path);
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_finalizers() {
        let mut obj =
            json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}}, "data": {"k": "v"}});
        strategic_merge(
            &mut obj,
            &json!({"metadata": {"finalizers": ["b"], "labels": {"x": null}}}),
        );
        assert_eq!(obj["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(obj["metadata"]["labels"], json!({}));
        strategic_merge(
            &mut obj,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(obj["metadata"]["finalizers"], json!(["b"]));
        strategic_merge(&mut obj, &json!({"data": {"$patch": "replace", "n": "1"}}));
        assert_eq!(obj["data"], json!({"n": "1"}));
    }
}
