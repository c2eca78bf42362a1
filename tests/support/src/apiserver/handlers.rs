//! HTTP routing and the read paths (get, list), plus the review APIs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::error::{ApiError, Cause};
use super::fields::{self, Scope, Types, Writer};
use super::meta::{meta_str, now};
use super::metrics;
use super::ops::{self, Ownership, WriteReq, Written, check_type_meta, wire};
use super::patch::{json_patch, merge_patch, strategic_merge};
use super::resource::{Behaviour, ResourceDef};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Key, State, Stored};
use super::table::{self, Include};
use super::{RequestRecord, Shared, discovery, protobuf, watch};

pub(crate) type Query = HashMap<String, String>;

/// How the client wants objects rendered (the `Accept` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Full,
    Metadata,
    Table(&'static str),
}

/// Picks the first acceptable media type, as the server's content negotiation does.
pub(crate) fn negotiate(headers: &HeaderMap, list: bool) -> Result<Mode, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Mode::Full);
    };
    if accept.trim().is_empty() {
        return Ok(Mode::Full);
    }
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let base = parts.next().unwrap_or("");
        if !matches!(base, "application/json" | "*/*" | "application/*") {
            continue;
        }
        let params: HashMap<&str, &str> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        match params.get("as").copied() {
            None => return Ok(Mode::Full),
            Some("Table") if params.get("g") == Some(&"meta.k8s.io") => match params.get("v") {
                Some(&"v1") => return Ok(Mode::Table("v1")),
                Some(&"v1beta1") => return Ok(Mode::Table("v1beta1")),
                _ => {}
            },
            Some("PartialObjectMetadata") if !list && params.get("g") == Some(&"meta.k8s.io") => {
                return Ok(Mode::Metadata);
            }
            Some("PartialObjectMetadataList")
                if list && params.get("g") == Some(&"meta.k8s.io") =>
            {
                return Ok(Mode::Metadata);
            }
            _ => {}
        }
    }
    Err(ApiError::not_acceptable())
}

pub(crate) fn json_response(code: u16, body: impl Into<Body>, warnings: &[String]) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    let mut resp = (code, body.into()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {w:?}")) {
            h.append(header::WARNING, v);
        }
    }
    resp
}

fn value_response(code: u16, v: &Value, warnings: &[String]) -> Response {
    json_response(code, serde_json::to_vec(v).unwrap_or_default(), warnings)
}

/// The resource part of a request path.
#[derive(Debug, PartialEq)]
pub(crate) struct ResourcePath {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) plural: String,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
}

enum Route {
    Version,
    Health,
    Metrics,
    Api,
    Apis,
    GroupVersion(String, String),
    OpenApi,
    OpenApiGroupVersion(String, String),
    Resource(ResourcePath),
    Unknown,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "livez" | "readyz", ..] => return Route::Health,
        ["metrics"] => return Route::Metrics,
        ["api"] => return Route::Api,
        ["apis"] => return Route::Apis,
        ["openapi", "v3"] => return Route::OpenApi,
        ["openapi", "v3", "api", v] => {
            return Route::OpenApiGroupVersion(String::new(), v.to_string());
        }
        ["openapi", "v3", "apis", g, v] => {
            return Route::OpenApiGroupVersion(g.to_string(), v.to_string());
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Unknown,
    };
    let rp = |plural: &str, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Route::Resource(ResourcePath {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            namespace: ns.map(str::to_string),
            name: name.map(str::to_string),
            subresource: sub.map(str::to_string),
        })
    };
    let core = group.is_empty();
    match rest {
        [] => Route::GroupVersion(group.into(), version.into()),
        ["namespaces", ns, sub] if core && (*sub == "status" || *sub == "finalize") => {
            rp("namespaces", None, Some(ns), Some(sub))
        }
        ["namespaces", ns, plural] => rp(plural, Some(ns), None, None),
        ["namespaces", ns, plural, name] => rp(plural, Some(ns), Some(name), None),
        ["namespaces", ns, plural, name, sub] => rp(plural, Some(ns), Some(name), Some(sub)),
        [plural] => rp(plural, None, None, None),
        [plural, name] => rp(plural, None, Some(name), None),
        [plural, name, sub] => rp(plural, None, Some(name), Some(sub)),
        _ => Route::Unknown,
    }
}

