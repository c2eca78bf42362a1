//! Decoding of the Kubernetes protobuf envelope for the built-in kinds that kubectl's imperative
//! commands (`kubectl create namespace|secret|configmap|serviceaccount`) send as protobuf.
//! Responses stay JSON, which those clients also accept.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use super::error::ApiError;

const MAGIC: &[u8] = b"k8s\0";

/// One decoded field: varint or length-delimited payload.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ApiError> {
    fn varint(buf: &mut &[u8]) -> Result<u64, ApiError> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().ok_or_else(truncated)?;
            *buf = rest;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(truncated())
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(&mut buf)?),
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| truncated())?;
                if buf.len() < len {
                    return Err(truncated());
                }
                let (data, rest) = buf.split_at(len);
                buf = rest;
                Wire::Bytes(data)
            }
            1 => {
                buf = buf.get(8..).ok_or_else(truncated)?;
                continue;
            }
            5 => {
                buf = buf.get(4..).ok_or_else(truncated)?;
                continue;
            }
            _ => return Err(truncated()),
        };
        out.push((key >> 3, wire));
    }
    Ok(out)
}

fn truncated() -> ApiError {
    ApiError::bad_request("unable to decode protobuf body: malformed message")
}

fn string(w: &Wire) -> String {
    match w {
        Wire::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Wire::Varint(_) => String::new(),
    }
}

fn entry(w: &Wire, binary: bool) -> Result<(String, Value), ApiError> {
    let Wire::Bytes(b) = w else {
        return Err(truncated());
    };
    let mut key = String::new();
    let mut value = json!("");
    for (n, f) in fields(b)? {
        match (n, &f) {
            (1, _) => key = string(&f),
            (2, Wire::Bytes(v)) if binary => value = json!(B64.encode(v)),
            (2, _) => value = json!(string(&f)),
            _ => {}
        }
    }
    Ok((key, value))
}

fn object_meta(b: &[u8]) -> Result<Value, ApiError> {
    let mut m = Map::new();
    for (n, f) in fields(b)? {
        let name = match n {
            1 => "name",
            2 => "generateName",
            3 => "namespace",
            6 => "resourceVersion",
            11 | 12 => {
                let (k, v) = entry(&f, false)?;
                let key = if n == 11 { "labels" } else { "annotations" };
                m.entry(key).or_insert_with(|| json!({}))[k] = v;
                continue;
            }
            14 => {
                let list = m.entry("finalizers").or_insert_with(|| json!([]));
                if let Some(a) = list.as_array_mut() {
                    a.push(json!(string(&f)));
                }
                continue;
            }
            _ => continue,
        };
        m.insert(name.into(), json!(string(&f)));
    }
    Ok(Value::Object(m))
}

/// Decodes a protobuf request body for `kind` into the JSON form of the same object.
pub(crate) fn decode(body: &[u8], kind: &str) -> Result<Value, ApiError> {
    let unsupported = || {
        ApiError::unsupported_media_type(
            "application/vnd.kubernetes.protobuf",
            &["application/json", "application/yaml"],
        )
    };
    let envelope = body.strip_prefix(MAGIC).ok_or_else(truncated)?;
    let mut raw: &[u8] = &[];
    for (n, f) in fields(envelope)? {
        if let (2, Wire::Bytes(b)) = (n, f) {
            raw = b;
        }
    }
    let mut obj = Map::new();
    obj.insert("kind".into(), json!(kind));
    obj.insert("apiVersion".into(), json!("v1"));
    for (n, f) in fields(raw)? {
        match (kind, n, &f) {
            (_, 1, Wire::Bytes(b)) => {
                obj.insert("metadata".into(), object_meta(b)?);
            }
            ("Secret", 2, _) | ("ConfigMap", 2 | 3, _) | ("Secret", 4, _) => {
                let field = match (kind, n) {
                    ("Secret", 2) => "data",
                    ("Secret", _) => "stringData",
                    (_, 2) => "data",
                    _ => "binaryData",
                };
                let binary = matches!((kind, n), ("Secret", 2) | ("ConfigMap", 3));
                let (k, v) = entry(&f, binary)?;
                obj.entry(field).or_insert_with(|| json!({}))[k] = v;
            }
            ("Secret", 3, _) => {
                obj.insert("type".into(), json!(string(&f)));
            }
            ("Secret", 5, Wire::Varint(v)) | ("ConfigMap", 4, Wire::Varint(v)) => {
                obj.insert("immutable".into(), json!(*v != 0));
            }
            ("ServiceAccount", 4, Wire::Varint(v)) => {
                obj.insert("automountServiceAccountToken".into(), json!(*v != 0));
            }
            ("ServiceAccount", 3, Wire::Bytes(b)) => {
                let name = fields(b)?
                    .iter()
                    .find(|(n, _)| *n == 1)
                    .map(|(_, f)| string(f));
                let list = obj.entry("imagePullSecrets").or_insert_with(|| json!([]));
                if let Some(a) = list.as_array_mut() {
                    a.push(json!({"name": name.unwrap_or_default()}));
                }
            }
            ("Namespace" | "Secret" | "ConfigMap" | "ServiceAccount", _, _) => {}
            _ => return Err(unsupported()),
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![
            u8::try_from((n << 3) | 2).unwrap(),
            u8::try_from(payload.len()).unwrap(),
        ];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_secret() {
        let meta = [
            field(1, b"s1"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let data = [field(1, b"password"), field(2, b"hunter2")].concat();
        let secret = [field(1, &meta), field(2, &data), field(3, b"Opaque")].concat();
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &secret)].concat();
        let v = decode(&body, "Secret").unwrap();
        assert_eq!(
            v["metadata"],
            json!({"name": "s1", "labels": {"app": "web"}})
        );
        assert_eq!(v["data"]["password"], json!(B64.encode("hunter2")));
        assert_eq!(v["type"], "Opaque");
    }
}
