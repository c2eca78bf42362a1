//! The write paths (create, update, patch, apply, delete) and the small controllers a real
//! control plane runs behind them: CRD establishment and cleanup, namespace termination.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::error::{ApiError, Cause};
use super::fields::{self, Entry, Scope, Types, Writer};
use super::meta::{
    NameRule, config_key_errors, finalizers, is_deleting, meta, meta_mut, meta_str, name_errors,
    now, qualified_name_errors, random_suffix, validate_object_meta,
};
use super::resource::{Behaviour, ResourceDef, crd_resources, validate_crd};
use super::schema::prune_object_meta;
use super::store::{Key, State, Stored};
use super::view::{incoming, outgoing};

pub(crate) const CRD_STORAGE: &str = "customresourcedefinitions.apiextensions.k8s.io";
const CRD_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// Who writes what, where.
pub(crate) struct WriteReq<'a> {
    pub def: &'a ResourceDef,
    /// Empty for cluster-scoped resources.
    pub namespace: &'a str,
    /// Empty for the main resource.
    pub subresource: &'a str,
    pub manager: &'a str,
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields fail the request instead of being dropped.
    pub strict: bool,
}

impl WriteReq<'_> {
    fn key(&self, name: &str) -> Key {
        (self.namespace.to_string(), name.to_string())
    }

    fn scope(&self) -> Scope {
        if self.subresource == "status" {
            Scope::Status
        } else if self.def.status {
            Scope::Main
        } else {
            Scope::All
        }
    }

    fn types(&self) -> Types<'_> {
        Types {
            schema: self.def.schema.as_ref().map(|s| &s.root),
        }
    }
}

/// A successful write: HTTP code, body in the request's version, and `Warning` texts.
pub(crate) struct Written {
    pub code: u16,
    pub body: Value,
    pub warnings: Vec<String>,
}

/// How ownership is recorded: computed from the change, or already decided by an apply.
pub(crate) enum Ownership {
    Update,
    Preset(Vec<Entry>),
}

pub(crate) fn wire(def: &ResourceDef, stored: &Stored) -> Value {
    let mut v = stored.value();
    outgoing(def, &mut v);
    v
}

/// Fills or checks `apiVersion`/`kind` against the resource the request addressed.
pub(crate) fn check_type_meta(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body of the request was not a JSON object: {obj}"
        )));
    }
    let expected = def.api_version();
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if def.behaviour == Behaviour::Custom && kind.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{obj}'"
        )));
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
        && av != expected
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version \
             ({expected})"
        )));
    }
    if !kind.is_empty() && kind != def.kind {
        return Err(ApiError::bad_request(format!(
            "{kind} in version {:?} cannot be handled as a {}: no kind {kind:?} is registered \
             for version {expected:?}",
            def.version, def.kind
        )));
    }
    obj["apiVersion"] = json!(expected);
    obj["kind"] = json!(def.kind);
    Ok(())
}

/// The NamespaceLifecycle admission check: the namespace must exist and not be terminating.
fn namespace_usable(
    state: &State,
    def: &ResourceDef,
    name: &str,
    ns: &str,
) -> Result<(), ApiError> {
    let Some(ns_def) = state.def("", "v1", "namespaces") else {
        return Ok(());
    };
    if state
        .get("namespaces", &(String::new(), ns.to_string()))
        .is_none()
    {
        return Err(ApiError::not_found(&ns_def, ns));
    }
    if state.terminating_namespaces.contains(ns) {
        let mut e = ApiError::forbidden(
            def,
            name,
            &format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        );
        if let Some(d) = e.details.as_mut() {
            d["causes"] = json!([{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                                 "message": format!("namespace {ns} is being terminated")}]);
        }
        return Err(e);
    }
    Ok(())
}