fn query_of(uri: &axum::http::Uri) -> Query {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The verb and the resource (`plural` or `plural/subresource`) a real server's
/// `apiserver_request_total` gives `req`, as a client sends it; None for a path that names no
/// resource. A client on a real cluster counts its own requests with it.
pub fn request_series<B>(req: &axum::http::Request<B>) -> Option<(String, String)> {
    let Route::Resource(rp) = route(req.uri().path()) else {
        return None;
    };
    let verb = verb_of(req.method(), &rp, &query_of(req.uri()));
    Some(metrics::RequestLabels::new(verb, &rp, req.headers(), false).series())
}

fn is_true(q: &Query, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

pub(crate) async fn handle(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let query = query_of(req.uri());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), 256 << 20).await {
        Ok(b) => b,
        Err(e) => return ApiError::bad_request(e.to_string()).into_response(),
    };
    match route(&path) {
        Route::Version => value_response(200, &discovery::version(), &[]),
        Route::Health => json_response(200, "ok", &[]),
        Route::Api => {
            let server = shared.addr.to_string();
            value_response(200, &discovery::core_versions(&server), &[])
        }
        Route::Apis => {
            let doc = discovery::groups(&shared.lock());
            value_response(200, &doc, &[])
        }
        Route::GroupVersion(g, v) => match discovery::resources(&shared.lock(), &g, &v) {
            Some(doc) => value_response(200, &doc, &[]),
            None => ApiError::unknown_resource().into_response(),
        },
        Route::OpenApi => value_response(200, &discovery::openapi_root(&shared.lock()), &[]),
        Route::OpenApiGroupVersion(g, v) => {
            let state = shared.lock();
            match discovery::resources(&state, &g, &v) {
                Some(_) => {
                    value_response(200, &discovery::openapi_group_version(&state, &g, &v), &[])
                }
                None => ApiError::unknown_resource().into_response(),
            }
        }
        Route::Metrics => {
            let text = metrics::render(&shared.lock().request_totals);
            let mut resp = (StatusCode::OK, text).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        Route::Resource(rp) => {
            let labels = metrics::RequestLabels::new(
                verb_of(&method, &rp, &query),
                &rp,
                &headers,
                query.get("dryRun").is_some_and(|d| !d.is_empty()),
            );
            let resp = resource(shared.clone(), method, rp, query, headers, body)
                .await
                .unwrap_or_else(IntoResponse::into_response);
            *shared
                .lock()
                .request_totals
                .entry((labels, resp.status().as_u16()))
                .or_default() += 1;
            resp
        }
        Route::Unknown => ApiError::unknown_resource().into_response(),
    }
}

fn verb_of(method: &Method, rp: &ResourcePath, query: &Query) -> &'static str {
    match *method {
        Method::GET if rp.name.is_some() => "get",
        Method::GET if is_true(query, "watch") => "watch",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if rp.name.is_some() => "delete",
        Method::DELETE => "deletecollection",
        _ => "",
    }
}

/// The manager non-apply writes are recorded under: `fieldManager`, else the User-Agent's
/// product name, as the real server derives it (empty when there is no User-Agent).
fn field_manager(query: &Query, headers: &HeaderMap) -> String {
    if let Some(m) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    let ua = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ua.split('/')
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect()
}

/// A decoded request for one resource, with its definition resolved.
struct Ctx {
    def: Arc<ResourceDef>,
    namespace: String,
    name: Option<String>,
    subresource: String,
    verb: &'static str,
}

