//! Where the benchmark runs: the in-process test API server, or a real cluster through a
//! kubeconfig. Either way the driver gets a client, the operator process a kubeconfig, and
//! both a way to count API requests by verb and resource.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appconn::crd::AppConnection;
use appconn_testkit::apiserver::TestApiServer;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// The User-Agent of the operator process, which tells its requests from the driver's at the
/// test server.
pub const OPERATOR_AGENT: &str = "appconn-bench-operator";

/// The resources whose requests are counted on a real cluster (its counters cover every
/// client; these are the ones the benchmark and the operator touch).
const COUNTED: [&str; 4] = ["appconnections", "secrets", "events", "connectionbackends"];

pub enum Server {
    Test(TestApiServer),
    Real,
}

pub struct Target {
    pub server: Server,
    /// The driver's client.
    pub client: Client,
    /// The operator process's kubeconfig.
    pub kubeconfig: PathBuf,
    /// The namespace every object of the run lives in.
    pub namespace: String,
    /// A second namespace, which the operator does not watch, for measuring the raw rate
    /// while the operator runs.
    pub quiet_namespace: String,
    /// The CRDs this run installed, removed at the end (a real cluster only).
    installed: Vec<String>,
    /// The driver's own requests, taken from a real cluster's counts.
    own: OwnRequests,
}

/// API requests counted by (verb, resource or resource/subresource), verbs named the way
/// `apiserver_request_total` names them.
#[derive(Clone, Debug, Default)]
pub struct Requests(BTreeMap<(String, String), u64>);

impl Target {
    /// The test server in this process, or the cluster `kubeconfig` names.
    pub async fn start(kubeconfig: Option<PathBuf>, dir: &Path) -> Target {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        let target = match kubeconfig {
            None => {
                let server = TestApiServer::start().await;
                let client = server.client();
                appconn_testkit::crds::install(&client, &crds, "appconn-bench").await;
                let kubeconfig = server.write_kubeconfig(dir, "bench");
                Target {
                    server: Server::Test(server),
                    client,
                    kubeconfig,
                    namespace: "bench".into(),
                    quiet_namespace: "bench-quiet".into(),
                    installed: Vec::new(),
                    own: OwnRequests::default(),
                }
            }
            Some(path) => {
                let own = OwnRequests::default();
                let client = counted_client_for(&path, own.clone())
                    .await
                    .unwrap_or_else(|e| panic!("cannot use the kubeconfig {path:?}: {e}"));
                let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
                let missing = crd_api
                    .get_opt("appconnections.appconn.io")
                    .await
                    .expect("reading the cluster's CRDs")
                    .is_none();
                let mut installed = Vec::new();
                if missing {
                    appconn_testkit::crds::install(&client, &crds, "appconn-bench").await;
                    installed = crd_names(&crds);
                }
                let namespace = format!("appconn-bench-{:08x}", rand::random::<u32>());
                Target {
                    server: Server::Real,
                    client,
                    kubeconfig: path,
                    quiet_namespace: format!("{namespace}-quiet"),
                    namespace,
                    installed,
                    own,
                }
            }
        };
        target.create_namespace(&target.namespace).await;
        target.create_namespace(&target.quiet_namespace).await;
        target
    }

    async fn create_namespace(&self, name: &str) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating the benchmark's namespace");
    }

    /// The API requests so far: the operator's at the test server (by its User-Agent); on a
    /// real cluster, the server's own counters for the resources the benchmark touches, less
    /// the driver's own requests (the counters do not tell one client from another).
    pub async fn requests(&self) -> Requests {
        let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
        match &self.server {
            Server::Test(server) => {
                for r in server.requests() {
                    if r.user_agent.as_deref() != Some(OPERATOR_AGENT) {
                        continue;
                    }
                    let verb = match r.verb.as_str() {
                        "create" => "POST",
                        "update" => "PUT",
                        "patch" => "PATCH",
                        "get" => "GET",
                        "list" => "LIST",
                        "watch" => "WATCH",
                        "delete" => "DELETE",
                        _ => "OTHER",
                    };
                    *counts
                        .entry((verb.to_string(), resource(&r.resource, &r.subresource)))
                        .or_default() += 1;
                }
            }
            Server::Real => {
                let request = http::Request::get("/metrics")
                    .body(Vec::new())
                    .expect("a request");
                let text = self.client.request_text(request).await.expect(
                    "reading the API server's /metrics (needs get on nonResourceURL /metrics)",
                );
                for line in text.lines() {
                    let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                        continue;
                    };
                    let Some((labels, value)) = rest.rsplit_once("} ") else {
                        continue;
                    };
                    let labels = parse_labels(labels);
                    let res = labels.get("resource").map_or("", String::as_str);
                    if !COUNTED.contains(&res) {
                        continue;
                    }
                    let sub = labels.get("subresource").map_or("", String::as_str);
                    let verb = labels.get("verb").cloned().unwrap_or_default();
                    let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
                    *counts.entry((verb, resource(res, sub))).or_default() += value;
                }
                for (key, own) in self.own.snapshot() {
                    if let Some(count) = counts.get_mut(&key) {
                        *count = count.saturating_sub(own);
                    }
                }
            }
        }
        Requests(counts)
    }

    /// How long the test server's stored writes have held its state lock (it applies one write
    /// at a time); None on a real cluster.
    pub fn write_lock_held(&self) -> Option<Duration> {
        match &self.server {
            Server::Test(server) => Some(server.write_lock_held()),
            Server::Real => None,
        }
    }

    /// [`write_lock_held`](Self::write_lock_held) since an earlier reading of it.
    pub fn write_lock_held_since(&self, earlier: Option<Duration>) -> Option<Duration> {
        Some(self.write_lock_held()? - earlier?)
    }

    /// Removes what the run made: on a real cluster the namespace (finalizers released first,
    /// the operator being stopped) and the CRDs it installed. The test server just stops.
    pub async fn cleanup(self) {
        if let Server::Test(server) = self.server {
            drop(server);
            return;
        }
        let conns: Api<AppConnection> = Api::namespaced(self.client.clone(), &self.namespace);
        let release = json!({"metadata": {"finalizers": null}});
        let mut released = 0;
        if let Ok(list) = conns.list_metadata(&ListParams::default()).await {
            for conn in list.items {
                if !conn.finalizers().is_empty() {
                    let name = conn.name_any();
                    if conns
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&release))
                        .await
                        .is_ok()
                    {
                        released += 1;
                    }
                }
            }
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for namespace in [&self.namespace, &self.quiet_namespace] {
            let _ = namespaces.delete(namespace, &DeleteParams::default()).await;
        }
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for name in &self.installed {
            let _ = crds.delete(name, &DeleteParams::default()).await;
        }
        eprintln!(
            "cleaned up: namespaces {} and {} deleted ({released} finalizers released), {} CRDs \
             removed",
            self.namespace,
            self.quiet_namespace,
            self.installed.len()
        );
    }
}

