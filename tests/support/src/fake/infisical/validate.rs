//! Zod-like validation of create and update bodies: every issue at once, unknown keys refused.

use serde_json::{Map, Value, json};

use super::Connection;
use super::apps::{AppDef, Kind, MethodDef, method_def};

/// The fields of a create or update body, after zod-like validation.
pub(super) struct Write {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub method: Option<&'static MethodDef>,
    pub credentials: Option<Map<String, Value>>,
    pub project_id: Option<String>,
    pub platform_managed: Option<bool>,
    pub gateway_id: Option<Option<String>>,
    pub auto_rotation: Option<bool>,
    pub rotation: Option<(u64, u64, u64)>,
}

/// Validates a create body (`existing` None) or an update body against the app's schema, the
/// way zod would: every issue at once, unknown keys refused.
pub(super) fn parse_write(
    def: &AppDef,
    body: &Value,
    existing: Option<&Connection>,
) -> Result<Write, Vec<Value>> {
    let Some(object) = body.as_object() else {
        return Err(vec![issue(
            &[],
            "invalid_type",
            format!("Expected object, received {}", type_name(body)),
        )]);
    };
    let creating = existing.is_none();
    let mut allowed = vec![
        "name",
        "description",
        "credentials",
        "isAutoRotationEnabled",
        "rotation",
    ];
    if creating {
        allowed.extend(["method", "projectId"]);
    }
    if def.platform_managed {
        allowed.push("isPlatformManagedCredentials");
    }
    if def.gateway {
        allowed.push("gatewayId");
    }
    let mut issues = Vec::new();
    unrecognized_keys(object, &[], |k| allowed.contains(&k), &mut issues);

    let name = match object.get("name") {
        None if creating => {
            issues.push(issue(&["name"], "invalid_type", "Required"));
            None
        }
        None => None,
        Some(Value::String(name)) => {
            let name = name.trim();
            if name.is_empty() {
                issues.push(issue(
                    &["name"],
                    "too_small",
                    "String must contain at least 1 character(s)",
                ));
            } else if name.chars().count() > 64 {
                issues.push(issue(
                    &["name"],
                    "too_big",
                    "String must contain at most 64 character(s)",
                ));
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                issues.push(issue(&["name"], "custom", "Must be valid slug"));
            }
            Some(name.to_owned())
        }
        Some(other) => {
            issues.push(type_issue(&["name"], "string", other));
            None
        }
    };

    let description = match object.get("description") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(d)) if d.chars().count() > 256 => {
            issues.push(issue(
                &["description"],
                "too_big",
                "String must contain at most 256 character(s)",
            ));
            None
        }
        Some(Value::String(d)) => Some(Some(d.clone())),
        Some(other) => {
            issues.push(type_issue(&["description"], "string", other));
            None
        }
    };

    let method = match (existing, object.get("method")) {
        (Some(existing), _) => method_def(def, existing.method),
        (None, Some(Value::String(m))) if method_def(def, m).is_some() => method_def(def, m),
        (None, _) => {
            let expected: Vec<String> = def
                .methods
                .iter()
                .map(|m| format!("'{}'", m.name))
                .collect();
            issues.push(issue(
                &["method"],
                "invalid_union_discriminator",
                format!(
                    "Invalid discriminator value. Expected {}",
                    expected.join(" | ")
                ),
            ));
            None
        }
    };

    let credentials = match (object.get("credentials"), method) {
        (None, _) if creating => {
            issues.push(issue(&["credentials"], "invalid_type", "Required"));
            None
        }
        (None, _) => None,
        (Some(Value::Object(given)), Some(method)) => {
            check_credentials(method, given, &mut issues);
            Some(given.clone())
        }
        (Some(Value::Object(_)), None) => None,
        (Some(other), _) => {
            issues.push(type_issue(&["credentials"], "object", other));
            None
        }
    };

    let project_id = match object.get("projectId") {
        None => None,
        Some(Value::String(p)) if !p.trim().is_empty() => Some(p.clone()),
        Some(Value::String(_)) => {
            issues.push(issue(
                &["projectId"],
                "too_small",
                "String must contain at least 1 character(s)",
            ));
            None
        }
        Some(other) => {
            issues.push(type_issue(&["projectId"], "string", other));
            None
        }
    };

    let platform_managed = optional_bool(object, "isPlatformManagedCredentials", &mut issues);
    let gateway_id = match object.get("gatewayId") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(g)) => Some(Some(g.clone())),
        Some(other) => {
            issues.push(type_issue(&["gatewayId"], "string", other));
            None
        }
    };
    let auto_rotation = optional_bool(object, "isAutoRotationEnabled", &mut issues);
    let rotation = match object.get("rotation") {
        None | Some(Value::Null) => None,
        Some(rotation) => parse_rotation(rotation, &mut issues),
    };
    let has_rotation = rotation.is_some() || existing.is_some_and(|e| e.rotation.is_some());
    if auto_rotation == Some(true) && !has_rotation && !object.contains_key("rotation") {
        issues.push(issue(
            &["rotation"],
            "custom",
            "Rotation configuration is required when auto-rotation is enabled",
        ));
    }

    if issues.is_empty() {
        Ok(Write {
            name,
            description,
            method,
            credentials,
            project_id,
            platform_managed,
            gateway_id,
            auto_rotation,
            rotation,
        })
    } else {
        Err(issues)
    }
}