/// Pruning, defaulting and validation of custom resources and CRDs; returns warnings.
fn schema_check(
    req: &WriteReq,
    obj: &mut Value,
    old: Option<&Value>,
    causes: &mut Vec<Cause>,
) -> Result<Vec<String>, ApiError> {
    let def = req.def;
    let mut warnings = Vec::new();
    if let Some(schema) = &def.schema {
        for field in schema.prune(obj) {
            warnings.push(format!("unknown field {field:?}"));
        }
        if req.strict && !warnings.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
                def.kind,
                def.version,
                def.kind,
                warnings.join(", ")
            )));
        }
        *obj = schema.apply_defaults(obj);
        causes.extend(schema.validate(obj, old));
    }
    if def.behaviour == Behaviour::Crd {
        causes.extend(validate_crd(obj, old));
    }
    Ok(warnings)
}

pub(crate) fn create(
    state: &mut State,
    req: &WriteReq,
    mut obj: Value,
    ownership: Ownership,
) -> Result<Written, ApiError> {
    let def = req.def;
    check_type_meta(def, &mut obj)?;
    prune_object_meta(&mut obj);
    let m = meta_mut(&mut obj);
    if def.namespaced {
        if let Some(ns) = m.get("namespace").and_then(Value::as_str)
            && !ns.is_empty()
            && ns != req.namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the \
                 request",
            ));
        }
        m.insert("namespace".into(), json!(req.namespace));
    } else {
        m.remove("namespace");
    }
    if m.get("resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|rv| !rv.is_empty())
    {
        return Err(ApiError::internal(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let name = match m
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        Some(n) => n.to_string(),
        None => match m
            .get("generateName")
            .and_then(Value::as_str)
            .filter(|g| !g.is_empty())
        {
            Some(g) => format!("{g}{}", random_suffix()),
            None => {
                return Err(ApiError::invalid(
                    def,
                    "",
                    &[Cause::required(
                        "metadata.name",
                        "name or generateName is required",
                    )],
                ));
            }
        },
    };
    m.insert("name".into(), json!(name));
    for k in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    ] {
        m.remove(k);
    }
    m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert("creationTimestamp".into(), json!(now()));
    if def.generation {
        m.insert("generation".into(), json!(1));
    } else {
        m.remove("generation");
    }
    if def.status
        && let Some(o) = obj.as_object_mut()
    {
        o.remove("status");
    }
    let mut causes: Vec<Cause> = name_errors(&name, def.name_rule)
        .into_iter()
        .map(|e| Cause::invalid("metadata.name", &json!(name), &e))
        .collect();
    prepare(def, None, &mut obj, "", &mut causes)?;
    validate_object_meta(&obj, &mut causes);
    let warnings = schema_check(req, &mut obj, None, &mut causes)?;
    if !causes.is_empty() {
        return Err(ApiError::invalid(def, &name, &causes));
    }
    if def.namespaced {
        namespace_usable(state, def, &name, req.namespace)?;
    }
    if state.terminating_crds.contains(&def.storage) {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "create not allowed while custom resource definition is terminating",
        ));
    }
    let key = req.key(&name);
    if state.get(&def.storage, &key).is_some() {
        return Err(ApiError::already_exists(def, &name));
    }
    let time = now();
    let writer = Writer {
        manager: req.manager,
        subresource: "",
        api_version: &def.api_version(),
        now: &time,
    };
    let entries = match ownership {
        Ownership::Update => {
            fields::record_update(vec![], None, &obj, &writer, &req.types(), req.scope())
        }
        Ownership::Preset(e) => e,
    };
    fields::write_entries(&mut obj, &entries);
    if req.dry_run {
        return Ok(Written {
            code: 201,
            body: obj,
            warnings,
        });
    }
    let mut canon = obj;
    incoming(def, &mut canon);
    let stored = state.commit(&def.storage, &key, Some(canon));
    if def.behaviour == Behaviour::Crd {
        state.pending_crds.push(name);
    }
    Ok(Written {
        code: 201,
        body: wire(def, &stored),
        warnings,
    })
}

