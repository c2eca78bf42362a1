//! What `apply`, `delete` and `get` print: a table, JSON or YAML. Statuses only, never a value.

use serde::Serialize;

use crate::crd::AppConnectionStatus;
use crate::reconcile::status::ready_condition;
use crate::reconcile::{Outcome, Reason};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// One printed line.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub name: String,
    /// What was done (or, in dry-run, would be): create, update, noop, delete, error, ...;
    /// empty for a row read from the store (`appconn get`), which did nothing.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub action: String,
    pub ready: bool,
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<AppConnectionStatus>,
    /// Ready (or cleanly deleted).
    #[serde(skip)]
    pub ok: bool,
}

impl Row {
    pub fn from_outcome(namespace: &str, name: &str, outcome: &Outcome) -> Self {
        let deleted = outcome.action.released();
        Row {
            namespace: namespace.into(),
            name: name.into(),
            action: outcome.action.as_str().into(),
            ready: outcome.ready,
            reason: outcome.reason.as_str().into(),
            message: outcome.message.clone(),
            status: outcome.status.clone(),
            ok: outcome.ready || deleted,
        }
    }

    pub fn from_status(namespace: &str, name: &str, status: Option<&AppConnectionStatus>) -> Self {
        let ready = ready_condition(status);
        Row {
            namespace: namespace.into(),
            name: name.into(),
            action: String::new(),
            ready: ready.is_some_and(|c| c.status == "True"),
            reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
            message: ready.map(|c| c.message.clone()).unwrap_or_default(),
            status: status.cloned(),
            ok: ready.is_some_and(|c| c.status == "True"),
        }
    }

    pub fn refused(namespace: &str, name: &str, reason: Reason, message: String) -> Self {
        Row {
            namespace: namespace.into(),
            name: name.into(),
            action: "error".into(),
            ready: false,
            reason: reason.as_str().into(),
            message,
            status: None,
            ok: false,
        }
    }

    /// A document refused before reconcile (invalid object).
    pub fn rejected(object: &str, message: &str) -> Self {
        let (namespace, name) = object
            .rsplit_once(' ')
            .map(|(_, id)| id.split_once('/').unwrap_or(("", id)))
            .unwrap_or(("", object));
        Row::refused(namespace, name, Reason::InvalidSpec, message.to_string())
    }
}

/// Renders rows in the chosen format.
pub fn render(rows: &[Row], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).expect("rows serialize") + "\n",
        Format::Yaml => serde_yaml::to_string(rows).expect("rows serialize"),
        Format::Table => table(rows),
    }
}

fn table(rows: &[Row]) -> String {
    // Rows read from the store did nothing: no ACTION column then.
    let acted = rows.iter().any(|r| !r.action.is_empty());
    let header: Vec<&str> = [
        "NAMESPACE",
        "NAME",
        "ACTION",
        "READY",
        "REASON",
        "VERSION",
        "ID",
        "HASH",
        "MESSAGE",
    ]
    .into_iter()
    .filter(|h| acted || *h != "ACTION")
    .collect();
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for row in rows {
        let status = row.status.as_ref();
        let mut line = vec![row.namespace.clone(), row.name.clone()];
        if acted {
            line.push(row.action.clone());
        }
        line.extend([
            if row.ready {
                "True".into()
            } else {
                "False".into()
            },
            row.reason.clone(),
            status
                .and_then(|s| s.version)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            status
                .and_then(|s| s.id.clone())
                .unwrap_or_else(|| "-".into()),
            status
                .and_then(|s| s.credentials_hash.clone())
                .unwrap_or_else(|| "-".into()),
            row.message.clone(),
        ]);
        lines.push(line);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == line.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