async fn resource(
    shared: Arc<Shared>,
    method: Method,
    rp: ResourcePath,
    query: Query,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let verb = verb_of(&method, &rp, &query);
    shared.cost.spend(verb).await;
    let ctx = {
        let mut state = shared.lock();
        state.requests.push(RequestRecord {
            verb: verb.to_string(),
            group: rp.group.clone(),
            version: rp.version.clone(),
            resource: rp.plural.clone(),
            subresource: rp.subresource.clone().unwrap_or_default(),
            namespace: rp.namespace.clone(),
            name: rp.name.clone(),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        let def = state
            .def(&rp.group, &rp.version, &rp.plural)
            .ok_or_else(ApiError::unknown_resource)?;
        let sub = rp.subresource.clone().unwrap_or_default();
        let scope_ok = def.namespaced || rp.namespace.is_none();
        let named_ok = !def.namespaced || rp.namespace.is_some() || rp.name.is_none();
        let sub_ok = sub.is_empty() || def.subresources.contains(&sub.as_str());
        if !scope_ok || !named_ok || !sub_ok || verb.is_empty() {
            return Err(ApiError::unknown_resource());
        }
        let all_namespaces_write =
            def.namespaced && rp.namespace.is_none() && !matches!(verb, "list" | "watch");
        if !def.has_verb(verb)
            || all_namespaces_write
            || (!sub.is_empty() && !matches!(verb, "get" | "update" | "patch"))
        {
            return Err(ApiError::method_not_allowed());
        }
        let target = if sub.is_empty() {
            def.plural.clone()
        } else {
            format!("{}/{sub}", def.plural)
        };
        if let Some(i) = state
            .injections
            .iter()
            .position(|f| (f.verb == verb || f.verb == "*") && f.resource == target)
        {
            let inj = state.injections.remove(i);
            return Err(ApiError::injected(
                inj.code,
                &def,
                rp.name.as_deref().unwrap_or(""),
            ));
        }
        Ctx {
            def,
            namespace: rp.namespace.clone().unwrap_or_default(),
            name: rp.name.clone(),
            subresource: sub,
            verb,
        }
    };
    match ctx.verb {
        "get" => get(&shared, &ctx, &query, &headers),
        "list" => list(&shared, &ctx, &query, &headers),
        "watch" => {
            let mode = negotiate(&headers, false).or_else(|_| negotiate(&headers, true))?;
            watch::serve(shared, ctx.def.clone(), ctx.namespace.clone(), &query, mode)
        }
        _ => write(&shared, &ctx, &query, &headers, &body),
    }
}

fn render_one(def: &ResourceDef, stored: &Stored, mode: Mode, query: &Query) -> Response {
    match mode {
        Mode::Full if def.is_identity_view(&stored.api_version) => {
            json_response(200, stored.json.clone(), &[])
        }
        Mode::Full => value_response(200, &wire(def, stored), &[]),
        Mode::Metadata => json_response(200, stored.metadata_json(), &[]),
        Mode::Table(v) => {
            let include = Include::parse(query.get("includeObject").map(String::as_str));
            let meta = json!({"resourceVersion": stored.rv.to_string()});
            value_response(
                200,
                &table::table(def, v, &[wire(def, stored)], meta, include),
                &[],
            )
        }
    }
}

fn get(
    shared: &Shared,
    ctx: &Ctx,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let mode = negotiate(headers, false)?;
    let name = ctx.name.as_deref().unwrap_or("");
    let stored = shared
        .lock()
        .get(&ctx.def.storage, &(ctx.namespace.clone(), name.to_string()))
        .ok_or_else(|| ApiError::not_found(&ctx.def, name))?;
    Ok(render_one(&ctx.def, &stored, mode, query))
}

/// Selection criteria shared by list and watch.
pub(crate) struct Filter {
    pub namespace: String,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn parse(def: &ResourceDef, namespace: String, query: &Query) -> Result<Filter, ApiError> {
        let supported: Vec<String> = def.field_labels.iter().map(|(l, _)| l.clone()).collect();
        Ok(Filter {
            namespace,
            labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
            fields: FieldSelector::parse(
                query.get("fieldSelector").map_or("", String::as_str),
                &supported,
            )?,
        })
    }

    pub fn matches(&self, obj: &Stored) -> bool {
        (self.namespace.is_empty() || obj.namespace == self.namespace)
            && self.labels.matches(&obj.labels)
            && self.fields.matches(|f| obj.field(f))
    }
}

fn continue_token(rv: u64, key: &Key) -> String {
    let start = format!("{}/{}\u{0}", key.0, key.1);
    B64.encode(
        serde_json::to_vec(&json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start}))
            .unwrap_or_default(),
    )
}

fn parse_continue(token: &str) -> Result<(u64, Key), ApiError> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version \
             meta.k8s.io/v1)",
        )
    };
    let raw = B64.decode(token).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let start = start.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((rv, (ns.to_string(), name.to_string())))
}