/// Everything between "the client's intended object" and storage for updates and patches.
pub(crate) fn finish_update(
    state: &mut State,
    req: &WriteReq,
    old: &Arc<Stored>,
    mut new: Value,
    ownership: Ownership,
) -> Result<Written, ApiError> {
    let def = req.def;
    let name = old.name.clone();
    let old_wire = wire(def, old);
    if !new.is_object() {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    }
    if let Some(rv) = meta_str(&new, "resourceVersion")
        && !rv.is_empty()
        && rv != old.rv.to_string()
    {
        return Err(ApiError::stale(def, &name));
    }
    let old_uid = meta_str(&old_wire, "uid").unwrap_or("").to_string();
    if let Some(uid) = meta_str(&new, "uid")
        && !uid.is_empty()
        && uid != old_uid
    {
        return Err(ApiError::conflict(
            def,
            &name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
            ),
        ));
    }
    new["apiVersion"] = json!(def.api_version());
    new["kind"] = json!(def.kind);
    prune_object_meta(&mut new);
    let old_meta = meta(&old_wire).cloned().unwrap_or_default();
    let m = meta_mut(&mut new);
    for k in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "resourceVersion",
    ] {
        match old_meta.get(k) {
            Some(v) => m.insert(k.into(), v.clone()),
            None => m.remove(k),
        };
    }
    match req.subresource {
        "status" => {
            let status = new.get("status").cloned();
            let managed = meta(&new).and_then(|m| m.get("managedFields")).cloned();
            new = old_wire.clone();
            let o = new.as_object_mut().expect("objects are JSON objects");
            match status {
                Some(s) => o.insert("status".into(), s),
                None => o.remove("status"),
            };
            if let Some(mf) = managed {
                meta_mut(&mut new).insert("managedFields".into(), mf);
            }
        }
        "finalize" => {
            let fin = new
                .pointer("/spec/finalizers")
                .cloned()
                .unwrap_or(json!([]));
            new = old_wire.clone();
            new["spec"]["finalizers"] = fin;
        }
        _ if def.status => {
            let o = new.as_object_mut().expect("objects are JSON objects");
            match old_wire.get("status") {
                Some(s) => o.insert("status".into(), s.clone()),
                None => o.remove("status"),
            };
        }
        _ => {}
    }
    if is_deleting(&old_wire) {
        let before: BTreeSet<String> = finalizers(&old_wire).into_iter().collect();
        let added: Vec<String> = finalizers(&new)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            let list = added
                .iter()
                .map(|f| format!("{f:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ApiError::invalid(
                def,
                &name,
                &[Cause::forbidden(
                    "metadata.finalizers",
                    &format!(
                        "no new finalizers can be added if the object is being deleted, found new \
                     finalizers []string{{{list}}}"
                    ),
                )],
            ));
        }
    }
    let mut causes = Vec::new();
    prepare(def, Some(&old_wire), &mut new, req.subresource, &mut causes)?;
    validate_object_meta(&new, &mut causes);
    let warnings = schema_check(req, &mut new, Some(&old_wire), &mut causes)?;
    if !causes.is_empty() {
        return Err(ApiError::invalid(def, &name, &causes));
    }
    if def.generation && content(&old_wire, def.status) != content(&new, def.status) {
        let g = meta(&old_wire)
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta_mut(&mut new).insert("generation".into(), json!(g + 1));
    }
    let time = now();
    let api_version = def.api_version();
    let writer = Writer {
        manager: req.manager,
        subresource: req.subresource,
        api_version: &api_version,
        now: &time,
    };
    let entries = match ownership {
        Ownership::Update => fields::record_update(
            fields::read_entries(&old_wire),
            Some(&old_wire),
            &new,
            &writer,
            &req.types(),
            req.scope(),
        ),
        Ownership::Preset(e) => e,
    };
    fields::write_entries(&mut new, &entries);
    if new == old_wire {
        return Ok(Written {
            code: 200,
            body: old_wire,
            warnings,
        });
    }
    if req.dry_run {
        return Ok(Written {
            code: 200,
            body: new,
            warnings,
        });
    }
    let key = req.key(&name);
    if is_deleting(&new) && finalizers(&new).is_empty() && !namespace_finalizers_pending(def, &new)
    {
        // Like the real server: the object goes at once, the update's response is the object
        // as updated, and watchers get DELETED with the last stored version.
        remove(state, &def.storage, &key);
        return Ok(Written {
            code: 200,
            body: new,
            warnings,
        });
    }
    let crd_spec_changed =
        def.behaviour == Behaviour::Crd && old_wire.get("spec") != new.get("spec");
    let mut canon = new;
    incoming(def, &mut canon);
    let stored = state.commit(&def.storage, &key, Some(canon));
    if crd_spec_changed {
        state.pending_crds.push(name);
    }
    Ok(Written {
        code: 200,
        body: wire(def, &stored),
        warnings,
    })
}

