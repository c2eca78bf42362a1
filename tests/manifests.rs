//! The manifests users install, checked as Kubernetes would read them.
//!
//! Every file in `deploy/` and every document the chart renders (`python3 .ci/chart.py check`
//! leaves them in `target/chart-render/<case>/`) must parse as its exact Kubernetes type with no
//! unknown field: a misspelt or misplaced field is silently dropped by the API server, so a typo
//! in `securityContext` would quietly ship a weaker pod. On top of that the operator's RBAC must
//! grant exactly the API calls the controller makes, and each rendering case must do what its
//! values ask for.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, Namespace, PersistentVolumeClaim, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Every API call the controller makes, as (API group, resource, verb); "" is the core group.
/// tests/rbac.rs records the calls over a scenario and checks deploy/ against them.
const CONTROLLER_API_CALLS: &[(&str, &str, &str)] = &[
    ("appconn.io", "appconnections", "get"),
    ("appconn.io", "appconnections", "list"),
    ("appconn.io", "appconnections", "watch"),
    ("appconn.io", "appconnections", "patch"),
    ("appconn.io", "appconnections/status", "patch"),
    ("appconn.io", "connectionbackends", "list"),
    ("appconn.io", "connectionbackends", "watch"),
    ("appconn.io", "connectionbackends/status", "patch"),
    ("appconn.io", "clusterconnectionbackends", "list"),
    ("appconn.io", "clusterconnectionbackends", "watch"),
    ("appconn.io", "clusterconnectionbackends/status", "patch"),
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "secrets", "create"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
];

/// Calls made only in the operator's own namespace: creating the store key Secret and the leader
/// Lease. They must be granted there by a Role and never cluster-wide (`create` on Secrets
/// cannot be narrowed to one name).
const OWN_NAMESPACE_CALLS: &[(&str, &str, &str)] = &[
    ("", "secrets", "create"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
];

/// Resources that are cluster-wide by nature: with `watchNamespaces` they stay in the
/// ClusterRole while everything else moves to a Role per watched namespace.
const CLUSTER_WIDE_RESOURCES: &[(&str, &str)] = &[
    ("appconn.io", "clusterconnectionbackends"),
    ("appconn.io", "clusterconnectionbackends/status"),
    ("", "namespaces"),
    ("authentication.k8s.io", "tokenreviews"),
    ("authorization.k8s.io", "subjectaccessreviews"),
];

/// What `python3 .ci/chart.py check` renders, one directory each under target/chart-render/.
const RENDER_CASES: &[&str] = &[
    "default",
    "watch-namespaces",
    "persistence-off",
    "existing-claim",
    "replicas-2",
    "store-api-cert-manager",
    "store-api-plain-http",
    "service-monitor",
    "network-policy",
];

const OPERATOR_NAMESPACE: &str = "appconn-system";

// ---------------------------------------------------------------------------------------------
// Parsing

/// cert-manager's Certificate, reduced to the fields the chart renders (any other is an error).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Certificate {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: CertificateSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    duration: String,
    renew_before: String,
    dns_names: Vec<String>,
    issuer_ref: IssuerRef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerRef {
    group: String,
    kind: String,
    name: String,
}

/// `deploy/kustomization.yaml`; only the fields the generator writes are allowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
}

/// The Prometheus Operator's ServiceMonitor, reduced to the fields the chart renders: any other
/// field is an error, so a new one has to be added here deliberately.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    endpoints: Vec<ServiceMonitorEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorEndpoint {
    port: String,
    path: String,
    interval: String,
    scrape_timeout: Option<String>,
}

