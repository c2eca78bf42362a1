//! `appconn apply | get | delete` end to end: the real binary and the real SQLite file.

use std::path::Path;
use std::process::{Command, Output};

use appconn::cli::{self, StoreOptions};

const CANARY: &str = "zebra-canary-7781";

fn appconn(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_appconn"))
        .args(args)
        .current_dir(dir)
        .env_remove("APPCONN_STORE")
        .env_remove("APPCONN_KEY_FILE")
        .output()
        .expect("the binary runs")
}

/// [`appconn`] from async code, which must not block its runtime (a fake server lives on it).
async fn run(dir: &Path, args: &[&str]) -> Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        appconn(&dir, &args)
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn quickstart() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.yaml"))
        .unwrap()
}

fn store_in(dir: &Path) -> StoreOptions {
    StoreOptions {
        store: dir.join("appconn.db"),
        key_file: None,
    }
}

#[test]
fn quickstart_applies_then_noops_then_updates_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quickstart.yaml");
    std::fs::write(&file, quickstart()).unwrap();

    let out = appconn(
        dir.path(),
        &["apply", "-f", "quickstart.yaml", "-o", "json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["action"], "create", "{row}");
        assert_eq!(row["ready"], true, "{row}");
        let status = &row["status"];
        assert!(
            uuid::Uuid::parse_str(status["id"].as_str().unwrap()).is_ok(),
            "{row}"
        );
        assert!(
            status["credentialsHash"]
                .as_str()
                .unwrap()
                .starts_with("hmac-sha256:")
        );
        assert_eq!(status["version"], 1);
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(status["conditions"][0]["type"], "Ready");
        assert_eq!(status["conditions"][0]["status"], "True");
    }
    let vault = rows.iter().find(|r| r["name"] == "key-vault").unwrap();
    assert_eq!(vault["status"]["rotation"]["enabled"], true);
    assert!(
        vault["status"]["rotation"]["nextRotationAt"]
            .as_str()
            .unwrap()
            .contains("T11:29:00")
    );

    let table = appconn(dir.path(), &["apply", "-f", "quickstart.yaml"]);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table));
    let lines: Vec<&str> = std::str::from_utf8(&table.stdout)
        .unwrap()
        .lines()
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains(" noop ") && l.contains("hmac-sha256:")),
        "{lines:?}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt
        .block_on(cli::apply(&file, &store_in(dir.path()), false, false))
        .unwrap();
    assert!(report.rows.iter().all(|r| r.action == "noop"));
    assert_eq!(
        report.store_writes, 0,
        "an unchanged apply writes nothing to the store"
    );

    let before: Vec<String> = rows
        .iter()
        .map(|r| r["status"]["credentialsHash"].to_string())
        .collect();
    std::fs::write(
        &file,
        quickstart().replace("example-password-change-me", "a-new-password"),
    )
    .unwrap();
    let report = rt
        .block_on(cli::apply(&file, &store_in(dir.path()), false, false))
        .unwrap();
    let changed: Vec<_> = report.rows.iter().filter(|r| r.action != "noop").collect();
    assert_eq!(changed.len(), 1, "exactly one connection changes");
    assert_eq!(changed[0].name, "warehouse");
    assert_eq!(changed[0].action, "update");
    let status = changed[0].status.as_ref().unwrap();
    assert_eq!(status.version, Some(2));
    assert!(!before.contains(&format!("{:?}", status.credentials_hash.clone().unwrap())));
    assert_ne!(
        Some(status.credentials_hash.clone().unwrap()),
        before.get(2).cloned()
    );

    let get = appconn(dir.path(), &["get", "warehouse", "-n", "analytics"]);
    assert_eq!(get.status.code(), Some(0), "{}", text(&get));
    assert!(text(&get).contains("warehouse") && text(&get).contains("True"));
    // A read did nothing: no ACTION column, no `action` field.
    let header = String::from_utf8_lossy(&get.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(
        header.starts_with("NAMESPACE  NAME") && !header.contains("ACTION"),
        "{header}"
    );
    for format in ["json", "yaml"] {
        let out = appconn(dir.path(), &["get", "-o", format]);
        let rows: Vec<serde_json::Value> = serde_yaml::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 3, "{format}");
        assert!(
            rows.iter().all(|r| r.get("action").is_none()),
            "{format}: {rows:?}"
        );
        assert!(
            rows.iter().all(|r| r["reason"] == "Synced"),
            "{format}: {rows:?}"
        );
    }
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("q.yaml"), quickstart()).unwrap();
    let out = appconn(
        dir.path(),
        &["apply", "-f", "q.yaml", "--dry-run", "-o", "json"],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.iter().all(|r| r["action"] == "create"), "{rows:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = rt
        .block_on(cli::get(&store_in(dir.path()), None, None))
        .unwrap();
    assert!(rows.is_empty(), "dry-run recorded nothing");

    assert_eq!(
        appconn(dir.path(), &["apply", "-f", "q.yaml"])
            .status
            .code(),
        Some(0)
    );
    std::fs::write(
        dir.path().join("q.yaml"),
        quickstart().replace("svc_analytics", "svc_other"),
    )
    .unwrap();
    let out = appconn(
        dir.path(),
        &["apply", "-f", "q.yaml", "--dry-run", "-o", "json"],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "update").count(),
        1,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| **a == "noop").count(),
        2,
        "{actions:?}"
    );
}