fn check_credentials(method: &MethodDef, given: &Map<String, Value>, issues: &mut Vec<Value>) {
    for field in method.fields {
        match given.get(field.name) {
            None if field.required => {
                issues.push(issue(
                    &["credentials", field.name],
                    "invalid_type",
                    "Required",
                ));
            }
            None => {}
            Some(value) => {
                let (ok, expected) = match field.kind {
                    Kind::Str => (value.is_string(), "string"),
                    Kind::Num => (value.is_number(), "number"),
                    Kind::Bool => (value.is_boolean(), "boolean"),
                };
                if !ok {
                    issues.push(type_issue(&["credentials", field.name], expected, value));
                } else if field.kind == Kind::Str
                    && field.required
                    && value.as_str().is_some_and(|s| s.trim().is_empty())
                {
                    issues.push(issue(
                        &["credentials", field.name],
                        "too_small",
                        "String must contain at least 1 character(s)",
                    ));
                }
            }
        }
    }
    unrecognized_keys(
        given,
        &["credentials"],
        |k| method.fields.iter().any(|f| f.name == k),
        issues,
    );
}

/// One issue naming every key of `object` that is not `known`.
fn unrecognized_keys(
    object: &Map<String, Value>,
    path: &[&str],
    known: impl Fn(&str) -> bool,
    issues: &mut Vec<Value>,
) {
    let unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|k| !known(k))
        .collect();
    if !unknown.is_empty() {
        let quoted: Vec<String> = unknown.iter().map(|k| format!("'{k}'")).collect();
        issues.push(json!({
            "code": "unrecognized_keys",
            "keys": unknown,
            "path": path,
            "message": format!("Unrecognized key(s) in object: {}", quoted.join(", ")),
        }));
    }
}

fn parse_rotation(rotation: &Value, issues: &mut Vec<Value>) -> Option<(u64, u64, u64)> {
    let Some(object) = rotation.as_object() else {
        issues.push(type_issue(&["rotation"], "object", rotation));
        return None;
    };
    let before = issues.len();
    let number =
        |value: Option<&Value>, path: &[&str], min: u64, max: u64, issues: &mut Vec<Value>| {
            match value {
                None => {
                    issues.push(issue(path, "invalid_type", "Required"));
                    None
                }
                Some(v) => match v.as_u64() {
                    Some(n) if n < min => {
                        issues.push(issue(
                            path,
                            "too_small",
                            format!("Number must be greater than or equal to {min}"),
                        ));
                        None
                    }
                    Some(n) if n > max => {
                        issues.push(issue(
                            path,
                            "too_big",
                            format!("Number must be less than or equal to {max}"),
                        ));
                        None
                    }
                    Some(n) => Some(n),
                    None => {
                        issues.push(type_issue(path, "number", v));
                        None
                    }
                },
            }
        };
    let interval = number(
        object.get("rotationInterval"),
        &["rotation", "rotationInterval"],
        1,
        365,
        issues,
    );
    let at = object.get("rotateAtUtc");
    let (hours, minutes) = match at.and_then(Value::as_object) {
        Some(at) => (
            number(
                at.get("hours"),
                &["rotation", "rotateAtUtc", "hours"],
                0,
                23,
                issues,
            ),
            number(
                at.get("minutes"),
                &["rotation", "rotateAtUtc", "minutes"],
                0,
                59,
                issues,
            ),
        ),
        None => {
            match at {
                None => issues.push(issue(
                    &["rotation", "rotateAtUtc"],
                    "invalid_type",
                    "Required",
                )),
                Some(other) => {
                    issues.push(type_issue(&["rotation", "rotateAtUtc"], "object", other))
                }
            }
            (None, None)
        }
    };
    (issues.len() == before).then(|| (interval.unwrap(), hours.unwrap(), minutes.unwrap()))
}

fn optional_bool(object: &Map<String, Value>, key: &str, issues: &mut Vec<Value>) -> Option<bool> {
    match object.get(key) {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            issues.push(type_issue(&[key], "boolean", other));
            None
        }
    }
}

pub(super) fn required_string(body: &Value, key: &str, issues: &mut Vec<Value>) -> Option<String> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            issues.push(issue(
                &[key],
                "too_small",
                "String must contain at least 1 character(s)",
            ));
            None
        }
        None => {
            issues.push(issue(&[key], "invalid_type", "Required"));
            None
        }
        Some(other) => {
            issues.push(type_issue(&[key], "string", other));
            None
        }
    }
}

fn issue(path: &[&str], code: &str, message: impl Into<String>) -> Value {
    json!({"code": code, "path": path, "message": message.into()})
}

fn type_issue(path: &[&str], expected: &str, got: &Value) -> Value {
    json!({
        "code": "invalid_type",
        "expected": expected,
        "received": type_name(got),
        "path": path,
        "message": format!("Expected {expected}, received {}", type_name(got)),
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