#[derive(Debug)]
enum Object {
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    ServiceAccount(Box<ServiceAccount>),
    PersistentVolumeClaim(Box<PersistentVolumeClaim>),
    Namespace(Box<Namespace>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    NetworkPolicy(Box<NetworkPolicy>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    ServiceMonitor(Box<ServiceMonitor>),
    Certificate(Box<Certificate>),
    Kustomization(Kustomization),
}

/// Deserializes `value` as `T`, failing on any field `T` does not know, at any depth.
fn strict<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let parsed: T = serde_ignored::deserialize(value, |path| {
        unknown.push(path.to_string().replace(".?", ""))
    })
    .map_err(|err| err.to_string())?;
    if unknown.is_empty() {
        Ok(parsed)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

fn parse_object(value: serde_yaml::Value) -> Result<Object, String> {
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .ok_or("document has no kind")?
        .to_owned();
    // The k8s-openapi types also check apiVersion, so a right kind in a wrong group fails too.
    Ok(match kind.as_str() {
        "Deployment" => Object::Deployment(strict(value)?),
        "Service" => Object::Service(strict(value)?),
        "ServiceAccount" => Object::ServiceAccount(strict(value)?),
        "PersistentVolumeClaim" => Object::PersistentVolumeClaim(strict(value)?),
        "Namespace" => Object::Namespace(strict(value)?),
        "ClusterRole" => Object::ClusterRole(strict(value)?),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(strict(value)?),
        "Role" => Object::Role(strict(value)?),
        "RoleBinding" => Object::RoleBinding(strict(value)?),
        "NetworkPolicy" => Object::NetworkPolicy(strict(value)?),
        "CustomResourceDefinition" => Object::CustomResourceDefinition(strict(value)?),
        "ServiceMonitor" => {
            let monitor: ServiceMonitor = strict(value)?;
            if monitor.api_version != "monitoring.coreos.com/v1" {
                return Err(format!(
                    "ServiceMonitor has apiVersion {}",
                    monitor.api_version
                ));
            }
            Object::ServiceMonitor(Box::new(monitor))
        }
        "Certificate" => {
            let certificate: Certificate = strict(value)?;
            if certificate.api_version != "cert-manager.io/v1" {
                return Err(format!(
                    "Certificate has apiVersion {}",
                    certificate.api_version
                ));
            }
            Object::Certificate(Box::new(certificate))
        }
        "Kustomization" => {
            let kustomization: Kustomization = strict(value)?;
            if kustomization.api_version != "kustomize.config.k8s.io/v1beta1" {
                return Err(format!(
                    "Kustomization has apiVersion {}",
                    kustomization.api_version
                ));
            }
            Object::Kustomization(kustomization)
        }
        other => {
            return Err(format!(
                "kind {other} is not one this test knows how to check"
            ));
        }
    })
}

/// Every object of every YAML file under `dir` (recursively), or every parse failure.
fn load_dir(dir: &Path, skip: &[&str]) -> Vec<(String, Object)> {
    let mut files = Vec::new();
    collect_yaml(dir, dir, skip, &mut files);
    assert!(!files.is_empty(), "no YAML file under {}", dir.display());
    let mut objects = Vec::new();
    let mut failures = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).expect("manifest is readable");
        let name = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let source = format!("{}/{name}#{index}", dir.display());
            match serde_yaml::Value::deserialize(document) {
                Ok(serde_yaml::Value::Null) => {}
                Ok(value) => match parse_object(value) {
                    Ok(object) => objects.push((source, object)),
                    Err(err) => failures.push(format!("{source}: {err}")),
                },
                Err(err) => failures.push(format!("{source}: not YAML: {err}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "manifests that do not parse strictly:\n{}",
        failures.join("\n")
    );
    objects
}

fn collect_yaml(root: &Path, dir: &Path, skip: &[&str], out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let relative = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        if skip.contains(&relative.as_str()) {
            continue;
        }
        if path.is_dir() {
            collect_yaml(root, &path, skip, out);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            out.push(path);
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_objects() -> Vec<(String, Object)> {
    // argocd/ holds the health check script, not manifests.
    load_dir(&repo().join("deploy"), &["argocd"])
}

fn rendered_case(case: &str) -> Vec<(String, Object)> {
    let dir = repo().join("target").join("chart-render").join(case);
    assert!(
        dir.is_dir(),
        "{} is missing: run `python3 .ci/chart.py check` first",
        dir.display()
    );
    load_dir(&dir, &[])
}

// ---------------------------------------------------------------------------------------------
// Accessors

struct Manifests(Vec<(String, Object)>);

impl Manifests {
    fn deployment(&self) -> &Deployment {
        let all: Vec<_> = self
            .0
            .iter()
            .filter_map(|(_, o)| match o {
                Object::Deployment(d) => Some(d.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(all.len(), 1, "expected exactly one Deployment");
        all[0]
    }

    fn pod_spec(&self) -> &PodSpec {
        self.deployment()
            .spec
            .template
            .spec
            .as_ref()
            .expect("Deployment has a pod spec")
    }

    fn container(&self) -> &Container {
        let containers = &self.pod_spec().containers;
        assert_eq!(containers.len(), 1, "one operator container");
        &containers[0]
    }

    fn args(&self) -> &[String] {
        self.container().args.as_deref().unwrap_or_default()
    }

    fn service(&self) -> &Service {
        let all: Vec<_> = self
            .0
            .iter()
            .filter_map(|(_, o)| match o {
                Object::Service(s) => Some(s.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(all.len(), 1, "expected exactly one Service");
        all[0]
    }

    fn pvcs(&self) -> Vec<&PersistentVolumeClaim> {
        self.0
            .iter()
            .filter_map(|(_, o)| match o {
                Object::PersistentVolumeClaim(p) => Some(p.as_ref()),
                _ => None,
            })
            .collect()
    }

    fn cluster_role(&self, name: &str) -> Option<&ClusterRole> {
        self.0.iter().find_map(|(_, o)| match o {
            Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(name) => Some(r.as_ref()),
            _ => None,
        })
    }

    fn kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for (_, object) in &self.0 {
            let kind = match object {
                Object::Deployment(_) => "Deployment",
                Object::Service(_) => "Service",
                Object::ServiceAccount(_) => "ServiceAccount",
                Object::PersistentVolumeClaim(_) => "PersistentVolumeClaim",
                Object::Namespace(_) => "Namespace",
                Object::ClusterRole(_) => "ClusterRole",
                Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
                Object::Role(_) => "Role",
                Object::RoleBinding(_) => "RoleBinding",
                Object::NetworkPolicy(_) => "NetworkPolicy",
                Object::CustomResourceDefinition(_) => "CustomResourceDefinition",
                Object::ServiceMonitor(_) => "ServiceMonitor",
                Object::Certificate(_) => "Certificate",
                Object::Kustomization(_) => "Kustomization",
            };
            *kinds.entry(kind).or_default() += 1;
        }
        kinds
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        self.deployment()
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("pod template has labels")
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// ---------------------------------------------------------------------------------------------
// RBAC

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    Namespace(String),
}

type Grant = (String, String, String, Scope);

fn grant(call: &(&str, &str, &str), scope: Scope) -> Grant {
    (
        call.0.to_owned(),
        call.1.to_owned(),
        call.2.to_owned(),
        scope,
    )
}

fn expand(rules: &[PolicyRule], scope: &Scope, source: &str, out: &mut BTreeSet<Grant>) {
    for rule in rules {
        // Wildcards, resourceNames and non-resource URLs would make the comparison below
        // meaningless; the operator needs none of them.
        assert!(
            rule.non_resource_urls.is_none(),
            "{source}: nonResourceURLs in {rule:?}"
        );
        assert!(
            rule.resource_names.is_none(),
            "{source}: resourceNames in {rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    for field in [group, resource, verb] {
                        assert!(!field.contains('*'), "{source}: wildcard in {rule:?}");
                    }
                    out.insert((group.clone(), resource.clone(), verb.clone(), scope.clone()));
                }
            }
        }
    }
}

/// Everything the operator's ServiceAccount may do, following the bindings that name it.
fn operator_grants(manifests: &Manifests) -> BTreeSet<Grant> {
    let deployment = manifests.deployment();
    let namespace = deployment
        .metadata
        .namespace
        .clone()
        .expect("Deployment has a namespace");
    let account = manifests
        .pod_spec()
        .service_account_name
        .clone()
        .expect("Deployment names its ServiceAccount");
    let is_operator = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(namespace.as_str())
        })
    };
    let mut grants = BTreeSet::new();
    for (source, object) in &manifests.0 {
        match object {
            Object::ClusterRoleBinding(binding) if is_operator(&binding.subjects) => {
                assert_eq!(binding.role_ref.kind, "ClusterRole", "{source}");
                let role = manifests
                    .cluster_role(&binding.role_ref.name)
                    .unwrap_or_else(|| {
                        panic!("{source}: bound ClusterRole is not in the manifests")
                    });
                expand(
                    role.rules.as_deref().unwrap_or_default(),
                    &Scope::Cluster,
                    source,
                    &mut grants,
                );
            }
            Object::RoleBinding(binding) if is_operator(&binding.subjects) => {
                let binding_namespace = binding
                    .metadata
                    .namespace
                    .clone()
                    .expect("RoleBinding namespace");
                let rules = match binding.role_ref.kind.as_str() {
                    "Role" => manifests
                        .0
                        .iter()
                        .find_map(|(_, o)| match o {
                            Object::Role(r)
                                if r.metadata.name.as_deref()
                                    == Some(binding.role_ref.name.as_str())
                                    && r.metadata.namespace.as_deref()
                                        == Some(binding_namespace.as_str()) =>
                            {
                                Some(r.rules.clone().unwrap_or_default())
                            }
                            _ => None,
                        })
                        .unwrap_or_else(|| panic!("{source}: bound Role is not in the manifests")),
                    _ => manifests
                        .cluster_role(&binding.role_ref.name)
                        .unwrap_or_else(|| {
                            panic!("{source}: bound ClusterRole is not in the manifests")
                        })
                        .rules
                        .clone()
                        .unwrap_or_default(),
                };
                expand(
                    &rules,
                    &Scope::Namespace(binding_namespace),
                    source,
                    &mut grants,
                );
            }
            _ => {}
        }
    }
    grants
}

fn is_own_namespace_call(call: &(&str, &str, &str)) -> bool {
    OWN_NAMESPACE_CALLS.contains(call)
}

fn is_cluster_wide(call: &(&str, &str, &str)) -> bool {
    CLUSTER_WIDE_RESOURCES.contains(&(call.0, call.1))
}

/// With every namespace watched: one ClusterRole for all calls but the own-namespace ones.
fn expected_cluster_wide_grants() -> BTreeSet<Grant> {
    let own = Scope::Namespace(OPERATOR_NAMESPACE.to_owned());
    CONTROLLER_API_CALLS
        .iter()
        .map(|call| {
            let scope = if is_own_namespace_call(call) {
                own.clone()
            } else {
                Scope::Cluster
            };
            grant(call, scope)
        })
        .collect()
}

/// With watchNamespaces: namespaced calls in each watched namespace, cluster-wide resources in
/// the ClusterRole, and in the operator's namespace the own-namespace calls plus `get` on
/// Secrets (the store key), which no cluster-wide Secret access covers any more.
fn expected_watch_namespace_grants(watched: &[&str]) -> BTreeSet<Grant> {
    let own = Scope::Namespace(OPERATOR_NAMESPACE.to_owned());
    let mut expected = BTreeSet::new();
    for call in CONTROLLER_API_CALLS {
        if is_own_namespace_call(call) {
            expected.insert(grant(call, own.clone()));
        } else if is_cluster_wide(call) {
            expected.insert(grant(call, Scope::Cluster));
        } else {
            for namespace in watched {
                expected.insert(grant(call, Scope::Namespace((*namespace).to_owned())));
            }
        }
    }
    expected.insert(grant(&("", "secrets", "get"), own));
    expected
}

fn assert_grants(manifests: &Manifests, expected: &BTreeSet<Grant>, what: &str) {
    let granted = operator_grants(manifests);
    let missing: Vec<_> = expected.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: operator RBAC differs from the controller's calls\nmissing: {missing:#?}\nbeyond: {extra:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks shared by deploy/ and the rendered cases

fn check_hardened_deployment(manifests: &Manifests) {
    let pod = manifests.pod_spec();
    let pod_security = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.run_as_user, Some(65532));
    assert_eq!(
        pod_security.fs_group,
        Some(65532),
        "store volume writable by the operator"
    );
    assert_eq!(
        pod_security
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );

    let container = manifests.container();
    let security = container
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert!(
        security
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_none()
    );
    assert_ne!(security.privileged, Some(true));

    let resources = container.resources.as_ref().expect("resources");
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory"))
    );

    let ports: BTreeMap<_, _> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    let admin_port = ports["admin"];
    let store_api_port = ports["store-api"];
    for (probe, path) in [
        (container.liveness_probe.as_ref(), "/livez"),
        (container.readiness_probe.as_ref(), "/readyz"),
    ] {
        let http = probe.and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
        assert_eq!(http.path.as_deref(), Some(path));
        assert_eq!(http.port, IntOrString::String("admin".to_owned()));
    }

    let args = manifests.args();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    // A PostgreSQL store is named by the APPCONN_STORE variable; a SQLite one lives on a volume.
    let on_postgres = container
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "APPCONN_STORE");
    for expected in [
        format!("--admin-addr=0.0.0.0:{admin_port}"),
        format!("--store-api-addr=0.0.0.0:{store_api_port}"),
    ] {
        assert!(args.contains(&expected), "args {args:?} lack {expected}");
    }
    let sqlite = "--store=/var/lib/appconn/appconn.db".to_owned();
    assert_eq!(args.contains(&sqlite), !on_postgres, "args {args:?}");
    let pod_namespace = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        pod_namespace,
        Some("metadata.namespace"),
        "POD_NAMESPACE from the downward API"
    );

    // The root filesystem is read-only, so the store path and /tmp must be volumes.
    let mounts: BTreeMap<_, _> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    assert_eq!(
        mounts.contains_key("/var/lib/appconn"),
        !on_postgres,
        "store volume mounted for SQLite only: {mounts:?}"
    );
    let tmp = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| Some(&v.name.as_str()) == mounts.get("/tmp"))
        .expect("/tmp is a volume");
    assert!(tmp.empty_dir.is_some(), "/tmp is an emptyDir");
}

/// The read API serves HTTPS from the kubernetes.io/tls Secret `secret`, mounted read-only,
/// optional (the pod starts before cert-manager or a person creates it).
fn check_store_api_tls(manifests: &Manifests, secret: &str) {
    let args = manifests.args();
    assert!(
        args.contains(&"--store-api-tls-dir=/etc/appconn/store-api-tls".to_owned()),
        "args: {args:?}"
    );
    assert!(!args.contains(&"--store-api-plain-http".to_owned()));
    let mount = manifests
        .container()
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/appconn/store-api-tls")
        .expect("certificate mounted");
    assert_eq!(mount.read_only, Some(true));
    let volume = manifests
        .pod_spec()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.secret.as_ref())
        .expect("certificate volume is a Secret");
    assert_eq!(volume.secret_name.as_deref(), Some(secret));
    assert_eq!(volume.optional, Some(true));
}

/// The volume mounted at the store path.
fn store_volume(manifests: &Manifests) -> &k8s_openapi::api::core::v1::Volume {
    let name = manifests
        .container()
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/lib/appconn")
        .map(|m| m.name.clone())
        .expect("store mount");
    manifests
        .pod_spec()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .expect("store volume")
}

fn check_single_replica_without_leader_election(manifests: &Manifests) {
    let spec = &manifests.deployment().spec;
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate"),
        "one replica must never overlap with its successor"
    );
    assert!(
        !manifests
            .args()
            .iter()
            .any(|a| a.starts_with("--leader-elect")),
        "no leader election with one replica"
    );
}

