//! A breakdown by structure of a dhat heap profile: the bytes live when the profile was
//! written, grouped by what allocated them, read from the allocation stacks.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::report::MIB;

/// Structures by the source files that allocate them (dhat's frames name a function and its
/// file, not its crate): a stack belongs to the group of its innermost frame that matches.
const GROUPS: [(&str, &[&str]); 11] = [
    (
        "AppConnection cache (objects in the reflector store)",
        &["reflector/store.rs", "reflector/object_ref.rs"],
    ),
    (
        "controller queue and scheduler",
        &[
            "src/scheduler.rs",
            "controller/runner.rs",
            "future_hash_map.rs",
        ],
    ),
    (
        "reference index (Secret/backend -> connections)",
        &["controller/index.rs"],
    ),
    (
        "per-connection state (versions written, inputs of the last Ready pass)",
        &["controller/connections.rs", "controller/kube_env.rs"],
    ),
    (
        "Secret versions (name -> resourceVersion)",
        &["controller/secrets.rs"],
    ),
    ("Event recorder", &["controller/events.rs"]),
    (
        "backend registry and clients",
        &[
            "controller/backends.rs",
            "controller/backend_status.rs",
            "src/backend/",
        ],
    ),
    ("store (SQLite through sqlx)", &["sqlx", "src/store/"]),
    (
        "HTTP and TLS (clients, admin and store API servers)",
        &["hyper", "proto/h1", "rustls", "reqwest", "axum", "tower"],
    ),
    ("tokio runtime", &["tokio-", "runtime/task", "sync/mpsc"]),
    ("metrics, logging", &["prometheus", "tracing"]),
];

/// Source files of the allocator, the standard library and the collections: never the site.
const LIBRARY: [&str; 20] = [
    "alloc/",
    "core/",
    "std/",
    "hashbrown",
    "src/raw",
    "src/vec/",
    "src/boxed",
    "src/sync.rs",
    "src/string.rs",
    "src/slice.rs",
    "src/str.rs",
    "collections/",
    "stable/",
    "dhat-",
    "benches/scale/main.rs",
    "ops/function.rs",
    "iter/traits",
    "src/alloc.rs",
    "fmt/",
    "bytes_mut.rs",
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
        let group = stack
            .iter()
            .map(|f| file(f))
            .find_map(|file| {
                GROUPS
                    .iter()
                    .find(|(_, marks)| marks.iter().any(|m| file.contains(m)))
            })
            .map_or("other", |(name, _)| name);
        let entry = groups.entry(group).or_default();
        entry.0 += bytes;
        entry.1 += blocks;
        // The allocation site: the innermost frame outside the allocator, the standard
        // library and the collections.
        let site = stack
            .iter()
            .find(|f| {
                let file = file(f);
                !file.is_empty() && !LIBRARY.iter().any(|m| file.contains(m))
            })
            .map_or("?".to_string(), |f| {
                format!(
                    "{} ({})",
                    function(f).split('<').next().unwrap_or(""),
                    file(f)
                )
            });
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
    for (site, bytes) in sites.into_iter().take(10) {
        lines.push(format!("  {:>6.1} MiB  {site}", bytes as f64 / MIB));
    }
    lines
}

/// `0x1234: name::of::fn (file:line:col)` -> `file:line:col`.
fn file(frame: &str) -> &str {
    frame
        .rsplit_once(" (")
        .map_or("", |(_, f)| f.trim_end_matches(')'))
}

/// `0x1234: name::of::fn (file:line:col)` -> `name::of::fn`.
fn function(frame: &str) -> &str {
    let name = frame.split_once(": ").map_or(frame, |(_, rest)| rest);
    name.rsplit_once(" (").map_or(name, |(f, _)| f)
}
