//! The benchmark's objects, made the way users make them: `kubectl apply` (client-side, with
//! the last-applied annotation holding the whole object), server-side apply (managedFields),
//! and Helm-style labels and annotations.

use std::time::{Duration, Instant};

use appconn::crd::AppConnection;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    /// Created by a program with just a name.
    Plain,
    /// `kubectl apply` (client-side): labels and the last-applied annotation.
    Kubectl,
    /// `kubectl apply --server-side`: labels, and managedFields listing every field.
    ServerSide,
    /// `helm install`: Helm's labels and release annotations.
    Helm,
    /// A third each of kubectl, server-side apply and Helm.
    Mixed,
}

impl Style {
    pub fn parse(text: &str) -> Option<Style> {
        Some(match text {
            "plain" => Style::Plain,
            "kubectl" => Style::Kubectl,
            "server-side" => Style::ServerSide,
            "helm" => Style::Helm,
            "mixed" => Style::Mixed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Style::Plain => "plain",
            Style::Kubectl => "kubectl apply",
            Style::ServerSide => "server-side apply",
            Style::Helm => "Helm",
            Style::Mixed => "mixed (kubectl apply, server-side apply, Helm)",
        }
    }

    /// The style object `i` is made in.
    fn of(self, i: usize) -> Style {
        match self {
            Style::Mixed => [Style::Kubectl, Style::ServerSide, Style::Helm][i % 3],
            other => other,
        }
    }
}

/// The user's manifest of a Secret or an AppConnection, with the style's labels and
/// annotations.
fn manifest(style: Style, mut object: Value, namespace: &str) -> Value {
    let name = object["metadata"]["name"].clone();
    object["metadata"]["namespace"] = json!(namespace);
    match style {
        Style::Plain | Style::Mixed => {}
        Style::Kubectl | Style::ServerSide => {
            object["metadata"]["labels"] = json!({
                "app.kubernetes.io/name": "warehouse",
                "app.kubernetes.io/part-of": "analytics",
                "app.kubernetes.io/instance": name,
                "team": "data-platform",
                "environment": "production",
            });
        }
        Style::Helm => {
            object["metadata"]["labels"] = json!({
                "app.kubernetes.io/name": "warehouse",
                "app.kubernetes.io/instance": "analytics",
                "app.kubernetes.io/managed-by": "Helm",
                "app.kubernetes.io/version": "4.2.1",
                "helm.sh/chart": "analytics-connections-4.2.1",
            });
            object["metadata"]["annotations"] = json!({
                "meta.helm.sh/release-name": "analytics",
                "meta.helm.sh/release-namespace": namespace,
            });
        }
    }
    if style == Style::Kubectl {
        // kubectl records the applied manifest, compact, in the object itself.
        let applied = serde_json::to_string(&object).expect("JSON");
        object["metadata"]["annotations"] = json!({ LAST_APPLIED: format!("{applied}\n") });
    }
    object
}

fn secret_manifest(i: usize, password: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("s{i}")},
        "type": "Opaque",
        "data": {
            "username": base64(b"app"),
            "password": base64(password.as_bytes()),
        },
    })
}

fn connection_manifest(i: usize) -> Value {
    json!({
        "apiVersion": "appconn.io/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": format!("c{i}")},
        "spec": {
            "app": "mssql",
            "method": "username-and-password",
            "description": format!("warehouse replica {i} for the analytics jobs"),
            "credentials": {
                "host": {"value": format!("sql-{}.analytics.internal", i % 50)},
                "port": {"value": 1433},
                "username": {"secretKeyRef": {"name": format!("s{i}"), "key": "username"}},
                "password": {"secretKeyRef": {"name": format!("s{i}"), "key": "password"}},
            }
        }
    })
}

/// Makes `object` in `style`: created with POST, or server-side applied as kubectl does.
async fn make(client: &Client, namespace: &str, style: Style, object: Value) -> kube::Result<()> {
    let object = manifest(style, object, namespace);
    let name = object["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    macro_rules! make_as {
        ($kind:ty) => {{
            let api: Api<$kind> = Api::namespaced(client.clone(), namespace);
            if style == Style::ServerSide {
                let params = PatchParams::apply("kubectl").force();
                api.patch(&name, &params, &Patch::Apply(&object)).await?;
            } else {
                let typed: $kind = serde_json::from_value(object).expect("a valid object");
                api.create(&PostParams::default(), &typed).await?;
            }
        }};
    }
    if object["kind"] == "Secret" {
        make_as!(Secret)
    } else {
        make_as!(AppConnection)
    }
    Ok(())
}

/// Makes objects `range` (Secrets `s{i}`, or AppConnections `c{i}` reading them), with
/// `concurrency` requests in flight; returns the time it took.
pub async fn create(
    client: &Client,
    namespace: &str,
    style: Style,
    kind: Kind,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> Duration {
    let started = Instant::now();
    stream::iter(range)
        .map(|i| {
            let object = match kind {
                Kind::Secret => secret_manifest(i, &format!("initial-{i}")),
                Kind::Connection => connection_manifest(i),
            };
            make(client, namespace, style.of(i), object)
        })
        .buffer_unordered(concurrency)
        .try_for_each(|()| async { Ok(()) })
        .await
        .unwrap_or_else(|e| panic!("creating {kind:?}s: {e}"));
    started.elapsed()
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Secret,
    Connection,
}

/// Changes Secret `s{i}`'s password with a merge patch.
pub async fn change_secret(client: &Client, namespace: &str, i: usize, password: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"data": {"password": base64(password.as_bytes())}});
    api.patch(
        &format!("s{i}"),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .expect("changing a Secret");
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
