//! Installs CustomResourceDefinitions from a directory of YAML files and waits until the API
//! server serves them, the same way against the test server and a real cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

/// Server-side applies every CRD in `dir` as `manager`, then waits (up to 30 s each) until
/// each is Established. Panics on failure: this is set-up for tests and benchmarks.
pub async fn install(client: &Client, dir: &Path, manager: &str) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("the CRD directory is readable") {
        let path = entry.expect("a directory entry").path();
        let text = std::fs::read_to_string(&path).expect("a CRD file is readable");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("a CRD parses");
        let name = crd.metadata.name.clone().expect("a CRD has a name");
        let params = PatchParams::apply(manager).force();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .expect("installing a CRD");
        names.push(name);
    }
    for name in names {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let crd = api.get(&name).await.expect("reading a CRD");
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