#[test]
fn delete_honours_the_deletion_policy() {
    let dir = tempfile::tempdir().unwrap();
    let orphan = quickstart().replace(
        "  description: Platform Key Vault",
        "  description: Platform Key Vault\n  deletionPolicy: Orphan",
    );
    std::fs::write(dir.path().join("q.yaml"), orphan).unwrap();
    assert_eq!(
        appconn(dir.path(), &["apply", "-f", "q.yaml"])
            .status
            .code(),
        Some(0)
    );
    let out = appconn(dir.path(), &["delete", "-f", "q.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let action = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap()["action"].clone();
    assert_eq!(action("warehouse"), "delete");
    assert_eq!(action("key-vault"), "release");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let records = rt.block_on(async {
        let keys =
            appconn::keys::InstallationKeys::load_or_create_file(&dir.path().join("appconn.key"))
                .unwrap();
        let store =
            appconn::store::SqliteStore::open(&dir.path().join("appconn.db"), &keys.store_keys)
                .await
                .unwrap();
        appconn::store::StoreEngine::list(&store, None)
            .await
            .unwrap()
    });
    let names: Vec<&str> = records.iter().map(|r| r.connection_name.as_str()).collect();
    assert_eq!(
        names,
        vec!["key-vault"],
        "only the orphaned connection stays in the store"
    );
    assert!(
        appconn(dir.path(), &["get", "-o", "json"])
            .stdout
            .starts_with(b"[]")
    );
}

#[test]
fn no_secret_value_in_the_store_file_or_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = quickstart().replace("example-password-change-me", CANARY);
    std::fs::write(dir.path().join("q.yaml"), &manifests).unwrap();
    let mut printed = String::new();
    for args in [
        vec!["apply", "-f", "q.yaml"],
        vec!["apply", "-f", "q.yaml", "-o", "json"],
        vec!["apply", "-f", "q.yaml", "-o", "yaml", "--dry-run"],
        vec!["get", "-o", "yaml"],
        vec!["get", "-o", "json"],
        vec!["get"],
    ] {
        printed.push_str(&text(&appconn(dir.path(), &args)));
    }
    std::fs::write(
        dir.path().join("q.yaml"),
        manifests.replace(CANARY, &format!("{CANARY}-2")),
    )
    .unwrap();
    printed.push_str(&text(&appconn(
        dir.path(),
        &["apply", "-f", "q.yaml", "-o", "yaml"],
    )));
    assert!(printed.contains("hmac-sha256:"));
    assert!(!printed.contains(CANARY), "a secret value was printed");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "{} holds a secret value in clear",
            path.display()
        );
    }
}

struct Case {
    name: &'static str,
    yaml: String,
    exit: i32,
    expect: &'static str,
}

fn conn(spec: &str) -> String {
    format!(
        "apiVersion: appconn.io/v1alpha1\nkind: AppConnection\nmetadata: {{name: c1, namespace: ns}}\nspec:\n{spec}"
    )
}

fn secret(data: &str) -> String {
    format!("---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: ns}}\n{data}")
}