fn list(
    shared: &Shared,
    ctx: &Ctx,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let def = &ctx.def;
    let mode = negotiate(headers, true)?;
    let filter = Filter::parse(def, ctx.namespace.clone(), query)?;
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let rv_param = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let exact = query.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
    let (items, snapshot_rv, next, remaining) = {
        let state = shared.lock();
        let storage = state
            .storages
            .get(&def.storage)
            .ok_or_else(ApiError::unknown_resource)?;
        let (at, after): (u64, Option<Key>) = match query.get("continue").filter(|c| !c.is_empty())
        {
            Some(token) => {
                let (rv, key) = parse_continue(token)?;
                if rv < storage.window_start {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list \
                         result. You can start a new list without the continue parameter, or use \
                         the continue token in this response to retrieve the remainder of the \
                         results. Continuing with the provided token results in an inconsistent \
                         list - objects that were created, modified, or deleted between the time \
                         the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some(key))
            }
            None if rv_param.is_empty() || rv_param == "0" => (state.rv, None),
            None => {
                let asked: u64 = rv_param.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "resourceVersion: Invalid value: {rv_param:?}: must be a non-negative \
                         integer"
                    ))
                })?;
                if asked > state.rv {
                    return Err(ApiError::too_large_resource_version(asked, state.rv));
                }
                let exact =
                    exact || (limit.is_some() && query.get("resourceVersionMatch").is_none());
                if exact {
                    if asked < storage.window_start {
                        return Err(ApiError::gone(
                            "The resourceVersion for the provided list is too old.",
                        ));
                    }
                    (asked, None)
                } else {
                    (state.rv, None)
                }
            }
        };
        let snapshot;
        let objects = if storage.changed_since(at) {
            snapshot = storage.snapshot_at(at)?;
            &snapshot
        } else {
            &storage.objects
        };
        let start = match &after {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None if !filter.namespace.is_empty() => {
                std::ops::Bound::Included((filter.namespace.clone(), String::new()))
            }
            None => std::ops::Bound::Unbounded,
        };
        let mut items: Vec<Arc<Stored>> = Vec::new();
        let mut next = None;
        let mut iter = objects
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|((ns, _), _)| filter.namespace.is_empty() || *ns == filter.namespace)
            .filter(|(_, o)| filter.matches(o));
        match filter.fields.pinned_name() {
            Some(name) if !filter.namespace.is_empty() && after.is_none() => {
                let key = (filter.namespace.clone(), name.to_string());
                items.extend(objects.get(&key).filter(|o| filter.matches(o)).cloned());
            }
            _ => {
                for (_, o) in iter.by_ref() {
                    if limit.is_some_and(|l| items.len() >= l) {
                        next = items.last().map(|o| o.key());
                        break;
                    }
                    items.push(o.clone());
                }
            }
        }
        let remaining = match &next {
            Some(_) if filter.labels.is_empty() && filter.fields.is_empty() => {
                Some(1 + iter.count())
            }
            _ => None,
        };
        (items, at, next, remaining)
    };
    let mut list_meta = serde_json::Map::new();
    list_meta.insert("resourceVersion".into(), json!(snapshot_rv.to_string()));
    if let Some(k) = &next {
        list_meta.insert("continue".into(), json!(continue_token(snapshot_rv, k)));
    }
    if let Some(n) = remaining {
        list_meta.insert("remainingItemCount".into(), json!(n));
    }
    let list_meta = Value::Object(list_meta);
    let (kind, api_version, bodies): (&str, String, Vec<Bytes>) = match mode {
        Mode::Table(v) => {
            let include = Include::parse(query.get("includeObject").map(String::as_str));
            let objs: Vec<Value> = items.iter().map(|s| wire(def, s)).collect();
            let t = table::table(def, v, &objs, list_meta, include);
            return Ok(value_response(200, &t, &[]));
        }
        Mode::Metadata => (
            "PartialObjectMetadataList",
            "meta.k8s.io/v1".into(),
            items.iter().map(|s| s.metadata_json()).collect(),
        ),
        Mode::Full => (
            &def.list_kind,
            def.api_version(),
            items
                .iter()
                .map(|s| {
                    if def.is_identity_view(&s.api_version) {
                        s.json.clone()
                    } else {
                        Bytes::from(serde_json::to_vec(&wire(def, s)).unwrap_or_default())
                    }
                })
                .collect(),
        ),
    };
    let mut out = Vec::with_capacity(bodies.iter().map(Bytes::len).sum::<usize>() + 256);
    out.extend_from_slice(
        format!(
            "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
            json!(kind),
            json!(api_version),
            list_meta
        )
        .as_bytes(),
    );
    for (i, b) in bodies.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b);
    }
    out.extend_from_slice(b"]}");
    Ok(json_response(200, out, &[]))
}