fn namespace_finalizers_pending(def: &ResourceDef, obj: &Value) -> bool {
    def.behaviour == Behaviour::Namespace
        && obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty())
}

/// What generation tracks: everything but metadata (and status, when it is a subresource).
fn content(obj: &Value, status_subresource: bool) -> Value {
    let mut c = obj.clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("metadata");
        if status_subresource {
            o.remove("status");
        }
    }
    c
}

pub(crate) fn delete(
    state: &mut State,
    req: &WriteReq,
    name: &str,
    options: &Value,
) -> Result<Written, ApiError> {
    let def = req.def;
    let key = req.key(name);
    let old = state
        .get(&def.storage, &key)
        .ok_or_else(|| ApiError::not_found(def, name))?;
    if def.behaviour == Behaviour::Namespace
        && matches!(name, "default" | "kube-system" | "kube-public")
    {
        return Err(ApiError::forbidden(
            def,
            name,
            "this namespace may not be deleted",
        ));
    }
    let mut obj = wire(def, &old);
    if let Some(uid) = options
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
    {
        let have = meta_str(&obj, "uid").unwrap_or("");
        if uid != have {
            return Err(ApiError::conflict(
                def,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
                ),
            ));
        }
    }
    if let Some(rv) = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        && rv != old.rv.to_string()
    {
        return Err(ApiError::conflict(
            def,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in \
                 object meta: {}",
                old.rv
            ),
        ));
    }
    if req.dry_run || is_deleting(&obj) {
        return Ok(Written {
            code: 200,
            body: obj,
            warnings: vec![],
        });
    }
    let orphan = options.get("propagationPolicy").and_then(Value::as_str) == Some("Orphan")
        || options.get("orphanDependents").and_then(Value::as_bool) == Some(true);
    if orphan {
        orphan_dependents(state, &old.uid);
    }
    let deferred = def.behaviour == Behaviour::Namespace || !finalizers(&obj).is_empty();
    if !deferred {
        remove(state, &def.storage, &key);
        let mut details = serde_json::Map::new();
        details.insert("name".into(), json!(name));
        if !def.group.is_empty() {
            details.insert("group".into(), json!(def.group));
        }
        details.insert("kind".into(), json!(def.plural));
        details.insert("uid".into(), json!(meta_str(&obj, "uid").unwrap_or("")));
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Success", "details": Value::Object(details)});
        return Ok(Written {
            code: 200,
            body: status,
            warnings: vec![],
        });
    }
    mark_deleting(&mut obj, def);
    let mut canon = obj;
    incoming(def, &mut canon);
    let stored = state.commit(&def.storage, &key, Some(canon));
    let body = wire(def, &stored);
    match def.behaviour {
        Behaviour::Namespace => {
            state.terminating_namespaces.insert(name.to_string());
            delete_contents(
                state,
                |sid, storage_namespaced| storage_namespaced && sid != "namespaces",
                Some(name),
            );
            check_namespace_done(state, name);
        }
        Behaviour::Crd => {
            state.terminating_crds.insert(name.to_string());
            let sid = name.to_string();
            delete_contents(state, |s, _| s == sid, None);
            check_crd_done(state, name);
        }
        _ => {}
    }
    Ok(Written {
        code: 200,
        body,
        warnings: vec![],
    })
}