fn bad_inputs() -> Vec<Case> {
    vec![
        Case {
            name: "missing Secret",
            yaml: conn("  app: a\n  credentials:\n    p: {secretKeyRef: {name: nope, key: k}}\n"),
            exit: 1,
            expect: "SecretNotFound",
        },
        Case {
            name: "missing key",
            yaml: conn("  app: a\n  credentials:\n    p: {secretKeyRef: {name: s, key: other}}\n")
                + &secret("stringData: {k: v}\n"),
            exit: 1,
            expect: "SecretKeyNotFound",
        },
        Case {
            name: "non-UTF-8 data for a string field",
            yaml: conn("  app: a\n  credentials:\n    p: {secretKeyRef: {name: s, key: k}}\n")
                + &secret("data: {k: /w==}\n"),
            exit: 1,
            expect: "not UTF-8",
        },
        Case {
            name: "abc as a number",
            yaml: conn(
                "  app: a\n  credentials:\n    port: {secretKeyRef: {name: s, key: k, format: number}}\n",
            ) + &secret("stringData: {k: abc}\n"),
            exit: 1,
            expect: "not a number",
        },
        Case {
            name: "maybe as a boolean",
            yaml: conn(
                "  app: a\n  credentials:\n    ssl: {secretKeyRef: {name: s, key: k, format: boolean}}\n",
            ) + &secret("stringData: {k: maybe}\n"),
            exit: 1,
            expect: "not a boolean",
        },
        Case {
            name: "bad JSON",
            yaml: conn(
                "  app: a\n  credentials:\n    key: {secretKeyRef: {name: s, key: k, format: json}}\n",
            ) + &secret("stringData: {k: '{oops'}\n"),
            exit: 1,
            expect: "not valid JSON",
        },
        Case {
            name: "field with two sources",
            yaml: conn(
                "  app: a\n  credentials:\n    p: {value: x, secretKeyRef: {name: s, key: k}}\n",
            ) + &secret("stringData: {k: v}\n"),
            exit: 1,
            expect: "exactly one source",
        },
        Case {
            name: "field from credentials and credentialsFrom",
            yaml: conn(
                "  app: a\n  credentials:\n    k: {value: x}\n  credentialsFrom:\n    - secretRef: {name: s}\n",
            ) + &secret("stringData: {k: v}\n"),
            exit: 1,
            expect: "comes from two places",
        },
        Case {
            name: "secretKeyRef with a namespace",
            yaml: conn(
                "  app: a\n  credentials:\n    p: {secretKeyRef: {name: s, key: k, namespace: other}}\n",
            ),
            exit: 1,
            expect: "same-namespace only",
        },
        Case {
            name: "unknown backendRef kind",
            yaml: conn("  app: a\n  backendRef: {kind: Vault, name: v}\n"),
            exit: 1,
            expect: "unknown variant `Vault`",
        },
        Case {
            name: "backendRef to a backend not applied",
            yaml: conn("  app: a\n  backendRef: {kind: ConnectionBackend, name: gone}\n"),
            exit: 1,
            expect: "BackendNotFound",
        },
        Case {
            name: "invalid YAML",
            yaml: "apiVersion: v1\nkind: [unclosed\n".into(),
            exit: 2,
            expect: "invalid YAML",
        },
        Case {
            name: "AppConnection without app",
            yaml: conn("  description: no app\n"),
            exit: 1,
            expect: "missing field `app`",
        },
        Case {
            name: "rotation interval 0",
            yaml: conn("  app: a\n  rotation: {enabled: true, intervalDays: 0}\n"),
            exit: 1,
            expect: "between 1 and 365",
        },
        Case {
            name: "rotation interval 400",
            yaml: conn("  app: a\n  rotation: {enabled: true, intervalDays: 400}\n"),
            exit: 1,
            expect: "between 1 and 365",
        },
        Case {
            name: "name the built-in store refuses",
            yaml: conn("  app: a\n  connectionName: has spaces\n"),
            exit: 1,
            expect: "InvalidSpec",
        },
        Case {
            name: "unknown field",
            yaml: conn("  app: a\n  credentails: {}\n"),
            exit: 1,
            expect: "unknown field spec.credentails",
        },
        Case {
            name: "document without kind",
            yaml: "apiVersion: v1\nmetadata: {name: x}\n".into(),
            exit: 1,
            expect: "apiVersion and kind are required",
        },
    ]
}