fn parse_body(body: &[u8], headers: &HeaderMap, kind: &str) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/vnd.kubernetes.protobuf") {
        protobuf::decode(body, kind)
    } else if ct.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
    }
}

fn write(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let def = &ctx.def;
    let dry_run = query.get("dryRun").is_some_and(|d| d == "All");
    if let Some(d) = query.get("dryRun").filter(|d| *d != "All" && !d.is_empty()) {
        let options = if ctx.verb == "create" {
            "CreateOptions"
        } else {
            "PatchOptions"
        };
        return Err(ApiError::invalid_options(
            options,
            &[Cause::unsupported("dryRun", &json!(d), &["All".into()])],
        ));
    }
    if query.get("fieldManager").is_some_and(|m| m.len() > 128) {
        return Err(ApiError::invalid_options(
            "PatchOptions",
            &[Cause::too_long("fieldManager", 128)],
        ));
    }
    if !def.stored() {
        let value = parse_body(body, headers, &def.kind)?;
        let resp = review(&shared.lock(), def, value)?;
        return Ok(value_response(201, &resp, &[]));
    }
    let manager = field_manager(query, headers);
    let req = WriteReq {
        def,
        namespace: &ctx.namespace,
        subresource: &ctx.subresource,
        manager: &manager,
        dry_run,
        strict: query.get("fieldValidation").is_some_and(|v| v == "Strict"),
    };
    let name = ctx.name.clone().unwrap_or_default();
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim().to_string();
    let result = {
        let mut state = shared.lock();
        let held = std::time::Instant::now();
        let result = match ctx.verb {
            "create" => {
                let obj = parse_body(body, headers, &def.kind)?;
                ops::create(&mut state, &req, obj, Ownership::Update)
            }
            "update" => update(
                &mut state,
                &req,
                &name,
                parse_body(body, headers, &def.kind)?,
            ),
            "patch" => {
                let apply = ApplyOptions {
                    force: is_true(query, "force"),
                    manager_given: query.get("fieldManager").is_some_and(|m| !m.is_empty()),
                };
                patch(&mut state, &req, &name, &ct, body, apply)
            }
            "delete" => {
                let protobuf = ct == "application/vnd.kubernetes.protobuf";
                let options = if body.is_empty() || protobuf {
                    json!({})
                } else {
                    parse_body(body, headers, "DeleteOptions")?
                };
                let dry = req.dry_run
                    || options
                        .get("dryRun")
                        .and_then(Value::as_array)
                        .is_some_and(|d| !d.is_empty());
                let req = WriteReq {
                    dry_run: dry,
                    ..req
                };
                ops::delete(&mut state, &req, &name, &options)
            }
            "deletecollection" => delete_collection(&mut state, &req, query),
            _ => Err(ApiError::method_not_allowed()),
        };
        if result.is_ok() && !req.dry_run {
            let key = if ctx.subresource.is_empty() {
                def.plural.clone()
            } else {
                format!("{}/{}", def.plural, ctx.subresource)
            };
            *state.writes.entry(key).or_default() += 1;
            state.total_writes += 1;
        }
        let pending = std::mem::take(&mut state.pending_crds);
        drop(state);
        let held = u64::try_from(held.elapsed().as_nanos()).unwrap_or(u64::MAX);
        shared
            .write_lock_held_ns
            .fetch_add(held, std::sync::atomic::Ordering::Relaxed);
        for crd in pending {
            shared.schedule_establish(crd);
        }
        result?
    };
    Ok(value_response(result.code, &result.body, &result.warnings))
}