fn check_persistent_store(manifests: &Manifests, claim: &str, created: bool) {
    let volume = store_volume(manifests);
    assert_eq!(
        volume
            .persistent_volume_claim
            .as_ref()
            .map(|p| p.claim_name.as_str()),
        Some(claim)
    );
    let pvcs = manifests.pvcs();
    if created {
        assert_eq!(pvcs.len(), 1);
        assert_eq!(pvcs[0].metadata.name.as_deref(), Some(claim));
        let keep = pvcs[0]
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/resource-policy"));
        assert_eq!(
            keep.map(String::as_str),
            Some("keep"),
            "store PVC survives uninstall"
        );
    } else {
        assert!(pvcs.is_empty(), "an existing claim is used, none created");
    }
}

fn check_service(manifests: &Manifests) {
    let service = manifests.service();
    let spec = service.spec.as_ref().expect("Service spec");
    assert!(
        selects(
            spec.selector.as_ref().expect("selector"),
            &manifests.pod_labels()
        ),
        "Service selects the operator pods"
    );
    let container_ports: BTreeSet<_> = manifests
        .container()
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    let targets: BTreeMap<_, _> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.target_port.clone()))
        .collect();
    assert_eq!(
        targets.get("metrics"),
        Some(&Some(IntOrString::String("admin".to_owned())))
    );
    assert_eq!(
        targets.get("store-api"),
        Some(&Some(IntOrString::String("store-api".to_owned())))
    );
    for target in targets.values().flatten() {
        if let IntOrString::String(name) = target {
            assert!(
                container_ports.contains(name),
                "targetPort {name} is a container port"
            );
        }
    }
}

