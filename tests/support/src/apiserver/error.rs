//! `metav1.Status` failures shaped exactly like the real API server's, because clients (and the
//! operator's error classification) branch on `code`, `reason` and `details`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::resource::ResourceDef;

/// One entry of `details.causes`, i.e. one Go `field.Error`.
#[derive(Clone, Debug)]
pub(crate) struct Cause {
    pub reason: &'static str,
    pub field: String,
    /// What follows the field in the message, e.g. `Invalid value: "X": must be ...`.
    pub body: String,
}

impl Cause {
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Cause {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        let body = if detail.is_empty() {
            format!("Invalid value: {shown}")
        } else {
            format!("Invalid value: {shown}: {detail}")
        };
        Cause {
            reason: "FieldValueInvalid",
            field: field.into(),
            body,
        }
    }

    pub fn required(field: impl Into<String>, detail: &str) -> Cause {
        let body = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Cause {
            reason: "FieldValueRequired",
            field: field.into(),
            body,
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueForbidden",
            field: field.into(),
            body: format!("Forbidden: {detail}"),
        }
    }

    pub fn unsupported(field: impl Into<String>, value: &Value, allowed: &[String]) -> Cause {
        let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Cause {
            reason: "FieldValueNotSupported",
            field: field.into(),
            body: format!(
                "Unsupported value: {shown}: supported values: {}",
                allowed.join(", ")
            ),
        }
    }

    pub fn too_long(field: impl Into<String>, max: usize) -> Cause {
        Cause {
            reason: "FieldValueTooLong",
            field: field.into(),
            body: format!("Too long: may not be more than {max} bytes"),
        }
    }

    pub fn type_invalid(field: impl Into<String>, value: &Value, detail: &str) -> Cause {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Cause {
            reason: "FieldValueTypeInvalid",
            field: field.into(),
            body: format!("Invalid value: {shown}: {detail}"),
        }
    }

    pub fn message(&self) -> String {
        if self.field.is_empty() {
            self.body.clone()
        } else {
            format!("{}: {}", self.field, self.body)
        }
    }
}

/// A failed request, rendered as a `Status` body with the matching HTTP code.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", def.qualified()),
        )
        .with_details(details(def, name))
    }

    pub fn unknown_resource() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", def.qualified()),
        )
        .with_details(details(def, name))
    }

    pub fn conflict(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                def.qualified()
            ),
        )
        .with_details(details(def, name))
    }

    pub fn stale(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and \
             try again",
        )
    }

    pub fn invalid(def: &ResourceDef, name: &str, causes: &[Cause]) -> ApiError {
        ApiError::invalid_kind(&def.group, &def.kind, name, causes)
    }

    /// Invalid request options (`PatchOptions`, `ListOptions`, ...), in group `meta.k8s.io`.
    pub fn invalid_options(kind: &str, causes: &[Cause]) -> ApiError {
        ApiError::invalid_kind("meta.k8s.io", kind, "", causes)
    }

    fn invalid_kind(group: &str, kind: &str, name: &str, causes: &[Cause]) -> ApiError {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let what = format!("{qualified} {name:?} is invalid");
        let message = match causes {
            [one] => format!("{what}: {}", one.message()),
            many => {
                let all: Vec<String> = many.iter().map(Cause::message).collect();
                format!("{what}: [{}]", all.join(", "))
            }
        };
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.body, "field": c.field}))
            .collect();
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if !group.is_empty() {
            d.insert("group".into(), json!(group));
        }
        d.insert("kind".into(), json!(kind));
        d.insert("causes".into(), Value::Array(causes));
        ApiError::new(422, "Invalid", message).with_details(Value::Object(d))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn forbidden(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        let target = if name.is_empty() {
            def.qualified()
        } else {
            format!("{} {name:?}", def.qualified())
        };
        ApiError::new(403, "Forbidden", format!("{target} is forbidden: {why}"))
            .with_details(details(def, name))
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types \
                 include: {}",
                accepted.join(", ")
            ),
        )
        .with_details(
            json!({"causes": [{"reason": "UnexpectedHeader", "field": "Content-Type",
            "message": format!("unsupported media type {content_type:?}")}]}),
        )
    }

    pub fn not_acceptable() -> ApiError {
        ApiError::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json, \
             application/json;as=Table;v=v1;g=meta.k8s.io, \
             application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io, \
             application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
        )
    }

    pub fn too_large_resource_version(asked: u64, current: u64) -> ApiError {
        let mut e = ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {asked}, current: {current}"),
        )
        .with_details(json!({"causes": [{"reason": "ResourceVersionTooLarge",
            "message": "Too large resource version"}], "retryAfterSeconds": 1}));
        e.retry_after = Some(1);
        e
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// The failure a real server would send with this code, for `fail_next`.
    pub fn injected(code: u16, def: &ResourceDef, name: &str) -> ApiError {
        match code {
            400 => ApiError::bad_request("injected failure"),
            401 => ApiError::new(401, "Unauthorized", "Unauthorized"),
            403 => ApiError::forbidden(def, name, "injected failure"),
            404 => ApiError::not_found(def, name),
            409 => ApiError::stale(def, name),
            410 => ApiError::gone("injected failure"),
            422 => ApiError::invalid(def, name, &[Cause::forbidden("", "injected failure")]),
            429 => {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Too many requests, please try again later.",
                )
                .with_details(json!({"retryAfterSeconds": 1}));
                e.retry_after = Some(1);
                e
            }
            503 => {
                let mut e = ApiError::new(503, "ServiceUnavailable", "injected failure");
                e.retry_after = Some(1);
                e
            }
            504 => ApiError::new(504, "Timeout", "injected failure"),
            other => ApiError::new(other, "InternalError", "injected failure"),
        }
    }

    pub fn to_status(&self) -> Value {
        let mut s = Map::new();
        s.insert("kind".into(), json!("Status"));
        s.insert("apiVersion".into(), json!("v1"));
        s.insert("metadata".into(), json!({}));
        s.insert("status".into(), json!("Failure"));
        s.insert("message".into(), json!(self.message));
        s.insert("reason".into(), json!(self.reason));
        if let Some(d) = &self.details {
            s.insert("details".into(), d.clone());
        }
        s.insert("code".into(), json!(self.code));
        Value::Object(s)
    }
}

/// `details` as the real server fills it: `kind` carries the resource plural here.
fn details(def: &ResourceDef, name: &str) -> Value {
    let mut d = Map::new();
    if !name.is_empty() {
        d.insert("name".into(), json!(name));
    }
    if !def.group.is_empty() {
        d.insert("group".into(), json!(def.group));
    }
    d.insert("kind".into(), json!(def.plural));
    Value::Object(d)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.to_status()).unwrap_or_default();
        let mut resp = (code, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
