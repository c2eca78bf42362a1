//! `appconn apply | delete | get`: the reconcile core driven from files, with no cluster.

mod env;
pub mod keys;
pub mod manifests;
pub mod output;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use serde_json::Value;

pub use env::ResourceState;
use env::{CliEnv, STATE_PREFIX, state_key};
use manifests::Manifests;
pub use output::{Format, Row};

use crate::crd::{self, AppConnection};
use crate::keys::InstallationKeys;
use crate::reconcile::{Options, Reason, Reconciler};
use crate::store::{SqliteStore, StoreEngine};

/// A failure that stops the command: one line for a person, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Input(#[from] manifests::InputError),
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Keys(String),
    #[error("{0}")]
    Kube(String),
}

/// Where the built-in store and its key file live.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub store: PathBuf,
    /// Defaults to the store path with the extension `.key`.
    pub key_file: Option<PathBuf>,
}

impl StoreOptions {
    fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.store.with_extension("key"))
    }

    async fn open(&self) -> Result<(Arc<InstallationKeys>, Arc<dyn StoreEngine>), CliError> {
        let keys = InstallationKeys::load_or_create_file(&self.key_file())
            .map_err(|e| CliError::Keys(e.to_string()))?;
        let store = SqliteStore::open(&self.store, &keys.store_keys)
            .await
            .map_err(|e| CliError::Store(e.to_string()))?;
        Ok((Arc::new(keys), Arc::new(store)))
    }
}

/// The result of `apply` or `delete`: one row per object, plus what was refused or skipped.
pub struct Report {
    pub rows: Vec<Row>,
    pub skipped: Vec<String>,
    /// Backend writes and store writes made, for tests and `--dry-run` checks.
    pub store_writes: u64,
}

impl Report {
    /// 0 when every connection is Ready (or deleted), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.rows.iter().all(|r| r.ok) { 0 } else { 1 }
    }
}

/// `appconn apply -f PATH`.
/// `verify` reads every backend object to catch drift even when nothing changed here.
pub async fn apply(
    path: &Path,
    store: &StoreOptions,
    dry_run: bool,
    verify: bool,
) -> Result<Report, CliError> {
    let opts = Options {
        verify,
        dry_run,
        now: Timestamp::now(),
        refresh: None,
    };
    each_connection(path, store, |conn, prior| {
        let (namespace, name) = ids(conn);
        if let Some(prior) = &prior
            && let Err(errors) = immutable_check(conn, prior)
        {
            return Err(Box::new(Row::refused(
                &namespace,
                &name,
                Reason::InvalidSpec,
                errors,
            )));
        }
        let spec = serde_json::to_value(&conn.spec).expect("spec serializes");
        let mut state = prior.unwrap_or_default();
        if state.spec != spec {
            state.generation += 1;
            state.spec = spec;
        }
        Ok((state.object(conn.clone()), state, opts))
    })
    .await
}

/// `appconn delete -f PATH`: runs the deletion path of the core for each AppConnection.
pub async fn delete(path: &Path, store: &StoreOptions, dry_run: bool) -> Result<Report, CliError> {
    let now = Timestamp::now();
    let opts = Options {
        verify: false,
        dry_run,
        now,
        refresh: None,
    };
    each_connection(path, store, |conn, prior| {
        let (namespace, name) = ids(conn);
        let Some(state) = prior else {
            return Err(Box::new(Row::refused(
                &namespace,
                &name,
                Reason::InvalidSpec,
                "not found: it was never applied to this store".into(),
            )));
        };
        let mut object = state.object(conn.clone());
        object.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        Ok((object, state, opts))
    })
    .await
}

/// What to reconcile for one AppConnection of the files, from what was recorded of it: the
/// object as the core sees it, its state to keep, the options; or a row refusing it.
type Prepared = Result<(AppConnection, ResourceState, Options), Box<Row>>;

/// Reconciles every AppConnection of the files as `prepare` says, and reports each.
async fn each_connection(
    path: &Path,
    store: &StoreOptions,
    prepare: impl Fn(&AppConnection, Option<ResourceState>) -> Prepared,
) -> Result<Report, CliError> {
    let manifests = manifests::load(path)?;
    let (keys, engine) = store.open().await?;
    let before = engine.write_count();
    let env = CliEnv::new(engine.clone(), &manifests);
    let reconciler = Reconciler::new(Arc::new(keys.hash_key.clone()));
    let mut rows = rejected_rows(&manifests);
    for conn in &manifests.connections {
        let (namespace, name) = ids(conn);
        let key = state_key(&namespace, &name);
        let prior = load_state(engine.as_ref(), &key).await?;
        let (object, state, opts) = match prepare(conn, prior) {
            Ok(prepared) => prepared,
            Err(refused) => {
                rows.push(*refused);
                continue;
            }
        };
        env.states.lock().expect("state lock").insert(key, state);
        match reconciler.reconcile(&env, &object, opts).await {
            Ok(outcome) => rows.push(Row::from_outcome(&namespace, &name, &outcome)),
            Err(e) => return Err(CliError::Store(e.to_string())),
        }
    }
    Ok(Report {
        rows,
        skipped: manifests.skipped.clone(),
        store_writes: engine.write_count() - before,
    })
}

/// `appconn get [NAME] [-n NS]`: the recorded status of applied connections; never a secret.
pub async fn get(
    store: &StoreOptions,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<Vec<Row>, CliError> {
    let (_, engine) = store.open().await?;
    let states = engine
        .list_state(STATE_PREFIX)
        .await
        .map_err(|e| CliError::Store(e.to_string()))?;
    let mut rows = Vec::new();
    for (key, value) in states {
        let Some((ns, n)) = key.trim_start_matches(STATE_PREFIX).split_once('/') else {
            continue;
        };
        if namespace.is_some_and(|want| want != ns) || name.is_some_and(|want| want != n) {
            continue;
        }
        let Ok(state) = serde_json::from_value::<ResourceState>(value) else {
            continue;
        };
        rows.push(Row::from_status(ns, n, state.status.as_ref()));
    }
    Ok(rows)
}

/// What the CLI recorded of an AppConnection, if it was ever applied to this store.
async fn load_state(
    engine: &dyn StoreEngine,
    key: &str,
) -> Result<Option<ResourceState>, CliError> {
    let value = engine
        .load_state(key)
        .await
        .map_err(|e| CliError::Store(e.to_string()))?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

fn ids(conn: &AppConnection) -> (String, String) {
    (
        conn.metadata.namespace.clone().unwrap_or_default(),
        conn.metadata.name.clone().unwrap_or_default(),
    )
}

fn rejected_rows(manifests: &Manifests) -> Vec<Row> {
    manifests
        .rejected
        .iter()
        .map(|r| Row::rejected(&r.object, &r.message))
        .collect()
}

/// The CRD transition rules (immutable fields) against the spec applied last time.
fn immutable_check(conn: &AppConnection, prior: &ResourceState) -> Result<(), String> {
    let wrap = |spec: &Value| serde_json::json!({"apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection", "metadata": {}, "spec": spec});
    let new = serde_json::to_value(&conn.spec).expect("spec serializes");
    crd::validate::validate("AppConnection", &wrap(&new), Some(&wrap(&prior.spec)))
        .map_err(|errors| errors.join("; "))
}