fn check_user_roles(manifests: &Manifests) {
    let view = manifests
        .cluster_role("appconn-view")
        .expect("appconn-view ClusterRole");
    let edit = manifests
        .cluster_role("appconn-edit")
        .expect("appconn-edit ClusterRole");
    let reader = manifests
        .cluster_role("appconn-credentials-reader")
        .expect("appconn-credentials-reader ClusterRole");
    let label = |role: &ClusterRole, key: &str| {
        role.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .cloned()
    };
    assert_eq!(
        label(view, "rbac.authorization.k8s.io/aggregate-to-view").as_deref(),
        Some("true")
    );
    assert_eq!(
        label(edit, "rbac.authorization.k8s.io/aggregate-to-edit").as_deref(),
        Some("true")
    );
    assert_eq!(
        label(edit, "rbac.authorization.k8s.io/aggregate-to-view"),
        None
    );
    // Reading credentials is never handed out through the built-in roles.
    for key in ["view", "edit", "admin"] {
        assert_eq!(
            label(
                reader,
                &format!("rbac.authorization.k8s.io/aggregate-to-{key}")
            ),
            None
        );
    }
    let mut reader_grants = BTreeSet::new();
    expand(
        reader.rules.as_deref().unwrap_or_default(),
        &Scope::Cluster,
        "credentials-reader",
        &mut reader_grants,
    );
    assert_eq!(
        reader_grants,
        BTreeSet::from([grant(
            &("appconn.io", "appconnections/credentials", "get"),
            Scope::Cluster
        )])
    );
    let mut view_grants = BTreeSet::new();
    expand(
        view.rules.as_deref().unwrap_or_default(),
        &Scope::Cluster,
        "view",
        &mut view_grants,
    );
    assert!(
        view_grants
            .iter()
            .all(|(_, _, verb, _)| ["get", "list", "watch"].contains(&verb.as_str())),
        "view only reads: {view_grants:?}"
    );
}

