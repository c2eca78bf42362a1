//! A breakdown by structure of a dhat heap profile: the bytes live when the profile was
//! written, grouped by what allocated them, read from the allocation stacks.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::report::MIB;

/// Structures by the path prefixes of the functions that allocate them.
const GROUPS: [(&str, &[&str]); 10] = [
    (
        "Secret versions (name -> resourceVersion)",
        &["appconn::controller::secrets"],
    ),
    (
        "per-connection memory (tracked, settled inputs)",
        &["appconn::controller::connections"],
    ),
    (
        "reference index (Secret/backend -> connections)",
        &["appconn::controller::index"],
    ),
    (
        "backend registry and clients",
        &["appconn::controller::backends", "appconn::backend"],
    ),
    (
        "AppConnection cache (decoded watch objects)",
        &[
            "kube_runtime::watcher",
            "kube_runtime::reflector",
            "kube_client::client::Client::request_events",
            "kube_client::api",
        ],
    ),
    (
        "controller queue and scheduler",
        &[
            "kube_runtime::controller",
            "kube_runtime::scheduler",
            "kube_runtime::utils",
        ],
    ),
    (
        "SQLite store (connection pool, page cache)",
        &["sqlx", "sqlite3", "appconn::store"],
    ),
    (
        "HTTP and TLS (clients, admin and store API servers)",
        &["hyper", "h2::", "rustls", "reqwest", "tower", "axum"],
    ),
    ("metrics, logging", &["prometheus_client", "tracing"]),
    ("tokio runtime", &["tokio::"]),
];

/// Prints the live bytes at the end of the profile in `path`, by structure, and the largest
/// allocation sites. Returns the printed lines (empty when the profile cannot be read).
pub fn breakdown(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![format!("no heap profile at {}", path.display())];
    };
    let Ok(profile) = serde_json::from_str::<Value>(&text) else {
        return vec![format!("{} is not a dhat profile", path.display())];
    };
    let frames: Vec<&str> = profile["ftbl"]
        .as_array()
        .map(|f| f.iter().map(|s| s.as_str().unwrap_or("")).collect())
        .unwrap_or_default();
    let mut groups: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut sites: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    for pp in profile["pps"].as_array().into_iter().flatten() {
        let bytes = pp["eb"].as_u64().unwrap_or(0);
        let blocks = pp["ebk"].as_u64().unwrap_or(0);
        if bytes == 0 {
            continue;
        }
        total += bytes;
        let stack: Vec<&str> = pp["fs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| frames.get(i.as_u64()? as usize).copied())
            .collect();
        // The innermost frame that belongs to a known structure decides; generic arguments
        // (a controller's reconcile function in a watcher's type) do not count.
        let group = stack
            .iter()
            .map(|f| function(f).trim_start_matches('<'))
            .find_map(|f| {
                GROUPS
                    .iter()
                    .find(|(_, marks)| marks.iter().any(|m| f.starts_with(m)))
            })
            .map_or("other", |(name, _)| name);
        let entry = groups.entry(group).or_default();
        entry.0 += bytes;
        entry.1 += blocks;
        // The allocation site: the innermost frame outside the allocator and the standard
        // library.
        let site = stack
            .iter()
            .map(|f| function(f))
            .find(|f| {
                ![
                    "alloc::",
                    "core::",
                    "std::",
                    "dhat::",
                    "hashbrown::",
                    "<alloc",
                    "<core",
                    "<std",
                    "__rust",
                    "<hashbrown",
                ]
                .iter()
                .any(|p| f.starts_with(p))
            })
            .unwrap_or("?")
            .to_string();
        *sites.entry(site).or_default() += bytes;
    }
    let mut lines = vec![format!(
        "live heap when the profile was written: {:.1} MiB",
        total as f64 / MIB
    )];
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.1.0));
    for (name, (bytes, blocks)) in groups {
        lines.push(format!(
            "  {:>6.1} MiB {:>4.0}%  {name} ({blocks} blocks)",
            bytes as f64 / MIB,
            100.0 * bytes as f64 / total.max(1) as f64
        ));
    }
    let mut sites: Vec<_> = sites.into_iter().collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    lines.push("largest allocation sites:".into());
    for (site, bytes) in sites.into_iter().take(8) {
        lines.push(format!("  {:>6.1} MiB  {site}", bytes as f64 / MIB));
    }
    lines
}

/// `0x1234: name::of::fn (file:line:col)` -> `name::of::fn`.
fn function(frame: &str) -> &str {
    let name = frame.split_once(": ").map_or(frame, |(_, rest)| rest);
    name.rsplit_once(" (").map_or(name, |(f, _)| f)
}