#[test]
fn bad_inputs_get_clear_errors_and_leave_nothing_behind() {
    let cases = bad_inputs();
    assert!(cases.len() >= 15);
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.yaml"), &case.yaml).unwrap();
        let out = appconn(dir.path(), &["apply", "-f", "in.yaml"]);
        let shown = text(&out);
        assert_eq!(out.status.code(), Some(case.exit), "{}: {shown}", case.name);
        assert!(
            shown.contains(case.expect),
            "{}: expected {:?} in: {shown}",
            case.name,
            case.expect
        );
        assert!(!shown.contains("panicked"), "{}: {shown}", case.name);
        if case.exit == 2 {
            assert_eq!(
                shown.lines().count(),
                1,
                "{}: one line for a person: {shown}",
                case.name
            );
        }
        if dir.path().join("appconn.db").exists() {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let records = rt.block_on(async {
                let keys = appconn::keys::InstallationKeys::load_or_create_file(
                    &dir.path().join("appconn.key"),
                )
                .unwrap();
                let store = appconn::store::SqliteStore::open(
                    &dir.path().join("appconn.db"),
                    &keys.store_keys,
                )
                .await
                .unwrap();
                appconn::store::StoreEngine::list(&store, None)
                    .await
                    .unwrap()
            });
            assert!(records.is_empty(), "{}: left a record behind", case.name);
        }
    }
}

#[test]
fn unknown_kinds_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n",
        quickstart()
    );
    std::fs::write(dir.path().join("in.yaml"), yaml).unwrap();
    let out = appconn(dir.path(), &["apply", "-f", "in.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Deployment default/web (apps/v1): not handled by appconn, skipped")
    );
}