fn check_crds_match_sources(manifests: &Manifests) {
    let crds_dir = repo().join("crds");
    let mut expected = BTreeSet::new();
    if crds_dir.is_dir() {
        for entry in fs::read_dir(&crds_dir).expect("crds/ readable") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let stem = path
                    .file_stem()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned();
                expected.insert(stem);
            }
        }
    }
    let shipped: BTreeSet<_> = manifests
        .0
        .iter()
        .filter_map(|(_, o)| match o {
            Object::CustomResourceDefinition(crd) => crd.metadata.name.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(
        shipped, expected,
        "the manifests must install exactly the CRDs in crds/ (run `python3 .ci/chart.py sync-crds` \
         and `python3 .ci/chart.py render-deploy`)"
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/: always checked

#[test]
fn deploy_manifests_parse_as_their_kubernetes_types() {
    let manifests = Manifests(deploy_objects());
    let kinds = manifests.kinds();
    for kind in [
        "Namespace",
        "Deployment",
        "Service",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Kustomization",
    ] {
        assert!(kinds.contains_key(kind), "deploy/ has no {kind}: {kinds:?}");
    }
    for (source, object) in &manifests.0 {
        let metadata_namespace = match object {
            Object::Deployment(o) => o.metadata.namespace.as_deref(),
            Object::Service(o) => o.metadata.namespace.as_deref(),
            Object::ServiceAccount(o) => o.metadata.namespace.as_deref(),
            Object::PersistentVolumeClaim(o) => o.metadata.namespace.as_deref(),
            Object::Role(o) => o.metadata.namespace.as_deref(),
            Object::RoleBinding(o) => o.metadata.namespace.as_deref(),
            _ => continue,
        };
        // kubectl would otherwise put them in whatever namespace the current context says.
        assert_eq!(metadata_namespace, Some(OPERATOR_NAMESPACE), "{source}");
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let deploy = repo().join("deploy");
    let objects = deploy_objects();
    let resources: BTreeSet<String> = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::Kustomization(k) => {
                assert_eq!(k.kind, "Kustomization");
                Some(k.resources.iter().cloned().collect())
            }
            _ => None,
        })
        .expect("deploy/kustomization.yaml");
    let mut files = Vec::new();
    collect_yaml(
        &deploy,
        &deploy,
        &["argocd", "kustomization.yaml"],
        &mut files,
    );
    let files: BTreeSet<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(&deploy)
                .expect("under deploy")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        resources, files,
        "kustomization.yaml resources vs files in deploy/"
    );
}

#[test]
fn deploy_namespace_enforces_restricted_pod_security() {
    let manifests = Manifests(deploy_objects());
    let namespace = manifests
        .0
        .iter()
        .find_map(|(_, o)| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        })
        .expect("Namespace");
    assert_eq!(namespace.metadata.name.as_deref(), Some(OPERATOR_NAMESPACE));
    let enforce = namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
    assert_eq!(enforce.map(String::as_str), Some("restricted"));
}