fn mark_deleting(obj: &mut Value, def: &ResourceDef) {
    let generation = meta(obj)
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64);
    let m = meta_mut(obj);
    m.insert("deletionTimestamp".into(), json!(now()));
    m.insert("deletionGracePeriodSeconds".into(), json!(0));
    if let Some(g) = generation {
        m.insert("generation".into(), json!(g + 1));
    }
    if def.behaviour == Behaviour::Namespace {
        obj["status"] = json!({"phase": "Terminating"});
    }
}

/// Deletes (or marks, when finalizers hold them) every object in matching storages,
/// optionally only in one namespace: what the namespace and CRD cleanup controllers do.
fn delete_contents(
    state: &mut State,
    storage_filter: impl Fn(&str, bool) -> bool,
    ns: Option<&str>,
) {
    let mut targets: Vec<(String, Key)> = Vec::new();
    for (sid, storage) in &state.storages {
        if !storage_filter(sid, storage.namespaced) {
            continue;
        }
        match ns {
            Some(ns) => {
                let start = (ns.to_string(), String::new());
                targets.extend(
                    storage
                        .objects
                        .range(start..)
                        .take_while(|((n, _), _)| n == ns)
                        .map(|(k, _)| (sid.clone(), k.clone())),
                );
            }
            None => targets.extend(storage.objects.keys().map(|k| (sid.clone(), k.clone()))),
        }
    }
    for (sid, key) in targets {
        delete_one(state, &sid, &key);
    }
}

/// What a controller's delete call does: remove the object, or mark it when finalizers hold it.
fn delete_one(state: &mut State, storage: &str, key: &Key) {
    let Some(obj) = state.get(storage, key) else {
        return;
    };
    let mut v = obj.value();
    if is_deleting(&v) {
        return;
    }
    if finalizers(&v).is_empty() {
        remove(state, storage, key);
    } else if let Some(def) = state.preferred_def(storage) {
        mark_deleting(&mut v, &def);
        state.commit(storage, key, Some(v));
    }
}

/// Removes an object from storage and runs what follows: garbage collection of its
/// dependents (background propagation) and CRD and namespace cleanup.
pub(crate) fn remove(state: &mut State, storage: &str, key: &Key) {
    let gone = state.commit(storage, key, None);
    after_removal(state, storage, key);
    if let Some(dependents) = state.dependents.remove(&gone.uid) {
        for (sid, k) in dependents {
            delete_one(state, &sid, &k);
        }
    }
}

/// Drops the owner reference to `uid` from its dependents, as the garbage collector does for
/// `propagationPolicy: Orphan`.
fn orphan_dependents(state: &mut State, uid: &str) {
    let Some(dependents) = state.dependents.get(uid).cloned() else {
        return;
    };
    for (sid, key) in dependents {
        let Some(obj) = state.get(&sid, &key) else {
            continue;
        };
        let mut v = obj.value();
        if let Some(refs) = v
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
        }
        state.commit(&sid, &key, Some(v));
    }
}

/// Follow-ups once an object is gone: a removed CRD takes its resource with it, and
/// terminating namespaces and CRDs finish when their last object goes.
fn after_removal(state: &mut State, storage: &str, key: &Key) {
    if storage == CRD_STORAGE {
        let crd = &key.1;
        state.unregister(crd);
        state.storages.remove(crd);
        state.terminating_crds.remove(crd);
    }
    if !key.0.is_empty() && state.terminating_namespaces.contains(&key.0) {
        check_namespace_done(state, &key.0.clone());
    }
    if state.terminating_crds.contains(storage) {
        check_crd_done(state, storage);
    }
}

fn check_namespace_done(state: &mut State, ns: &str) {
    if state.namespace_has_content(ns) {
        return;
    }
    let key = (String::new(), ns.to_string());
    let Some(obj) = state.get("namespaces", &key) else {
        state.terminating_namespaces.remove(ns);
        return;
    };
    state.terminating_namespaces.remove(ns);
    let mut v = obj.value();
    if finalizers(&v).is_empty() {
        remove(state, "namespaces", &key);
    } else {
        v["spec"]["finalizers"] = json!([]);
        state.commit("namespaces", &key, Some(v));
    }
}

