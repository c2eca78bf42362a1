//! `GET /metrics`: the request counter a real kube-apiserver exports, `apiserver_request_total`,
//! with the labels it gives them, so that tools that read a cluster's own counts (the scale
//! benchmark with `--kubeconfig`) can be run against this server too.
//!
//! Labels as the real server sets them: `verb` is the HTTP method with GET split into GET and
//! LIST by scope, WATCH for watches and APPLY for server-side apply patches; `scope` is
//! `resource` for a named object or a create, `namespace` for a namespaced collection and
//! `cluster` otherwise; `code` is the response's status. One difference: a watch is counted when
//! its response starts, where the real server counts it when the watch ends.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::http::{HeaderMap, header};

use super::handlers::ResourcePath;

/// The labels of one series, `code` aside.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RequestLabels {
    verb: &'static str,
    group: String,
    version: String,
    resource: String,
    subresource: String,
    scope: &'static str,
    dry_run: bool,
}

impl RequestLabels {
    /// `verb` as the handlers name it (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`, or empty for a method they do not serve).
    pub(crate) fn new(
        verb: &str,
        rp: &ResourcePath,
        headers: &HeaderMap,
        dry_run: bool,
    ) -> RequestLabels {
        let apply = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct == "application/apply-patch+yaml");
        let verb = match verb {
            "get" => "GET",
            "list" => "LIST",
            "watch" => "WATCH",
            "create" => "POST",
            "update" => "PUT",
            "patch" if apply => "APPLY",
            "patch" => "PATCH",
            "delete" => "DELETE",
            "deletecollection" => "DELETECOLLECTION",
            _ => "other",
        };
        let scope = if rp.name.is_some() || verb == "POST" {
            "resource"
        } else if rp.namespace.is_some() {
            "namespace"
        } else {
            "cluster"
        };
        RequestLabels {
            verb,
            group: rp.group.clone(),
            version: rp.version.clone(),
            resource: rp.plural.clone(),
            subresource: rp.subresource.clone().unwrap_or_default(),
            scope,
            dry_run,
        }
    }

    /// `(verb, resource)`, the resource with its subresource as `plural/subresource`.
    pub(crate) fn series(&self) -> (String, String) {
        let resource = if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        (self.verb.to_string(), resource)
    }
}

/// Counts by labels and response code.
pub(crate) type RequestTotals = BTreeMap<(RequestLabels, u16), u64>;

/// The Prometheus text exposition of `totals`.
pub(crate) fn render(totals: &RequestTotals) -> String {
    let mut out = String::from(
        "# HELP apiserver_request_total Counter of apiserver requests broken out by verb, dry \
         run value, group, version, resource, scope, component and HTTP response code.\n\
         # TYPE apiserver_request_total counter\n",
    );
    for ((l, code), count) in totals {
        let _ = writeln!(
            out,
            "apiserver_request_total{{code=\"{code}\",component=\"apiserver\",dry_run=\"{}\",\
             group=\"{}\",resource=\"{}\",scope=\"{}\",subresource=\"{}\",verb=\"{}\",\
             version=\"{}\"}} {count}",
            if l.dry_run { "All" } else { "" },
            l.group,
            l.resource,
            l.scope,
            l.subresource,
            l.verb,
            l.version,
        );
    }
    out
}