/// A client for the cluster a kubeconfig names, with `agent` as its User-Agent.
pub async fn client_for(path: &Path, agent: Option<&'static str>) -> Result<Client, String> {
    let mut config = config_for(path).await?;
    if let Some(agent) = agent {
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(agent),
        ));
    }
    Client::try_from(config).map_err(|e| e.to_string())
}

async fn config_for(path: &Path) -> Result<kube::Config, String> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())
}

/// A client for the cluster `path` names that counts its own requests in `own`.
async fn counted_client_for(path: &Path, own: OwnRequests) -> Result<Client, String> {
    let config = config_for(path).await?;
    let counting = tower::util::MapRequestLayer::new(move |req: http::Request<_>| {
        own.count(&req);
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(|e| e.to_string())?
        .with_layer(&counting)
        .build())
}

/// Requests of one client by verb and resource, named as `apiserver_request_total` names them.
#[derive(Clone, Default)]
struct OwnRequests(Arc<Mutex<BTreeMap<(String, String), u64>>>);

impl OwnRequests {
    fn count<B>(&self, req: &http::Request<B>) {
        if let Some(key) = appconn_testkit::apiserver::request_series(req) {
            *self
                .0
                .lock()
                .expect("request counts")
                .entry(key)
                .or_default() += 1;
        }
    }

    fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.0.lock().expect("request counts").clone()
    }
}

fn crd_names(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Ok(crd) = serde_yaml::from_str::<CustomResourceDefinition>(&text) {
            names.extend(crd.metadata.name);
        }
    }
    names
}

fn resource(resource: &str, subresource: &str) -> String {
    if subresource.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}/{subresource}")
    }
}

/// `a="x",b="y"` as a map (label values here never hold quotes or commas).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((key.to_string(), value.trim_end_matches('"').to_string()))
        })
        .collect()
}

const WRITES: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

impl Requests {
    /// What was counted after `earlier`.
    pub fn since(&self, earlier: &Requests) -> Requests {
        Requests(
            self.0
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(earlier.0.get(k).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, v)| *v > 0)
                .collect(),
        )
    }

    pub fn writes(&self) -> u64 {
        self.0
            .iter()
            .filter(|((verb, _), _)| WRITES.contains(&verb.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    /// Writes to `resource` (or `resource/subresource`).
    pub fn writes_to(&self, resource: &str) -> u64 {
        self.0
            .iter()
            .filter(|((verb, r), _)| r == resource && WRITES.contains(&verb.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    /// Single-object reads (GET) of `resource`; the pages of a LIST are not per object.
    pub fn gets_of(&self, resource: &str) -> u64 {
        self.0
            .get(&("GET".to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// `VERB resource per n`, largest first, then the LIST pages as counts (a list is made
    /// once, in pages, not per object); watches left out (long-running).
    pub fn per(&self, n: usize) -> Vec<String> {
        let mut rows: Vec<_> = self
            .0
            .iter()
            .filter(|((verb, _), _)| verb != "WATCH")
            .collect();
        rows.sort_by(|a, b| {
            (a.0.0 == "LIST")
                .cmp(&(b.0.0 == "LIST"))
                .then(b.1.cmp(a.1))
                .then(a.0.cmp(b.0))
        });
        rows.into_iter()
            .map(|((verb, r), count)| match verb.as_str() {
                "LIST" => format!("LIST {r} x{count}"),
                _ => format!("{verb} {r} {:.2}", *count as f64 / n.max(1) as f64),
            })
            .collect()
    }
}