fn check_crd_done(state: &mut State, crd: &str) {
    if state
        .storages
        .get(crd)
        .is_some_and(|s| !s.objects.is_empty())
    {
        return;
    }
    let key = (String::new(), crd.to_string());
    let Some(obj) = state.get(CRD_STORAGE, &key) else {
        return;
    };
    let mut v = obj.value();
    let rest: Vec<String> = finalizers(&v)
        .into_iter()
        .filter(|f| f != CRD_FINALIZER)
        .collect();
    if rest.is_empty() {
        remove(state, CRD_STORAGE, &key);
    } else {
        meta_mut(&mut v).insert("finalizers".into(), json!(rest));
        state.commit(CRD_STORAGE, &key, Some(v));
    }
}

fn condition(existing: Option<&Value>, type_: &str, reason: &str, message: &str) -> Value {
    let time = existing
        .and_then(|c| c.as_array())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["type"] == type_ && c["status"] == "True")
        })
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now()));
    json!({"type": type_, "status": "True", "lastTransitionTime": time, "reason": reason,
           "message": message})
}

/// The apiextensions controllers: accept the names, serve the versions, mark Established and
/// add the cleanup finalizer.
pub(crate) fn establish(state: &mut State, crd: &str) {
    let key = (String::new(), crd.to_string());
    let Some(stored) = state.get(CRD_STORAGE, &key) else {
        return;
    };
    let mut v = stored.value();
    if is_deleting(&v) {
        return;
    }
    let defs = crd_resources(&v);
    let Some(first) = defs.first() else {
        return;
    };
    let clash = state
        .defs
        .values()
        .any(|d| d.group == first.group && d.storage != first.storage && d.kind == first.kind);
    let conditions = v.pointer("/status/conditions").cloned();
    let (accepted, established) = if clash {
        (
            json!({"type": "NamesAccepted", "status": "False", "lastTransitionTime": now(),
                   "reason": "KindConflict",
                   "message": format!("{:?} is already in use", first.kind)}),
            json!({"type": "Established", "status": "False", "lastTransitionTime": now(),
                   "reason": "NotAccepted", "message": "not all names are accepted"}),
        )
    } else {
        (
            condition(
                conditions.as_ref(),
                "NamesAccepted",
                "NoConflicts",
                "no conflicts found",
            ),
            condition(
                conditions.as_ref(),
                "Established",
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
        )
    };
    let storage_version = first
        .storage_api_version
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let mut stored_versions: Vec<Value> = v
        .pointer("/status/storedVersions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !stored_versions.contains(&json!(storage_version)) {
        stored_versions.push(json!(storage_version));
    }
    let names = json!({
        "plural": first.plural, "singular": first.singular, "kind": first.kind,
        "listKind": first.list_kind, "shortNames": first.short_names,
        "categories": first.categories,
    });
    let mut names = names;
    if let Some(n) = names.as_object_mut() {
        n.retain(|_, v| !v.as_array().is_some_and(Vec::is_empty));
    }
    v["status"] = json!({"conditions": [accepted, established], "acceptedNames": names,
                         "storedVersions": stored_versions});
    if !clash {
        let mut fins = finalizers(&v);
        if !fins.iter().any(|f| f == CRD_FINALIZER) {
            fins.push(CRD_FINALIZER.to_string());
            meta_mut(&mut v).insert("finalizers".into(), json!(fins));
        }
        state.unregister(crd);
        for d in defs {
            state.register(d);
        }
    }
    if v != stored.value() {
        state.commit(CRD_STORAGE, &key, Some(v));
    }
}

/// Built-in kinds' own defaulting and validation.
fn prepare(
    def: &ResourceDef,
    old: Option<&Value>,
    obj: &mut Value,
    subresource: &str,
    causes: &mut Vec<Cause>,
) -> Result<(), ApiError> {
    match def.behaviour {
        Behaviour::Secret => prepare_secret(obj, old, causes)?,
        Behaviour::ConfigMap => prepare_configmap(obj, old, causes),
        Behaviour::Namespace => {
            let name = meta_str(obj, "name").unwrap_or("").to_string();
            let m = meta_mut(obj);
            let labels = m.entry("labels").or_insert_with(|| json!({}));
            if !labels.is_object() {
                *labels = json!({});
            }
            labels["kubernetes.io/metadata.name"] = json!(name);
            match old {
                None => {
                    obj["spec"] = json!({"finalizers": ["kubernetes"]});
                    obj["status"] = json!({"phase": "Active"});
                }
                Some(old) if subresource != "finalize" => {
                    obj["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
                }
                Some(_) => {}
            }
        }
        Behaviour::Event | Behaviour::EventV1 => {
            let mut canon = obj.clone();
            incoming(def, &mut canon);
            validate_event(
                &canon,
                def.behaviour == Behaviour::EventV1,
                old.is_none(),
                causes,
            );
        }
        Behaviour::Crd => {
            let spec = obj.get_mut("spec").and_then(Value::as_object_mut);
            if let Some(spec) = spec {
                if !spec.contains_key("conversion") {
                    spec.insert("conversion".into(), json!({"strategy": "None"}));
                }
                if let Some(names) = spec.get_mut("names").and_then(Value::as_object_mut)
                    && let Some(kind) = names
                        .get("kind")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                {
                    names
                        .entry("singular")
                        .or_insert_with(|| json!(kind.to_lowercase()));
                    names
                        .entry("listKind")
                        .or_insert_with(|| json!(format!("{kind}List")));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn immutable_checks(
    obj: &Value,
    old: Option<&Value>,
    data_fields: &[&str],
    causes: &mut Vec<Cause>,
) {
    let Some(old) = old else {
        return;
    };
    if old.get("immutable").and_then(Value::as_bool) != Some(true) {
        return;
    }
    for f in data_fields {
        if obj.get(*f) != old.get(*f) {
            causes.push(Cause::forbidden(
                *f,
                "field is immutable when `immutable` is set",
            ));
        }
    }
    if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
        causes.push(Cause::forbidden(
            "immutable",
            "field is immutable when `immutable` is set",
        ));
    }
}

fn prepare_secret(
    obj: &mut Value,
    old: Option<&Value>,
    causes: &mut Vec<Cause>,
) -> Result<(), ApiError> {
    let o = obj.as_object_mut().expect("objects are JSON objects");
    if let Some(Value::Object(sd)) = o.remove("stringData") {
        let data = o.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        for (k, v) in sd {
            data[k] = json!(B64.encode(v.as_str().unwrap_or("")));
        }
    }
    if o.get("type")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        o.insert("type".into(), json!("Opaque"));
    }
    let mut total = 0usize;
    if let Some(data) = o.get("data").and_then(Value::as_object) {
        for (k, v) in data {
            let decoded = v.as_str().and_then(|s| B64.decode(s).ok()).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 \
                         data in data[{k:?}]"
                ))
            })?;
            total += decoded.len();
            for e in config_key_errors(k) {
                causes.push(Cause::invalid(format!("data[{k}]"), &json!(k), &e));
            }
        }
    }
    if o.get("data").is_some_and(Value::is_null) {
        o.remove("data");
    }
    if total > 1024 * 1024 {
        causes.push(Cause::too_long("data", 1024 * 1024));
    }
    if let Some(old) = old {
        if old.get("type") != obj.get("type") {
            causes.push(Cause::invalid(
                "type",
                obj.get("type").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        immutable_checks(obj, Some(old), &["data"], causes);
    }
    Ok(())
}

fn prepare_configmap(obj: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let data = obj.get("data").and_then(Value::as_object);
    let binary = obj.get("binaryData").and_then(Value::as_object);
    for (field, map) in [("data", data), ("binaryData", binary)] {
        for k in map.into_iter().flat_map(|m| m.keys()) {
            for e in config_key_errors(k) {
                causes.push(Cause::invalid(format!("{field}[{k}]"), &json!(k), &e));
            }
        }
    }
    if let (Some(d), Some(b)) = (data, binary) {
        for k in d.keys().filter(|k| b.contains_key(*k)) {
            causes.push(Cause::invalid(
                format!("data[{k}]"),
                &json!(k),
                "duplicate of key present in binaryData",
            ));
        }
    }
    immutable_checks(obj, old, &["data", "binaryData"], causes);
}

/// Event validation in the core form (`legacyValidateEvent` plus the strict rules for
/// `events.k8s.io/v1` creates).
fn validate_event(ev: &Value, v1: bool, create: bool, causes: &mut Vec<Cause>) {
    let s = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or("");
    let ns = meta_str(ev, "namespace").unwrap_or("");
    let involved_ns = ev
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let event_time = ev.get("eventTime").is_some_and(|t| !t.is_null());
    let controller_field = if v1 {
        "reportingController"
    } else {
        "reportingComponent"
    };
    let (obj_field, note_field) = if v1 {
        ("regarding", "note")
    } else {
        ("involvedObject", "message")
    };
    if !event_time {
        let mismatch = if involved_ns.is_empty() {
            !ns.is_empty() && ns != "default"
        } else {
            ns != involved_ns
        };
        if mismatch {
            causes.push(Cause::invalid(
                format!("{obj_field}.namespace"),
                &json!(involved_ns),
                "does not match event.namespace",
            ));
        }
    } else {
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            causes.push(Cause::invalid(
                format!("{obj_field}.namespace"),
                &json!(involved_ns),
                "does not match event.namespace",
            ));
        }
        let controller = s("reportingComponent");
        if controller.is_empty() {
            causes.push(Cause::required(controller_field, ""));
        }
        for e in qualified_name_errors(controller) {
            causes.push(Cause::invalid(controller_field, &json!(controller), &e));
        }
        for (field, shown, limit) in [
            ("reportingInstance", "reportingInstance", 128),
            ("action", "action", 128),
            ("reason", "reason", 128),
        ] {
            let v = s(field);
            if v.is_empty() {
                causes.push(Cause::required(shown, ""));
            }
            if v.len() > limit {
                causes.push(Cause::invalid(
                    shown,
                    &json!(""),
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if s("message").len() > 1024 {
            causes.push(Cause::invalid(
                note_field,
                &json!(""),
                "can have at most 1024 characters",
            ));
        }
    }
    if !ns.is_empty() {
        for e in name_errors(ns, NameRule::Subdomain) {
            causes.push(Cause::invalid("namespace", &json!(ns), &e));
        }
    }
    if v1 && create {
        if !event_time {
            causes.push(Cause::required("eventTime", ""));
        }
        let t = s("type");
        if t != "Normal" && t != "Warning" {
            causes.push(Cause::invalid(
                "type",
                &json!(""),
                &format!("has invalid value: {t}"),
            ));
        }
        for (core, shown) in [
            ("firstTimestamp", "deprecatedFirstTimestamp"),
            ("lastTimestamp", "deprecatedLastTimestamp"),
        ] {
            if ev.get(core).is_some_and(|v| !v.is_null()) {
                causes.push(Cause::invalid(shown, &json!(""), "needs to be unset"));
            }
        }
        if ev
            .get("count")
            .and_then(Value::as_i64)
            .is_some_and(|c| c != 0)
        {
            causes.push(Cause::invalid(
                "deprecatedCount",
                &json!(""),
                "needs to be unset",
            ));
        }
        if ev
            .get("source")
            .and_then(Value::as_object)
            .is_some_and(|s| {
                s.values()
                    .any(|v| v.as_str().is_some_and(|x| !x.is_empty()))
            })
        {
            causes.push(Cause::invalid(
                "deprecatedSource",
                &json!(""),
                "needs to be unset",
            ));
        }
    }
}
