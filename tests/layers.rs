//! The modules depend one way, down the layers of STYLE.md: `crd` (the API's vocabulary) <-
//! `store` <- `backend` <- `reconcile` <- `controller` and `cli`, with leaves anyone may use. A
//! reference up (or across between the two drivers) fails here, naming the file.

use std::collections::BTreeMap;
use std::path::Path;

/// Each top-level module and its layer; a module may use only modules of a lower layer.
const LAYERS: &[(&str, u8)] = &[
    ("crd", 0),
    ("secret", 0),
    ("kube_error", 0),
    ("telemetry", 0),
    ("keys", 1),
    ("metrics", 1),
    ("store", 2),
    ("http", 2),
    ("backend", 3),
    ("reconcile", 4),
    ("controller", 5),
    ("cli", 5),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .unwrap_or_else(|| panic!("module {module} has no layer in tests/layers.rs"))
        .1
}

/// Every `crate::<module>` a source file names, also inside `use crate::{a, b::c}`.
fn references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_depend_only_on_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if matches!(module.as_str(), "lib" | "main") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for used in references(&text) {
            if used != module {
                edges
                    .entry((module.clone(), used))
                    .or_insert_with(|| relative.display().to_string());
            }
        }
    }
    assert!(edges.len() > 20, "too few references found: {edges:?}");
    let upward: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| layer(to) >= layer(from))
        .map(|((from, to), file)| format!("{from} -> {to} (in src/{file})"))
        .collect();
    assert!(upward.is_empty(), "modules reach up or across: {upward:#?}");
}

#[test]
fn references_are_read_from_every_form_of_use() {
    let text = "use crate::crd::X;\nuse crate::{backend::Y, store};\nlet a = crate::metrics::m();";
    assert_eq!(references(text), ["crd", "backend", "store", "metrics"]);
}
