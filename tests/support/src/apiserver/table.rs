//! `meta.k8s.io` Table rendering, which `kubectl get` asks for, with the JSONPath subset that
//! printer columns use (`.a.b`, `[0]`, `[*]`, `[?(@.type=="Ready")]`).

use serde_json::{Value, json};

use super::meta::{age_secs, human_duration};
use super::resource::{Column, ResourceDef};

/// What each row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    Filter(Vec<String>, String),
}

fn parse(path: &str) -> Vec<Step> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut steps = Vec::new();
    let chars: Vec<char> = path.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if !name.is_empty() {
                    steps.push(Step::Field(name));
                }
            }
            '[' => {
                let start = i + 1;
                let mut depth = 0;
                while i < chars.len() {
                    match chars[i] {
                        '[' => depth += 1,
                        ']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                let inner: String = chars[start..i.min(chars.len())].iter().collect();
                i += 1;
                let inner = inner.trim();
                if inner == "*" {
                    steps.push(Step::All);
                } else if let Ok(n) = inner.parse() {
                    steps.push(Step::Index(n));
                } else if let Some(filter) =
                    inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')'))
                {
                    if let Some((lhs, rhs)) = filter.split_once("==") {
                        let field: Vec<String> = lhs
                            .trim()
                            .trim_start_matches('@')
                            .split('.')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect();
                        let want = rhs
                            .trim()
                            .trim_matches(|c| c == '"' || c == '\'')
                            .to_string();
                        steps.push(Step::Filter(field, want));
                    }
                } else {
                    steps.push(Step::Field(
                        inner.trim_matches(|c| c == '"' || c == '\'').to_string(),
                    ));
                }
            }
            _ => i += 1,
        }
    }
    steps
}

fn eval<'a>(obj: &'a Value, steps: &[Step]) -> Vec<&'a Value> {
    let mut cur = vec![obj];
    for step in steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(f) => next.extend(v.get(f)),
                Step::Index(n) => next.extend(v.get(*n)),
                Step::All => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(m) => next.extend(m.values()),
                    _ => {}
                },
                Step::Filter(field, want) => {
                    if let Value::Array(a) = v {
                        next.extend(a.iter().filter(|item| {
                            let got = field.iter().try_fold(*item, |x, k| x.get(k));
                            match got {
                                Some(Value::String(s)) => s == want,
                                Some(other) => {
                                    serde_json::to_string(other).is_ok_and(|o| o == *want)
                                }
                                None => false,
                            }
                        }));
                    }
                }
            }
        }
        cur = next;
    }
    cur
}

fn cell(obj: &Value, col: &Column) -> Value {
    let found = eval(obj, &parse(&col.json_path));
    let Some(first) = found.first() else {
        return Value::Null;
    };
    match (col.type_.as_str(), first) {
        ("date", Value::String(ts)) => {
            age_secs(ts).map_or(Value::Null, |s| json!(human_duration(s)))
        }
        (_, Value::String(s)) => json!(s),
        (_, Value::Number(_) | Value::Bool(_)) => (*first).clone(),
        (_, other) => json!(other.to_string()),
    }
}

pub(crate) fn column_definitions(def: &ResourceDef) -> Value {
    let cols: Vec<Value> = def
        .columns
        .iter()
        .map(|c| {
            let format = if c.json_path == ".metadata.name" {
                "name"
            } else {
                c.format.as_str()
            };
            json!({"name": c.name, "type": if c.type_ == "date" { "string" } else { &c.type_ },
                   "format": format, "description": c.description, "priority": c.priority})
        })
        .collect();
    Value::Array(cols)
}

pub(crate) fn row(def: &ResourceDef, obj: &Value, include: Include) -> Value {
    let cells: Vec<Value> = def.columns.iter().map(|c| cell(obj, c)).collect();
    let object = match include {
        Include::None => Value::Null,
        Include::Metadata => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                    "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
        }
        Include::Object => obj.clone(),
    };
    json!({"cells": cells, "object": object})
}

pub(crate) fn table(
    def: &ResourceDef,
    version: &str,
    objects: &[Value],
    list_meta: Value,
    include: Include,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": list_meta,
        "columnDefinitions": column_definitions(def),
        "rows": objects.iter().map(|o| row(def, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let obj = json!({"status": {"conditions": [
            {"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]},
            "spec": {"items": [{"n": 1}, {"n": 2}]}});
        let ready = eval(
            &obj,
            &parse(".status.conditions[?(@.type==\"Ready\")].status"),
        );
        assert_eq!(ready, vec![&json!("True")]);
        assert_eq!(eval(&obj, &parse(".spec.items[1].n")), vec![&json!(2)]);
        assert_eq!(eval(&obj, &parse(".spec.items[*].n")).len(), 2);
        assert!(eval(&obj, &parse(".spec.missing")).is_empty());
    }
}