fn update(
    state: &mut State,
    req: &WriteReq,
    name: &str,
    mut obj: Value,
) -> Result<Written, ApiError> {
    let def = req.def;
    check_type_meta(def, &mut obj)?;
    let body_name = meta_str(&obj, "name").unwrap_or("");
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if def.namespaced
        && let Some(ns) = meta_str(&obj, "namespace")
        && !ns.is_empty()
        && ns != req.namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let rv = meta_str(&obj, "resourceVersion").unwrap_or("").to_string();
    let Some(old) = state.get(&def.storage, &(req.namespace.to_string(), name.to_string())) else {
        if def.create_on_update && req.subresource.is_empty() {
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            return ops::create(state, req, obj, Ownership::Update);
        }
        return Err(ApiError::not_found(def, name));
    };
    if rv.is_empty() && !def.unconditional_update {
        return Err(ApiError::invalid(
            def,
            name,
            &[super::error::Cause::invalid(
                "metadata.resourceVersion",
                &json!("0x0"),
                "must be specified for an update",
            )],
        ));
    }
    ops::finish_update(state, req, &old, obj, Ownership::Update)
}

/// The query parameters that only matter to server-side apply.
struct ApplyOptions {
    force: bool,
    /// `fieldManager` was passed explicitly, as apply requires.
    manager_given: bool,
}

fn patch(
    state: &mut State,
    req: &WriteReq,
    name: &str,
    content_type: &str,
    body: &[u8],
    options: ApplyOptions,
) -> Result<Written, ApiError> {
    let ApplyOptions {
        force,
        manager_given,
    } = options;
    let def = req.def;
    let key = (req.namespace.to_string(), name.to_string());
    if force && content_type != "application/apply-patch+yaml" {
        return Err(ApiError::invalid_options(
            "PatchOptions",
            &[Cause::forbidden(
                "force",
                "may not be specified for non-apply patch",
            )],
        ));
    }
    let old = state.get(&def.storage, &key);
    let mut accepted = vec![
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/apply-patch+yaml",
    ];
    if def.behaviour != Behaviour::Custom {
        accepted.insert(2, "application/strategic-merge-patch+json");
    }
    if !accepted.contains(&content_type) {
        return Err(ApiError::unsupported_media_type(content_type, &accepted));
    }
    if content_type == "application/apply-patch+yaml" {
        if !manager_given {
            return Err(ApiError::invalid_options(
                "PatchOptions",
                &[Cause::required(
                    "fieldManager",
                    "is required for apply patch",
                )],
            ));
        }
        return apply(state, req, name, old, body, force);
    }
    let old = old.ok_or_else(|| ApiError::not_found(def, name))?;
    let mut obj = wire(def, &old);
    match content_type {
        "application/json-patch+json" => json_patch(&mut obj, body)?,
        _ => {
            let p: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            if !p.is_object() {
                return Err(ApiError::bad_request("patch body must be a JSON object"));
            }
            if content_type == "application/merge-patch+json" {
                merge_patch(&mut obj, &p);
            } else {
                strategic_merge(&mut obj, &p);
            }
        }
    }
    ops::finish_update(state, req, &old, obj, Ownership::Update)
}

fn apply(
    state: &mut State,
    req: &WriteReq,
    name: &str,
    old: Option<Arc<Stored>>,
    body: &[u8],
    force: bool,
) -> Result<Written, ApiError> {
    let def = req.def;
    let mut config: Value = serde_json::from_slice(body).or_else(|_| {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    })?;
    if config
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        || config
            .get("kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return Err(ApiError::bad_request(format!(
            "error decoding YAML: Object 'Kind' is missing in '{config}'"
        )));
    }
    check_type_meta(def, &mut config)?;
    if let Some(n) = meta_str(&config, "name")
        && !n.is_empty()
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let time = now();
    let api_version = def.api_version();
    let writer = Writer {
        manager: req.manager,
        subresource: req.subresource,
        api_version: &api_version,
        now: &time,
    };
    let types = Types {
        schema: def.schema.as_ref().map(|s| &s.root),
    };
    let scope = if req.subresource == "status" {
        Scope::Status
    } else if def.status {
        Scope::Main
    } else {
        Scope::All
    };
    let conflict = |c: fields::Conflicts| {
        let mut e = ApiError::new(409, "Conflict", c.message());
        e.details = Some(json!({"causes": c.causes()}));
        e
    };
    match old {
        None => {
            if !req.subresource.is_empty() {
                return Err(ApiError::not_found(def, name));
            }
            let mut live =
                json!({"apiVersion": api_version, "kind": def.kind, "metadata": {"name": name}});
            if def.namespaced {
                live["metadata"]["namespace"] = json!(req.namespace);
            }
            let (merged, entries) =
                fields::apply(&live, &config, vec![], &writer, force, &types, scope)
                    .map_err(conflict)?;
            ops::create(state, req, merged, Ownership::Preset(entries))
        }
        Some(old) => {
            if let Some(rv) = meta_str(&config, "resourceVersion")
                && !rv.is_empty()
                && rv != old.rv.to_string()
            {
                return Err(ApiError::stale(def, name));
            }
            let live = wire(def, &old);
            let (merged, entries) = fields::apply(
                &live,
                &config,
                fields::read_entries(&live),
                &writer,
                force,
                &types,
                scope,
            )
            .map_err(conflict)?;
            ops::finish_update(state, req, &old, merged, Ownership::Preset(entries))
        }
    }
}

