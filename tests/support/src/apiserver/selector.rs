//! Label and field selectors with the grammar of `labels.Parse` and `fields.ParseSelector`.

use std::collections::BTreeMap;

use super::error::ApiError;
use super::meta::{label_value_errors, qualified_name_errors};

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Eq(x) => v == Some(x),
                Op::NotEq(x) => v != Some(x),
                Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
                Op::NotIn(xs) => v.is_none_or(|v| !xs.contains(v)),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_error(s: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {s:?}: {why}"))
}

fn check_key(key: &str, whole: &str) -> Result<String, ApiError> {
    let key = key.trim();
    if let Some(e) = qualified_name_errors(key).into_iter().next() {
        return Err(parse_error(
            whole,
            &format!("invalid label key {key:?}: {e}"),
        ));
    }
    Ok(key.to_string())
}

fn check_value(value: &str, whole: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if let Some(e) = label_value_errors(value).into_iter().next() {
        return Err(parse_error(
            whole,
            &format!("invalid label value: {value:?}: {e}"),
        ));
    }
    Ok(value.to_string())
}

fn parse_requirement(part: &str) -> Result<Requirement, ApiError> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement {
            key: check_key(key, part)?,
            op: Op::NotExists,
        });
    }
    if let Some(open) = part.find('(') {
        let close = part
            .rfind(')')
            .filter(|c| *c > open)
            .ok_or_else(|| parse_error(part, "found '(', expected: ')'"))?;
        let head: Vec<&str> = part[..open].split_whitespace().collect();
        let [key, op] = head.as_slice() else {
            return Err(parse_error(part, "expected: key in|notin (values)"));
        };
        let values = part[open + 1..close]
            .split(',')
            .map(|v| check_value(v, part))
            .collect::<Result<Vec<_>, _>>()?;
        let key = check_key(key, part)?;
        let op = match *op {
            "in" => Op::In(values),
            "notin" => Op::NotIn(values),
            other => return Err(parse_error(part, &format!("unknown operator {other:?}"))),
        };
        return Ok(Requirement { key, op });
    }
    for (sym, ctor) in [
        ("!=", Op::NotEq as fn(String) -> Op),
        ("==", Op::Eq as fn(String) -> Op),
        ("=", Op::Eq as fn(String) -> Op),
    ] {
        if let Some((k, v)) = part.split_once(sym) {
            return Ok(Requirement {
                key: check_key(k, part)?,
                op: ctor(check_value(v, part)?),
            });
        }
    }
    for (sym, gt) in [(">", true), ("<", false)] {
        if let Some((k, v)) = part.split_once(sym) {
            let n: i64 = v.trim().parse().map_err(|_| {
                parse_error(
                    part,
                    "for 'Gt', 'Lt' operators, the value must be an integer",
                )
            })?;
            let op = if gt { Op::Gt(n) } else { Op::Lt(n) };
            return Ok(Requirement {
                key: check_key(k, part)?,
                op,
            });
        }
    }
    Ok(Requirement {
        key: check_key(part, part)?,
        op: Op::Exists,
    })
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// `supported` lists the field labels this resource accepts besides `metadata.name` and
    /// `metadata.namespace`.
    pub fn parse(s: &str, supported: &[String]) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !supported.iter().any(|f| f == field)
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `value_of` resolves a field label on the candidate object.
    pub fn matches<'a>(&self, value_of: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let have = value_of(field).unwrap_or("");
            (have == want) == *eq
        })
    }

    /// The single name an `metadata.name=x` selector pins, used to avoid scanning.
    pub fn pinned_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, eq, _)| f == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_grammar() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web,db)", false),
            ("tier,app", true),
            ("!tier", false),
            ("!missing", true),
            ("missing", false),
            ("app=web,tier in (front)", true),
            ("n>4", true),
            ("n<4", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("bad key!=x").is_err());
    }

    #[test]
    fn field_grammar() {
        let s = FieldSelector::parse("metadata.name=a,metadata.namespace!=b", &[]).unwrap();
        assert!(s.matches(|f| if f == "metadata.name" {
            Some("a")
        } else {
            Some("c")
        }));
        assert!(!s.matches(|_| Some("b")));
        assert_eq!(s.pinned_name(), Some("a"));
        assert!(FieldSelector::parse("spec.x=1", &[]).is_err());
        assert!(FieldSelector::parse("type=Opaque", &["type".to_string()]).is_ok());
    }
}
