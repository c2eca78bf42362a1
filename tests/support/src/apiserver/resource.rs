//! What the server knows about each resource: the built-in ones and those a CRD declares.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::{Value, json};

use super::error::Cause;
use super::meta::{NameRule, is_dns_label, name_errors};
use super::schema::{CrSchema, structural_errors};

/// Resource-specific server behaviour beyond generic storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behaviour {
    Plain,
    Secret,
    ConfigMap,
    Namespace,
    Event,
    /// `events.k8s.io/v1` events: a converted view of the core `events` storage.
    EventV1,
    Crd,
    Custom,
    TokenReview,
    AccessReview,
}

/// A Table column: `jsonPath` as in CRD `additionalPrinterColumns`.
#[derive(Clone, Debug)]
pub(crate) struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

impl Column {
    fn new(name: &str, type_: &str, json_path: &str) -> Column {
        Column {
            name: name.into(),
            type_: type_.into(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: json_path.into(),
        }
    }

    fn age() -> Column {
        Column::new("Age", "date", ".metadata.creationTimestamp")
    }
}

/// One served group/version/resource.
#[derive(Debug)]
pub(crate) struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub verbs: Vec<&'static str>,
    /// Has a `status` subresource, so main writes keep status and status writes keep the rest.
    pub status: bool,
    pub subresources: Vec<&'static str>,
    /// Keeps `metadata.generation` (CRs and CRDs; core kinds like Secret do not).
    pub generation: bool,
    /// PUT without `metadata.resourceVersion` is allowed.
    pub unconditional_update: bool,
    /// PUT of a missing object creates it.
    pub create_on_update: bool,
    pub name_rule: NameRule,
    pub behaviour: Behaviour,
    /// Key of the storage holding the objects; several versions (or groups) may share one.
    pub storage: String,
    /// `apiVersion` objects are stored with.
    pub storage_api_version: String,
    /// Extra `fieldSelector` labels and the dotted path they read.
    pub field_labels: Vec<(String, String)>,
    pub columns: Vec<Column>,
    pub schema: Option<Arc<CrSchema>>,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group`, as in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn stored(&self) -> bool {
        !matches!(
            self.behaviour,
            Behaviour::TokenReview | Behaviour::AccessReview
        )
    }

    pub fn has_verb(&self, verb: &str) -> bool {
        self.verbs.contains(&verb)
    }

    /// Whether stored bytes can be served to this version untouched.
    pub fn is_identity_view(&self, stored_api_version: &str) -> bool {
        self.behaviour != Behaviour::EventV1 && stored_api_version == self.api_version()
    }
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct Builtin {
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    behaviour: Behaviour,
}

fn builtin(b: Builtin) -> ResourceDef {
    let version = "v1".to_string();
    let api_version = if b.group.is_empty() {
        version.clone()
    } else {
        format!("{}/{version}", b.group)
    };
    let storage = if b.group.is_empty() || b.behaviour == Behaviour::EventV1 {
        b.plural.to_string()
    } else {
        format!("{}.{}", b.plural, b.group)
    };
    let storage_api_version = if b.behaviour == Behaviour::EventV1 {
        "v1".into()
    } else {
        api_version
    };
    let reviews = matches!(
        b.behaviour,
        Behaviour::TokenReview | Behaviour::AccessReview
    );
    let (status, subresources): (bool, Vec<&'static str>) = match b.behaviour {
        Behaviour::Namespace => (true, vec!["status", "finalize"]),
        Behaviour::Crd => (true, vec!["status"]),
        _ => (false, vec![]),
    };
    let event_fields = [
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "type",
    ];
    let field_labels: Vec<(String, String)> = match b.behaviour {
        Behaviour::Secret => vec![("type".into(), "type".into())],
        Behaviour::Namespace => vec![("status.phase".into(), "status.phase".into())],
        Behaviour::Event | Behaviour::EventV1 => {
            let mut f: Vec<(String, String)> = event_fields
                .iter()
                .map(|f| (f.to_string(), f.to_string()))
                .collect();
            f.push(("source".into(), "source.component".into()));
            if b.behaviour == Behaviour::EventV1 {
                for field in event_fields
                    .iter()
                    .filter(|f| f.starts_with("involvedObject."))
                {
                    let alias = field.replace("involvedObject.", "regarding.");
                    f.push((alias, field.to_string()));
                }
                f.push(("reportingController".into(), "reportingComponent".into()));
            }
            f
        }
        _ => vec![],
    };
    let mut columns = vec![Column::new("Name", "string", ".metadata.name")];
    match b.behaviour {
        Behaviour::Secret => columns.push(Column::new("Type", "string", ".type")),
        Behaviour::Namespace => columns.push(Column::new("Status", "string", ".status.phase")),
        Behaviour::Event => {
            columns.push(Column::new("Type", "string", ".type"));
            columns.push(Column::new("Reason", "string", ".reason"));
            columns.push(Column::new("Object", "string", ".involvedObject.name"));
            columns.push(Column::new("Message", "string", ".message"));
        }
        Behaviour::EventV1 => {
            columns.push(Column::new("Type", "string", ".type"));
            columns.push(Column::new("Reason", "string", ".reason"));
            columns.push(Column::new("Object", "string", ".regarding.name"));
            columns.push(Column::new("Note", "string", ".note"));
        }
        Behaviour::Plain if b.plural == "leases" => {
            columns.push(Column::new("Holder", "string", ".spec.holderIdentity"));
        }
        _ => {}
    }
    if b.behaviour == Behaviour::Crd {
        columns.push(Column::new(
            "Created At",
            "date",
            ".metadata.creationTimestamp",
        ));
    } else {
        columns.push(Column::age());
    }
    ResourceDef {
        group: b.group.into(),
        version,
        plural: b.plural.into(),
        singular: b.kind.to_lowercase(),
        kind: b.kind.into(),
        list_kind: format!("{}List", b.kind),
        namespaced: b.namespaced,
        short_names: b.short.iter().map(|s| s.to_string()).collect(),
        categories: if b.behaviour == Behaviour::Crd {
            vec!["api-extensions".into()]
        } else {
            vec![]
        },
        verbs: if reviews {
            vec!["create"]
        } else {
            ALL_VERBS.to_vec()
        },
        status,
        subresources,
        generation: b.behaviour == Behaviour::Crd,
        unconditional_update: b.behaviour != Behaviour::Crd,
        create_on_update: matches!(b.behaviour, Behaviour::Event | Behaviour::EventV1)
            || b.plural == "leases",
        name_rule: if b.behaviour == Behaviour::Namespace {
            NameRule::Label
        } else {
            NameRule::Subdomain
        },
        behaviour: b.behaviour,
        storage,
        storage_api_version,
        field_labels,
        columns,
        schema: None,
    }
}

/// Resources every server starts with.
pub(crate) fn builtins() -> Vec<ResourceDef> {
    use Behaviour::*;
    let b = |group, plural, kind, namespaced, short, behaviour| {
        builtin(Builtin {
            group,
            plural,
            kind,
            namespaced,
            short,
            behaviour,
        })
    };
    vec![
        b("", "namespaces", "Namespace", false, &["ns"], Namespace),
        b("", "secrets", "Secret", true, &[], Secret),
        b("", "configmaps", "ConfigMap", true, &["cm"], ConfigMap),
        b(
            "",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            Plain,
        ),
        b("", "events", "Event", true, &["ev"], Event),
        b("events.k8s.io", "events", "Event", true, &["ev"], EventV1),
        b("coordination.k8s.io", "leases", "Lease", true, &[], Plain),
        b(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            Crd,
        ),
        b(
            "authentication.k8s.io",
            "tokenreviews",
            "TokenReview",
            false,
            &[],
            TokenReview,
        ),
        b(
            "authorization.k8s.io",
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
            &[],
            AccessReview,
        ),
    ]
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first, then others
/// alphabetically.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    fn key(v: &str) -> Option<(u8, u64, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: u64 = digits.parse().ok()?;
        let rest = &rest[digits.len()..];
        if rest.is_empty() {
            return Some((3, major, 0));
        }
        let (stage, num) = if let Some(n) = rest.strip_prefix("beta") {
            (2, n)
        } else if let Some(n) = rest.strip_prefix("alpha") {
            (1, n)
        } else {
            return None;
        };
        Some((stage, major, num.parse().ok()?))
    }
    match (key(a), key(b)) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Validates a CustomResourceDefinition as the apiextensions server does (the parts clients
/// can trip over), returning the causes of a 422.
pub(crate) fn validate_crd(crd: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = crd.get("spec").cloned().unwrap_or(json!({}));
    let group = str_at(&spec, &["group"]).unwrap_or("");
    let plural = str_at(&spec, &["names", "plural"]).unwrap_or("");
    let kind = str_at(&spec, &["names", "kind"]).unwrap_or("");
    let name = str_at(crd, &["metadata", "name"]).unwrap_or("");
    if group.is_empty() {
        causes.push(Cause::required("spec.group", ""));
    } else if !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &json!(group),
            "should be a domain with at least one dot",
        ));
    } else if let Some(e) = name_errors(group, NameRule::Subdomain).into_iter().next() {
        causes.push(Cause::invalid("spec.group", &json!(group), &e));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural", ""));
    } else if !is_dns_label(plural) {
        causes.push(Cause::invalid(
            "spec.names.plural",
            &json!(plural),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character",
        ));
    }
    if kind.is_empty() {
        causes.push(Cause::required("spec.names.kind", ""));
    }
    for (field, v) in [
        ("spec.names.singular", str_at(&spec, &["names", "singular"])),
        ("spec.names.listKind", str_at(&spec, &["names", "listKind"])),
    ] {
        if v == Some("") {
            causes.push(Cause::invalid(
                field,
                &json!(""),
                "must not be empty when specified",
            ));
        }
    }
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let scope = str_at(&spec, &["scope"]).unwrap_or("");
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause::unsupported(
            "spec.scope",
            &json!(scope),
            &["Cluster".into(), "Namespaced".into()],
        ));
    }
    if let Some(old) = old {
        let old_scope = str_at(old, &["spec", "scope"]).unwrap_or("");
        if old_scope != scope {
            causes.push(Cause::invalid(
                "spec.scope",
                &json!(scope),
                "field is immutable",
            ));
        }
        if str_at(old, &["spec", "group"]).unwrap_or("") != group {
            causes.push(Cause::invalid(
                "spec.group",
                &json!(group),
                "field is immutable",
            ));
        }
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!([]),
            "must have exactly one version marked as storage version",
        ));
    }
    let storage_count = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if !versions.is_empty() && storage_count != 1 {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions),
            "must have exactly one version marked as storage version",
        ));
    }
    if !versions.is_empty()
        && !versions
            .iter()
            .any(|v| v.get("served").and_then(Value::as_bool) == Some(true))
    {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions),
            "must serve at least one version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let vname = str_at(v, &["name"]).unwrap_or("");
        if !is_dns_label(vname) {
            causes.push(Cause::invalid(
                format!("spec.versions[{i}].name"),
                &json!(vname),
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-'",
            ));
        }
        match v.pointer("/schema/openAPIV3Schema") {
            None => causes.push(Cause::required(
                format!("spec.versions[{i}].schema.openAPIV3Schema"),
                "schemas are required",
            )),
            Some(schema) => {
                let base = format!("spec.versions[{i}].schema.openAPIV3Schema");
                causes.extend(structural_errors(schema, &base));
            }
        }
    }
    causes
}

/// The served resources a (valid) CRD declares, one per served version.
pub(crate) fn crd_resources(crd: &Value) -> Vec<ResourceDef> {
    let spec = crd.get("spec").cloned().unwrap_or(json!({}));
    let group = str_at(&spec, &["group"]).unwrap_or("").to_string();
    let plural = str_at(&spec, &["names", "plural"])
        .unwrap_or("")
        .to_string();
    let kind = str_at(&spec, &["names", "kind"]).unwrap_or("").to_string();
    let singular =
        str_at(&spec, &["names", "singular"]).map_or_else(|| kind.to_lowercase(), str::to_string);
    let list_kind =
        str_at(&spec, &["names", "listKind"]).map_or_else(|| format!("{kind}List"), str::to_string);
    let strings = |path: &[&str]| -> Vec<String> {
        path.iter()
            .try_fold(&spec, |v, k| v.get(k))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let short_names = strings(&["names", "shortNames"]);
    let categories = strings(&["names", "categories"]);
    let namespaced = str_at(&spec, &["scope"]) != Some("Cluster");
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let storage_version = versions
        .iter()
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .and_then(|v| str_at(v, &["name"]))
        .unwrap_or("")
        .to_string();
    let storage = format!("{plural}.{group}");
    versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool) == Some(true))
        .map(|v| {
            let version = str_at(v, &["name"]).unwrap_or("").to_string();
            let status = v.pointer("/subresources/status").is_some();
            let mut columns = vec![Column::new("Name", "string", ".metadata.name")];
            let printer = v.get("additionalPrinterColumns").and_then(Value::as_array);
            match printer {
                Some(cols) if !cols.is_empty() => columns.extend(cols.iter().map(|c| Column {
                    name: str_at(c, &["name"]).unwrap_or("").into(),
                    type_: str_at(c, &["type"]).unwrap_or("string").into(),
                    format: str_at(c, &["format"]).unwrap_or("").into(),
                    description: str_at(c, &["description"]).unwrap_or("").into(),
                    priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                    json_path: str_at(c, &["jsonPath"]).unwrap_or("").into(),
                })),
                _ => columns.push(Column::age()),
            }
            let field_labels = v
                .get("selectableFields")
                .and_then(Value::as_array)
                .map(|fs| {
                    fs.iter()
                        .filter_map(|f| str_at(f, &["jsonPath"]))
                        .map(|p| {
                            let p = p.trim_start_matches('.').to_string();
                            (p.clone(), p)
                        })
                        .collect()
                })
                .unwrap_or_default();
            ResourceDef {
                group: group.clone(),
                version,
                plural: plural.clone(),
                singular: singular.clone(),
                kind: kind.clone(),
                list_kind: list_kind.clone(),
                namespaced,
                short_names: short_names.clone(),
                categories: categories.clone(),
                verbs: ALL_VERBS.to_vec(),
                status,
                subresources: if status { vec!["status"] } else { vec![] },
                generation: true,
                unconditional_update: false,
                create_on_update: false,
                name_rule: NameRule::Subdomain,
                behaviour: Behaviour::Custom,
                storage: storage.clone(),
                storage_api_version: format!("{group}/{storage_version}"),
                field_labels,
                columns,
                schema: v
                    .pointer("/schema/openAPIV3Schema")
                    .map(|s| Arc::new(CrSchema::new(s))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_priority() {
        let mut v = vec![
            "v1alpha1",
            "foo",
            "v1",
            "v2beta1",
            "v1beta2",
            "v2",
            "v10alpha1",
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            [
                "v2",
                "v1",
                "v2beta1",
                "v1beta2",
                "v10alpha1",
                "v1alpha1",
                "foo"
            ]
        );
    }
}