#[test]
fn deploy_deployment_is_hardened_and_single() {
    let manifests = Manifests(deploy_objects());
    check_hardened_deployment(&manifests);
    check_single_replica_without_leader_election(&manifests);
    check_persistent_store(&manifests, "appconn-store", true);
    check_service(&manifests);
    check_store_api_tls(&manifests, "appconn-store-api-tls");
    assert!(
        !manifests
            .args()
            .iter()
            .any(|a| a.starts_with("--namespaces")),
        "default install watches every namespace"
    );
}

#[test]
fn deploy_image_is_the_chart_app_version() {
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(repo().join("charts/appconn-operator/Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml is YAML");
    let app_version = chart["appVersion"].as_str().expect("appVersion");
    let manifests = Manifests(deploy_objects());
    assert_eq!(
        manifests.container().image.as_deref(),
        Some(format!("ghcr.io/appconn/appconn:{app_version}").as_str())
    );
}

#[test]
fn deploy_rbac_grants_exactly_the_controller_calls() {
    let manifests = Manifests(deploy_objects());
    assert_grants(&manifests, &expected_cluster_wide_grants(), "deploy/");
}

#[test]
fn deploy_user_roles_aggregate_and_guard_credentials() {
    check_user_roles(&Manifests(deploy_objects()));
}

#[test]
fn deploy_installs_the_crds_of_crds_dir() {
    check_crds_match_sources(&Manifests(deploy_objects()));
}

// ---------------------------------------------------------------------------------------------
// Rendered chart: needs `python3 .ci/chart.py check` (helm-python-sdk) to have run first

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_chart_parses_as_kubernetes_types() {
    for case in RENDER_CASES {
        let manifests = Manifests(rendered_case(case));
        check_hardened_deployment(&manifests);
        check_service(&manifests);
        check_crds_match_sources(&manifests);
        check_user_roles(&manifests);
        if *case != "watch-namespaces" {
            assert_grants(&manifests, &expected_cluster_wide_grants(), case);
        }
    }
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_default_matches_the_plain_manifests() {
    let manifests = Manifests(rendered_case("default"));
    check_single_replica_without_leader_election(&manifests);
    check_persistent_store(&manifests, "appconn-store", true);
    let rendered = manifests.kinds();
    let mut deploy = Manifests(deploy_objects()).kinds();
    // deploy/ adds what Helm does not do: the namespace, and the kustomization itself.
    assert_eq!(deploy.remove("Namespace"), Some(1));
    assert_eq!(deploy.remove("Kustomization"), Some(1));
    assert_eq!(
        rendered, deploy,
        "deploy/ holds the default render's objects"
    );
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_watch_namespaces_uses_roles_in_listed_namespaces() {
    let manifests = Manifests(rendered_case("watch-namespaces"));
    assert!(
        manifests
            .args()
            .contains(&"--namespaces=team-a,team-b".to_owned()),
        "args: {:?}",
        manifests.args()
    );
    assert_grants(
        &manifests,
        &expected_watch_namespace_grants(&["team-a", "team-b"]),
        "watch-namespaces",
    );
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_persistence_off_keeps_the_store_in_an_empty_dir() {
    let manifests = Manifests(rendered_case("persistence-off"));
    assert!(store_volume(&manifests).empty_dir.is_some());
    assert!(manifests.pvcs().is_empty());
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_existing_claim_is_mounted_not_created() {
    let manifests = Manifests(rendered_case("existing-claim"));
    check_persistent_store(&manifests, "appconn-store-restored", false);
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_two_replicas_elect_a_leader_and_roll() {
    let manifests = Manifests(rendered_case("replicas-2"));
    let spec = &manifests.deployment().spec;
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    let args = manifests.args();
    assert!(
        args.contains(&"--leader-elect".to_owned()),
        "args: {args:?}"
    );
    assert!(
        args.contains(&"--lease-name=appconn-leader".to_owned()),
        "args: {args:?}"
    );

    // Several replicas need PostgreSQL: no SQLite path, no store volume, no PVC.
    assert!(
        !args.iter().any(|a| a.starts_with("--store=")),
        "args: {args:?}"
    );
    assert!(
        args.contains(&"--store-password-file=/etc/appconn/postgres/password".to_owned()),
        "args: {args:?}"
    );
    let url = manifests
        .container()
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "APPCONN_STORE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("the store URL comes from a Secret");
    assert_eq!(
        (url.name.as_str(), url.key.as_str()),
        ("appconn-postgres", "url")
    );
    assert!(manifests.pvcs().is_empty(), "no PVC for a PostgreSQL store");
    let mounts: Vec<_> = manifests
        .container()
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(!mounts.contains(&"/var/lib/appconn"), "mounts: {mounts:?}");
    let password = manifests
        .pod_spec()
        .volumes
        .iter()
        .flatten()
        .find_map(|v| {
            v.secret
                .as_ref()
                .filter(|s| s.secret_name.as_deref() == Some("appconn-postgres-password"))
        })
        .expect("the password Secret is mounted");
    assert_eq!(
        password.items.as_ref().map(|i| i[0].path.as_str()),
        Some("password")
    );
    check_store_api_tls(&manifests, "appconn-store-api-tls");
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_cert_manager_certificate_writes_the_mounted_secret() {
    let manifests = Manifests(rendered_case("store-api-cert-manager"));
    let certificate = manifests
        .0
        .iter()
        .find_map(|(_, o)| match o {
            Object::Certificate(c) => Some(c),
            _ => None,
        })
        .expect("Certificate rendered");
    assert_eq!(certificate.kind, "Certificate");
    assert_eq!(certificate.spec.secret_name, "appconn-store-api-tls");
    assert!(
        certificate
            .spec
            .dns_names
            .contains(&"appconn.appconn-system.svc".to_owned()),
        "{:?}",
        certificate.spec.dns_names
    );
    assert_eq!(
        (
            certificate.spec.issuer_ref.group.as_str(),
            certificate.spec.issuer_ref.kind.as_str(),
            certificate.spec.issuer_ref.name.as_str()
        ),
        ("cert-manager.io", "ClusterIssuer", "internal-ca")
    );
    assert!(!certificate.spec.duration.is_empty() && !certificate.spec.renew_before.is_empty());
    assert_eq!(
        certificate.metadata.namespace.as_deref(),
        Some(OPERATOR_NAMESPACE)
    );
    check_store_api_tls(&manifests, &certificate.spec.secret_name);
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_plain_http_is_asked_for_by_name() {
    let manifests = Manifests(rendered_case("store-api-plain-http"));
    let args = manifests.args();
    assert!(
        args.contains(&"--store-api-plain-http".to_owned()),
        "args: {args:?}"
    );
    assert!(!args.iter().any(|a| a.starts_with("--store-api-tls-dir")));
    assert!(
        !manifests
            .container()
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/etc/appconn/store-api-tls")
    );
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_service_monitor_scrapes_the_metrics_port() {
    let manifests = Manifests(rendered_case("service-monitor"));
    let monitor = manifests
        .0
        .iter()
        .find_map(|(_, o)| match o {
            Object::ServiceMonitor(m) => Some(m),
            _ => None,
        })
        .expect("ServiceMonitor rendered");
    assert_eq!(monitor.kind, "ServiceMonitor");
    assert_eq!(
        monitor.metadata.namespace.as_deref(),
        Some(OPERATOR_NAMESPACE)
    );
    assert_eq!(
        monitor
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("release"))
            .map(String::as_str),
        Some("prometheus"),
        "serviceMonitor.labels reach the object"
    );
    let service = manifests.service();
    let service_labels = service.metadata.labels.clone().unwrap_or_default();
    assert!(selects(
        monitor
            .spec
            .selector
            .match_labels
            .as_ref()
            .expect("matchLabels"),
        &service_labels
    ));
    let service_ports: BTreeSet<_> = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| p.name.clone())
        .collect();
    assert_eq!(monitor.spec.endpoints.len(), 1);
    let endpoint = &monitor.spec.endpoints[0];
    assert!(
        service_ports.contains(&endpoint.port),
        "endpoint port {} on the Service",
        endpoint.port
    );
    assert_eq!(endpoint.path, "/metrics");
    assert_eq!(endpoint.interval, "30s");
    assert_eq!(endpoint.scrape_timeout.as_deref(), Some("10s"));
}

#[test]
#[ignore = "needs .ci/chart.py check to render the chart first"]
fn rendered_network_policy_admits_only_the_operator_ports() {
    let manifests = Manifests(rendered_case("network-policy"));
    let policy = manifests
        .0
        .iter()
        .find_map(|(_, o)| match o {
            Object::NetworkPolicy(p) => Some(p),
            _ => None,
        })
        .expect("NetworkPolicy rendered");
    let spec = policy.spec.as_ref().expect("spec");
    assert!(selects(
        spec.pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .expect("podSelector"),
        &manifests.pod_labels()
    ));
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    let mut by_port = BTreeMap::new();
    for rule in spec.ingress.iter().flatten() {
        for port in rule.ports.iter().flatten() {
            by_port.insert(
                format!("{:?}", port.port),
                rule.from.clone().unwrap_or_default(),
            );
        }
    }
    let admin = by_port.remove(&format!(
        "{:?}",
        Some(IntOrString::String("admin".to_owned()))
    ));
    let store = by_port.remove(&format!(
        "{:?}",
        Some(IntOrString::String("store-api".to_owned()))
    ));
    assert!(by_port.is_empty(), "no other port is opened: {by_port:?}");
    assert_eq!(
        admin.map(|peers| peers.len()),
        Some(1),
        "metrics open to every namespace by default"
    );
    let store = store.expect("store API port admitted");
    let consumer = store[0]
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|l| l.get("appconn.io/consumer"));
    assert_eq!(
        consumer.map(String::as_str),
        Some("true"),
        "storeApiFrom is honoured"
    );
}