/// The CLI resolves backends with the controller's lookup: a ClusterConnectionBackend's
/// namespaceSelector against the labels of the Namespace manifests in the input.
#[test]
fn a_namespace_the_selector_excludes_is_refused_as_in_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let connection = |namespace: &str| {
        format!(
            "apiVersion: appconn.io/v1alpha1\nkind: AppConnection\n\
             metadata: {{name: db, namespace: {namespace}}}\n\
             spec:\n  backendRef: {{kind: ClusterConnectionBackend, name: shared}}\n  \
             app: postgres\n  credentials: {{host: {{value: db.internal}}}}\n---\n"
        )
    };
    let yaml = format!(
        "apiVersion: appconn.io/v1alpha1\nkind: ClusterConnectionBackend\nmetadata: {{name: shared}}\n\
         spec:\n  builtin: {{}}\n  conditions:\n    namespaceSelector: {{matchLabels: {{team: data}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: analytics, labels: {{team: data}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: sales, labels: {{team: sales}}}}\n---\n\
         {}{}{}",
        connection("analytics"),
        connection("sales"),
        connection("unlabelled"),
    );
    std::fs::write(dir.path().join("in.yaml"), yaml).unwrap();
    let out = appconn(dir.path(), &["apply", "-f", "in.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("Namespace"),
        "Namespace manifests are read, not skipped: {}",
        text(&out)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = |namespace: &str| {
        rows.iter()
            .find(|r| r["namespace"] == namespace)
            .unwrap_or_else(|| panic!("no row for {namespace}: {rows:?}"))
            .clone()
    };
    assert_eq!(row("analytics")["ready"], true, "{rows:?}");
    assert_eq!(row("analytics")["action"], "create");
    for excluded in ["sales", "unlabelled"] {
        let row = row(excluded);
        assert_eq!(row["ready"], false, "{row}");
        assert_eq!(row["reason"], "BackendNotFound", "{row}");
        assert_eq!(
            row["message"],
            format!(
                "ClusterConnectionBackend \"shared\" does not allow namespace \"{excluded}\" \
                 (conditions.namespaceSelector)"
            ),
            "{row}"
        );
    }
}

#[test]
fn directories_are_read_recursively_and_empty_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("nested")).unwrap();
    let out = appconn(dir.path(), &["apply", "-f", "empty"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("no manifests found"), "{}", text(&out));

    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("b")).unwrap();
    let docs: Vec<&str> = quickstart().leak().split("\n---\n").collect();
    std::fs::write(tree.join("a.yaml"), docs[..2].join("\n---\n")).unwrap();
    std::fs::write(tree.join("b/c.yml"), docs[2..].join("\n---\n")).unwrap();
    std::fs::write(tree.join("b/README.md"), "not a manifest").unwrap();
    let out = appconn(dir.path(), &["apply", "-f", "tree", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lakehouse", "warehouse", "key-vault"]);
}

#[test]
fn store_problems_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("q.yaml"), quickstart()).unwrap();

    // Unwritable: the store path is under a regular file.
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let out = appconn(
        dir.path(),
        &[
            "apply",
            "-f",
            "q.yaml",
            "--store",
            "file/appconn.db",
            "--key-file",
            "k.key",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cannot open store"), "{}", text(&out));

    // Corrupt.
    std::fs::write(dir.path().join("corrupt.db"), vec![0x42u8; 8192]).unwrap();
    let out = appconn(
        dir.path(),
        &["apply", "-f", "q.yaml", "--store", "corrupt.db"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(text(&out).lines().count(), 1, "{}", text(&out));

    // Wrong key: refused, and the data still reads with the right key.
    assert_eq!(
        appconn(dir.path(), &["apply", "-f", "q.yaml"])
            .status
            .code(),
        Some(0)
    );
    let right = dir.path().join("appconn.key");
    let saved = std::fs::read(&right).unwrap();
    let out = appconn(
        dir.path(),
        &["apply", "-f", "q.yaml", "--key-file", "other.key"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).to_lowercase().contains("key"), "{}", text(&out));
    assert_eq!(std::fs::read(&right).unwrap(), saved);
    let out = appconn(dir.path(), &["apply", "-f", "q.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.iter().all(|r| r["action"] == "noop"), "{rows:?}");
}

mod infisical {
    //! `appconn apply` against the fake Infisical: the real binary, real backend clients built
    //! from the ConnectionBackend / ClusterConnectionBackend and Secrets in the files.

    use super::*;
    use appconn_testkit::fake::infisical::FakeInfisical;

    const CLIENT_ID: &str = "5a0c4f0e-7d8b-4a55-9d3e-2f1b6c7d8e9f";
    const CLIENT_SECRET: &str = "mi-client-secret-0042";
    const PROJECT: &str = "6f1c2a9e-0b1d-4c55-9a57-3d1f1f1b2c3d";
    const CONNECTIONS: &str = "/api/v1/app-connections/";

    /// The quickstart through Infisical: the `analytics` connections through a ConnectionBackend
    /// (its Secret beside it), the `platform` one through a ClusterConnectionBackend (its Secret
    /// in the namespace the references name).
    fn manifests(url: &str, client_secret: &str) -> String {
        let mut yaml = quickstart();
        for (name, namespace, reference) in [
            (
                "lakehouse",
                "analytics",
                "{kind: ConnectionBackend, name: infisical}",
            ),
            (
                "warehouse",
                "analytics",
                "{kind: ConnectionBackend, name: infisical}",
            ),
            (
                "key-vault",
                "platform",
                "{kind: ClusterConnectionBackend, name: infisical-prod}",
            ),
        ] {
            let head = format!("metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n");
            assert!(yaml.contains(&head), "the quickstart changed: {head}");
            yaml = yaml.replace(&head, &format!("{head}  backendRef: {reference}\n"));
        }
        let auth = |namespace: &str| {
            let ns = if namespace.is_empty() {
                String::new()
            } else {
                format!(", namespace: {namespace}")
            };
            format!(
                "auth: {{universalAuth: {{clientId: {{secretKeyRef: {{name: infisical-mi, key: clientId{ns}}}}}, clientSecret: {{secretKeyRef: {{name: infisical-mi, key: clientSecret{ns}}}}}}}}}"
            )
        };
        let secret = |namespace: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: infisical-mi, namespace: {namespace}}}\nstringData: {{clientId: {CLIENT_ID}, clientSecret: {client_secret}}}\n"
            )
        };
        format!(
            "{yaml}---\n{}---\napiVersion: appconn.io/v1alpha1\nkind: ConnectionBackend\nmetadata: {{name: infisical, namespace: analytics}}\nspec:\n  infisical: {{url: \"{url}\", projectId: {PROJECT}, {}}}\n---\n{}---\napiVersion: appconn.io/v1alpha1\nkind: ClusterConnectionBackend\nmetadata: {{name: infisical-prod}}\nspec:\n  infisical: {{url: \"{url}\", projectId: {PROJECT}, {}}}\n",
            secret("analytics"),
            auth(""),
            secret("infisical-system"),
            auth("infisical-system"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_creates_the_quickstart_at_infisical_then_noops_without_a_request() {
        let fake = FakeInfisical::start().await;
        fake.add_identity(CLIENT_ID, CLIENT_SECRET);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("q.yaml"),
            manifests(&fake.url(), CLIENT_SECRET),
        )
        .unwrap();

        let out = run(dir.path(), &["apply", "-f", "q.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        for row in &rows {
            assert_eq!(
                (&row["action"], &row["ready"]),
                (&"create".into(), &true.into()),
                "{row}"
            );
            let status = &row["status"];
            let name = if row["name"] == "warehouse" {
                "warehouse-prod"
            } else {
                row["name"].as_str().unwrap()
            };
            let stored = fake
                .stored_by_name(Some(PROJECT), name)
                .unwrap_or_else(|| panic!("{name} at the server, in the backend's project"));
            assert_eq!(status["id"], stored["id"], "{row}");
            assert_eq!(status["backendCredentialsHash"], stored["credentialsHash"]);
            assert_eq!(status["backend"]["type"], "infisical");
        }
        let kind = |name: &str| {
            rows.iter().find(|r| r["name"] == name).unwrap()["status"]["backend"]["kind"].clone()
        };
        assert_eq!(kind("lakehouse"), "ConnectionBackend");
        assert_eq!(kind("key-vault"), "ClusterConnectionBackend");
        let vault = fake.stored_by_name(Some(PROJECT), "key-vault").unwrap();
        assert_eq!(
            vault["credentials"]["clientSecret"],
            "example-client-secret-change-me"
        );
        assert_eq!(vault["isAutoRotationEnabled"], true);
        let rotation =
            &rows.iter().find(|r| r["name"] == "key-vault").unwrap()["status"]["rotation"];
        assert!(
            rotation["nextRotationAt"]
                .as_str()
                .unwrap()
                .contains("T11:29:00"),
            "{rotation}"
        );
        assert_eq!(fake.stored_all().len(), 3);
        assert_eq!(fake.count("POST", CONNECTIONS), 3);
        assert_eq!(
            fake.logins(),
            2,
            "one login per backend resource, not per connection"
        );
        assert!(!text(&out).contains(CLIENT_SECRET));

        let requests = fake.requests().len();
        let again = run(dir.path(), &["apply", "-f", "q.yaml", "-o", "json"]).await;
        assert_eq!(again.status.code(), Some(0), "{}", text(&again));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&again.stdout).unwrap();
        assert!(
            rows.iter()
                .all(|r| r["action"] == "noop" && r["ready"] == true),
            "{rows:?}"
        );
        assert_eq!(
            fake.requests().len(),
            requests,
            "an unchanged apply sends nothing, not even a login"
        );

        let out = run(dir.path(), &["delete", "-f", "q.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(fake.stored_all().is_empty(), "deleted at the server");
        assert_eq!(fake.count("DELETE", CONNECTIONS), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_identity_is_tried_once_per_backend_and_never_locked() {
        let fake = FakeInfisical::start().await;
        fake.add_identity(CLIENT_ID, CLIENT_SECRET);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("q.yaml"), manifests(&fake.url(), CANARY)).unwrap();

        let out = run(dir.path(), &["apply", "-f", "q.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 3);
        for row in &rows {
            assert_eq!(row["ready"], false, "{row}");
            assert_eq!(row["reason"], "BackendAuthFailed", "{row}");
        }
        assert_eq!(
            fake.logins(),
            2,
            "the two connections of one backend share its refused login"
        );
        assert!(!fake.is_locked(CLIENT_ID));
        assert!(fake.stored_all().is_empty());
        assert!(!text(&out).contains(CANARY), "a secret value was printed");
    }
}

mod credible {
    //! `appconn apply` against the fake Credible: `examples/credible.yaml` as it is, but for
    //! the URL, through the real binary.

    use super::*;
    use appconn_testkit::fake::credible::FakeCredible;

    const CONNECTIONS: &str = "/api/v0/projects/analytics/connections";

    fn example(url: &str) -> String {
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/credible.yaml"),
        )
        .unwrap();
        let hosted = "url: https://acme.data.credibledata.com/api/v0";
        assert!(yaml.contains(hosted), "the example changed");
        yaml.replace(hosted, &format!("url: \"{url}\""))
    }

    async fn fake() -> FakeCredible {
        let fake = FakeCredible::start().await;
        fake.add_project("analytics");
        fake.require_token(Some("example-token-change-me"));
        fake
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_creates_the_example_then_sends_nothing() {
        let fake = fake().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.yaml"), example(&fake.url())).unwrap();

        let out = run(dir.path(), &["apply", "-f", "c.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        for (name, connection, app) in [
            ("warehouse", "warehouse", "postgres"),
            ("snowflake-analytics", "snowflake_analytics", "snowflake"),
            ("lake", "lake", "bigquery"),
        ] {
            let row = rows.iter().find(|r| r["name"] == name).unwrap();
            assert_eq!(
                (&row["action"], &row["ready"]),
                (&"create".into(), &true.into())
            );
            let status = &row["status"];
            assert_eq!(
                status["id"],
                format!("projects/analytics/connections/{connection}")
            );
            assert_eq!(status["backend"]["type"], "credible");
            let stored = fake.stored("analytics", connection).expect("at the server");
            assert_eq!(stored["type"], app);
        }
        let snowflake = fake.stored("analytics", "snowflake_analytics").unwrap();
        assert_eq!(
            snowflake["snowflakeConnection"],
            serde_json::json!({"account": "acme-xy12345", "username": "ANALYST",
                "password": "example-password-change-me-too",
                "responseTimeoutMilliseconds": 30000, "warehouse": "COMPUTE_WH",
                "database": "ANALYTICS", "schema": "PUBLIC", "role": "ANALYST"})
        );
        assert_eq!(fake.count("POST", CONNECTIONS), 3);
        assert_eq!(fake.tested().len(), 1, "the warehouse asks for its test");
        assert!(!text(&out).contains("example-password-change-me"));

        let requests = fake.requests().len();
        let again = run(dir.path(), &["apply", "-f", "c.yaml", "-o", "json"]).await;
        assert_eq!(again.status.code(), Some(0), "{}", text(&again));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&again.stdout).unwrap();
        assert!(
            rows.iter()
                .all(|r| r["action"] == "noop" && r["ready"] == true),
            "{rows:?}"
        );
        assert_eq!(
            fake.requests().len(),
            requests,
            "an unchanged apply sends nothing: no write, no test, no read"
        );

        // One Secret value changed: one PATCH, with the whole block, and its test.
        let changed = example(&fake.url()).replace(
            "password: example-password-change-me\n",
            "password: changed-password\n",
        );
        std::fs::write(dir.path().join("c.yaml"), changed).unwrap();
        let out = run(dir.path(), &["apply", "-f", "c.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(fake.count("PATCH", CONNECTIONS), 1);
        assert_eq!(
            fake.stored("analytics", "warehouse").unwrap()["postgresConnection"],
            serde_json::json!({"host": "db.internal", "port": 5432, "databaseName": "sales",
                "userName": "etl", "password": "changed-password"})
        );
        assert_eq!(fake.tested().len(), 2);

        let out = run(dir.path(), &["delete", "-f", "c.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            fake.stored_all("analytics").is_empty(),
            "deleted at the server"
        );
        assert_eq!(fake.count("DELETE", CONNECTIONS), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_test_is_reported_and_the_exit_code_says_so() {
        let fake = fake().await;
        fake.set_test_result(Some("connect ECONNREFUSED 10.0.0.7:5432"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.yaml"), example(&fake.url())).unwrap();
        let out = run(dir.path(), &["apply", "-f", "c.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let warehouse = rows.iter().find(|r| r["name"] == "warehouse").unwrap();
        assert_eq!(warehouse["ready"], false);
        assert_eq!(warehouse["reason"], "ConnectionTestFailed");
        assert_eq!(
            warehouse["message"],
            "the connection test failed: connect ECONNREFUSED 10.0.0.7:5432"
        );
        assert!(fake.stored("analytics", "warehouse").is_some(), "written");

        // Applied again unchanged: the verdict stands, nothing is sent.
        let requests = fake.requests().len();
        let again = run(dir.path(), &["apply", "-f", "c.yaml", "-o", "json"]).await;
        assert_eq!(again.status.code(), Some(1), "{}", text(&again));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&again.stdout).unwrap();
        let warehouse = rows.iter().find(|r| r["name"] == "warehouse").unwrap();
        assert_eq!(warehouse["reason"], "ConnectionTestFailed");
        assert_eq!(fake.requests().len(), requests);
    }
}

mod matillion {
    //! `appconn apply` against the fake Matillion: `examples/matillion.yaml` as it is, pointed
    //! at the fake, through the real binary and a real backend client.

    use super::*;
    use appconn_testkit::fake::matillion::FakeMatillion;

    const PROJECT: &str = "2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60";
    const CONNECTIONS: &str = "/dpc/v1/projects/2f6d9a4e-8b1c-4d3e-9f5a-1b2c3d4e5f60/connections";
    const CLIENT_SECRET: &str = "example-client-secret-change-me";

    /// The example pointed at the fake, with the warehouse's vault path `path`.
    fn manifests(fake: &FakeMatillion, path: &str) -> String {
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/matillion.yaml"),
        )
        .unwrap();
        let url = "url: https://eu1.api.matillion.com/dpc";
        let vault = "snowflake: prod/analytics/snowflake";
        assert!(
            example.contains(url) && example.contains(vault),
            "the example changed"
        );
        example
            .replace(
                url,
                &format!(
                    "url: \"{}\"\n    tokenUrl: \"{}\"",
                    fake.url(),
                    fake.token_url()
                ),
            )
            .replace(vault, &format!("snowflake: {path}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_creates_the_example_then_noops_then_puts_the_moved_pointer() {
        let fake = FakeMatillion::start().await;
        fake.add_client("example-client-id", CLIENT_SECRET);
        fake.add_project(PROJECT);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, manifests(&fake, "prod/analytics/snowflake")).unwrap();

        let out = run(dir.path(), &["apply", "-f", "m.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        for row in &rows {
            assert_eq!(
                (&row["action"], &row["ready"]),
                (&"create".into(), &true.into())
            );
            let name = match row["name"].as_str().unwrap() {
                "warehouse" => "snowflake-prod",
                other => other,
            };
            let stored = fake.stored(PROJECT, name).expect("at Matillion");
            assert_eq!(row["status"]["id"], stored["id"], "{row}");
            assert_eq!(row["status"]["backend"]["type"], "matillion");
        }
        let warehouse = fake.stored(PROJECT, "snowflake-prod").unwrap();
        assert_eq!(
            warehouse["connectionDetails"]["connectionProperties"],
            serde_json::json!({"secretName": "prod/analytics/snowflake", "secretKey": "password"})
        );
        assert_eq!(
            fake.stored(PROJECT, "sftp-landing").unwrap()["platformConnectionType"],
            "COMPONENT_BASIC"
        );
        assert_eq!(
            fake.stored(PROJECT, "aws-analytics").unwrap()["authType"],
            "CLOUD_PROVIDER_SECRET"
        );
        assert_eq!(fake.token_requests(), 1, "one token for the backend");
        assert!(!text(&out).contains(CLIENT_SECRET));

        let requests = fake.requests().len();
        let again = run(dir.path(), &["apply", "-f", "m.yaml", "-o", "json"]).await;
        assert_eq!(again.status.code(), Some(0), "{}", text(&again));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&again.stdout).unwrap();
        assert!(rows.iter().all(|r| r["action"] == "noop"), "{rows:?}");
        assert_eq!(
            fake.requests().len(),
            requests,
            "an unchanged apply sends nothing, not even a token request"
        );

        std::fs::write(&file, manifests(&fake, "prod/analytics/snowflake-v2")).unwrap();
        let moved = run(dir.path(), &["apply", "-f", "m.yaml", "-o", "json"]).await;
        assert_eq!(moved.status.code(), Some(0), "{}", text(&moved));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&moved.stdout).unwrap();
        for row in &rows {
            let want = if row["name"] == "warehouse" {
                "update"
            } else {
                "noop"
            };
            assert_eq!(row["action"], want, "{row}");
        }
        assert_eq!(fake.count("PUT", CONNECTIONS), 1, "exactly one PUT");
        assert_eq!(
            fake.stored(PROJECT, "snowflake-prod").unwrap()["connectionDetails"]["connectionProperties"]
                ["secretName"],
            "prod/analytics/snowflake-v2"
        );

        let out = run(dir.path(), &["delete", "-f", "m.yaml", "-o", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(fake.stored_all(PROJECT).is_empty(), "deleted at Matillion");
        assert_eq!(fake.count("DELETE", CONNECTIONS), 3);
    }
}