fn delete_collection(
    state: &mut State,
    req: &WriteReq,
    query: &Query,
) -> Result<Written, ApiError> {
    let def = req.def;
    let filter = Filter::parse(def, req.namespace.to_string(), query)?;
    let keys: Vec<Key> = state
        .storages
        .get(&def.storage)
        .map(|s| {
            s.objects
                .values()
                .filter(|o| filter.matches(o))
                .map(|o| o.key())
                .collect()
        })
        .unwrap_or_default();
    let mut items = Vec::new();
    for (ns, name) in keys {
        let one = WriteReq {
            namespace: &ns,
            ..*req
        };
        let before = state
            .get(&def.storage, &(ns.clone(), name.clone()))
            .map(|s| wire(def, &s));
        ops::delete(state, &one, &name, &json!({}))?;
        items.extend(before);
    }
    let body = json!({"kind": def.list_kind, "apiVersion": def.api_version(),
                      "metadata": {"resourceVersion": state.rv.to_string()}, "items": items});
    Ok(Written {
        code: 200,
        body,
        warnings: vec![],
    })
}

/// TokenReview and SubjectAccessReview answers from the tokens and grants tests registered.
fn review(state: &State, def: &ResourceDef, mut obj: Value) -> Result<Value, ApiError> {
    check_type_meta(def, &mut obj)?;
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let status = match def.behaviour {
        Behaviour::TokenReview => {
            let token = spec.get("token").and_then(Value::as_str).unwrap_or("");
            match state.tokens.get(token) {
                Some(user) => {
                    let audiences = spec.get("audiences").cloned().unwrap_or(json!([]));
                    json!({"authenticated": true, "user": user, "audiences": audiences})
                }
                None => json!({"user": {}, "error": "invalid bearer token"}),
            }
        }
        _ => {
            let user = spec.get("user").and_then(Value::as_str).unwrap_or("");
            let groups: Vec<&str> = spec
                .get("groups")
                .and_then(Value::as_array)
                .map(|g| g.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let allowed = spec.get("resourceAttributes").is_some_and(|attrs| {
                let a = |k: &str| attrs.get(k).and_then(Value::as_str).unwrap_or("");
                let resource = if a("subresource").is_empty() {
                    a("resource").to_string()
                } else {
                    format!("{}/{}", a("resource"), a("subresource"))
                };
                state.rules.iter().any(|r| {
                    (r.user == user || groups.contains(&r.user.as_str()))
                        && (r.verb == "*" || r.verb == a("verb"))
                        && (r.group == "*" || r.group == a("group"))
                        && (r.resource == "*" || r.resource == resource)
                        && r.namespace.as_deref().is_none_or(|ns| ns == a("namespace"))
                })
            });
            if allowed {
                json!({"allowed": true, "reason": "allowed by a rule the test registered"})
            } else {
                json!({"allowed": false})
            }
        }
    };
    let mut out = obj;
    out["metadata"] = json!({"creationTimestamp": null});
    out["status"] = status;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let Route::Resource(rp) = route("/api/v1/namespaces/ns1/secrets/s1") else {
            panic!()
        };
        assert_eq!(
            (
                rp.plural.as_str(),
                rp.namespace.as_deref(),
                rp.name.as_deref()
            ),
            ("secrets", Some("ns1"), Some("s1"))
        );
        let Route::Resource(rp) = route("/api/v1/namespaces/ns1/status") else {
            panic!()
        };
        assert_eq!(
            (
                rp.plural.as_str(),
                rp.name.as_deref(),
                rp.subresource.as_deref()
            ),
            ("namespaces", Some("ns1"), Some("status"))
        );
        let Route::Resource(rp) =
            route("/apis/appconn.io/v1alpha1/namespaces/a/appconnections/x/status")
        else {
            panic!()
        };
        assert_eq!(
            (rp.group.as_str(), rp.subresource.as_deref()),
            ("appconn.io", Some("status"))
        );
        let Route::Resource(rp) = route("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        else {
            panic!()
        };
        assert_eq!(
            (rp.plural.as_str(), rp.namespace),
            ("customresourcedefinitions", None)
        );
        assert!(matches!(route("/apis/g.io/v1"), Route::GroupVersion(..)));
    }

    #[test]
    fn accept_negotiation() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(negotiate(&HeaderMap::new(), true).unwrap(), Mode::Full);
        assert_eq!(
            negotiate(
                &h("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
                true
            )
            .unwrap(),
            Mode::Metadata
        );
        assert!(
            negotiate(
                &h("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
                false
            )
            .is_err()
        );
        assert_eq!(
            negotiate(
                &h("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
                true
            )
            .unwrap(),
            Mode::Table("v1")
        );
        assert_eq!(
            negotiate(
                &h("application/vnd.kubernetes.protobuf,application/json"),
                false
            )
            .unwrap(),
            Mode::Full
        );
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key = ("ns".to_string(), "name".to_string());
        assert_eq!(
            parse_continue(&continue_token(42, &key)).unwrap(),
            (42, key)
        );
        assert!(parse_continue("garbage").is_err());
    }
}

#[cfg(test)]
mod counters {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    use kube::api::{ListParams, Patch, PatchParams, PostParams};

    use crate::apiserver::TestApiServer;

    #[tokio::test]
    async fn stored_writes_count_their_time_under_the_lock_and_reads_do_not() {
        let server = TestApiServer::start().await;
        let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
        let before = server.write_lock_held();
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "held"}, "data": {"k": "v"}
        }))
        .unwrap();
        api.create(&PostParams::default(), &cm).await.unwrap();
        let after_write = server.write_lock_held();
        assert!(after_write > before, "{after_write:?} after a create");
        api.get("held").await.unwrap();
        api.list(&Default::default()).await.unwrap();
        assert_eq!(
            server.write_lock_held(),
            after_write,
            "reads are not writes"
        );
    }

    #[tokio::test]
    async fn metrics_count_requests_with_the_real_servers_labels() {
        let server = TestApiServer::start().await;
        let client = server.client();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "counted"}, "data": {"k": "v"}
        }))
        .unwrap();
        api.create(&PostParams::default(), &cm).await.unwrap();
        api.get("counted").await.unwrap();
        api.get("counted").await.unwrap();
        assert!(api.get("missing").await.is_err());
        api.list(&ListParams::default()).await.unwrap();
        Api::<ConfigMap>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let merge = serde_json::json!({"data": {"k": "w"}});
        api.patch("counted", &PatchParams::default(), &Patch::Merge(&merge))
            .await
            .unwrap();
        let applied = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "counted"}, "data": {"other": "x"}
        });
        api.patch(
            "counted",
            &PatchParams::apply("counter-test"),
            &Patch::Apply(&applied),
        )
        .await
        .unwrap();

        let request = axum::http::Request::get("/metrics")
            .body(Vec::new())
            .unwrap();
        let text = client.request_text(request).await.unwrap();
        assert!(
            text.contains("# TYPE apiserver_request_total counter"),
            "{text}"
        );
        let series = |code: u16, scope: &str, verb: &str| {
            format!(
                "apiserver_request_total{{code=\"{code}\",component=\"apiserver\",dry_run=\"\",\
                 group=\"\",resource=\"configmaps\",scope=\"{scope}\",subresource=\"\",\
                 verb=\"{verb}\",version=\"v1\"}}"
            )
        };
        for (line, count) in [
            (series(201, "resource", "POST"), 1),
            (series(200, "resource", "GET"), 2),
            (series(404, "resource", "GET"), 1),
            (series(200, "namespace", "LIST"), 1),
            (series(200, "cluster", "LIST"), 1),
            (series(200, "resource", "PATCH"), 1),
            (series(200, "resource", "APPLY"), 1),
        ] {
            assert!(
                text.lines().any(|l| l == format!("{line} {count}")),
                "{line} {count} in\n{text}"
            );
        }
    }
}
