//! The controller's environment: the Kubernetes API.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType as KubeEventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;

use super::{Context, written};
use crate::backend::Backend;
use crate::crd::{AppConnection, AppConnectionStatus, CREATE_PENDING, FIELD_MANAGER, FINALIZER};
use crate::kube_error::describe;
use crate::reconcile::resolve::SecretData;
use crate::reconcile::{BackendInfo, BackendLookupError, EnvError, Environment, Event, EventType};

pub struct KubeEnv {
    pub ctx: Arc<Context>,
    /// The Secrets this reconcile read, at the versions read (None: missing).
    read: Mutex<Vec<(String, Option<String>)>>,
}

impl KubeEnv {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            read: Mutex::new(Vec::new()),
        }
    }

    /// The Secrets the reconcile read and their versions.
    pub fn secrets_read(&self) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut *self.read.lock().expect("read lock"))
    }

    /// A JSON patch of the resource; the result is remembered as the latest known version.
    async fn patch_json(
        &self,
        conn: &AppConnection,
        ops: serde_json::Value,
    ) -> Result<(), kube::Error> {
        let patch: json_patch::Patch = serde_json::from_value(ops).expect("valid JSON patch");
        self.patch(
            conn,
            None,
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    }

    /// Patches the resource (or its `subresource`) and remembers the version written.
    async fn patch<P: Serialize + Debug>(
        &self,
        conn: &AppConnection,
        subresource: Option<&str>,
        params: &PatchParams,
        patch: &Patch<P>,
    ) -> Result<(), kube::Error> {
        let written = written::patch(&self.ctx.client, conn, subresource, params, patch).await?;
        if let Some((uid, rv)) = written {
            self.ctx.wrote(Some(conn), uid, rv);
        }
        Ok(())
    }
}

/// A Secret's data and its resourceVersion, read from the API (never cached).
pub(super) async fn read_secret_version(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<(SecretData, Option<String>)>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(name).await?;
    Ok(secret.map(|s| {
        let version = s.resource_version();
        let data = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        (data, version)
    }))
}

fn env_error(what: &str, conn: &AppConnection, e: kube::Error) -> EnvError {
    EnvError::new(format!("{what} {}", conn.name_any()), describe(&e), e)
}

#[async_trait]
impl Environment for KubeEnv {
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, EnvError> {
        match read_secret_version(&self.ctx.client, namespace, name).await {
            Ok(found) => {
                let version = found.as_ref().and_then(|(_, v)| v.clone());
                if let Some(version) = &version {
                    self.ctx.secrets.read(namespace, name, version);
                }
                self.read
                    .lock()
                    .expect("read lock")
                    .push((name.to_string(), version));
                Ok(found.map(|(data, _)| data))
            }
            Err(e) => Err(EnvError::new(
                format!("reading Secret {namespace}/{name}"),
                describe(&e),
                e,
            )),
        }
    }

    async fn backend(
        &self,
        conn: &AppConnection,
    ) -> Result<(Arc<dyn Backend>, BackendInfo), BackendLookupError> {
        self.ctx.registry.lookup(conn).await
    }

    async fn mark(&self, conn: &AppConnection, create_pending: bool) -> Result<(), EnvError> {
        let finalizers = conn.finalizers();
        let has_finalizer = finalizers.iter().any(|f| f == FINALIZER);
        let has_mark = conn.annotations().contains_key(CREATE_PENDING);
        if has_finalizer && (has_mark || !create_pending) {
            return Ok(());
        }
        // Appending to an existing list or map cannot lose anyone's entry; creating the whole
        // list or map could, so then the patch is guarded by the resourceVersion (a concurrent
        // change makes it fail and the reconcile is retried).
        let mut ops = Vec::new();
        let mut guard = false;
        if !has_finalizer {
            if conn.meta().finalizers.is_none() {
                guard = true;
                ops.push(
                    json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
                );
            } else {
                ops.push(
                    json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}),
                );
            }
        }
        if create_pending && !has_mark {
            if conn.meta().annotations.is_none() {
                guard = true;
                ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {CREATE_PENDING: "true"}}));
            } else {
                ops.push(json!({"op": "add", "path": "/metadata/annotations/appconn.io~1create-pending", "value": "true"}));
            }
        }
        if guard {
            let test = json!({"op": "test", "path": "/metadata/resourceVersion", "value": conn.resource_version()});
            ops.insert(0, test);
        }
        self.patch_json(conn, json!(ops))
            .await
            .map_err(|e| env_error("marking", conn, e))
    }

    async fn latest(&self, conn: &AppConnection) -> Result<Option<AppConnection>, EnvError> {
        // The controller already re-reads a copy older than what this process wrote or read;
        // the copy it hands over is the latest known, so no second read is needed here.
        self.ctx.latest(conn).await
    }

    async fn clear_pending(&self, conn: &AppConnection) -> Result<(), EnvError> {
        let ops = json!([
            {"op": "test", "path": "/metadata/annotations/appconn.io~1create-pending", "value": "true"},
            {"op": "remove", "path": "/metadata/annotations/appconn.io~1create-pending"},
        ]);
        match self.patch_json(conn, ops).await {
            Ok(()) => Ok(()),
            // Already gone (or the object is): nothing to clear.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 422 => Ok(()),
            Err(e) => Err(env_error("clearing the create-pending mark of", conn, e)),
        }
    }

    async fn release(&self, conn: &AppConnection) -> Result<(), EnvError> {
        let Some(index) = conn.finalizers().iter().position(|f| f == FINALIZER) else {
            return Ok(());
        };
        let ops = json!([
            {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
        ]);
        match self.patch_json(conn, ops).await {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(env_error("removing the finalizer of", conn, e)),
        }
    }

    async fn write_status(
        &self,
        conn: &AppConnection,
        status: &AppConnectionStatus,
    ) -> Result<(), EnvError> {
        let body = json!({
            "apiVersion": "appconn.io/v1alpha1",
            "kind": "AppConnection",
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.patch(conn, Some("status"), &params, &Patch::Apply(body))
            .await
            .map_err(|e| env_error("writing the status of", conn, e))
    }

    async fn event(&self, conn: &AppConnection, event: Event) {
        let event = KubeEvent {
            type_: match event.type_ {
                EventType::Normal => KubeEventType::Normal,
                EventType::Warning => KubeEventType::Warning,
            },
            reason: event.reason.to_string(),
            note: Some(event.note),
            action: event.action.to_string(),
            secondary: None,
        };
        // Without the resourceVersion, a repeated Event about the same object is counted in
        // one series instead of piling up as new Event objects.
        let mut regarding = conn.object_ref(&());
        regarding.resource_version = None;
        if let Err(e) = self.ctx.recorder.publish(&event, &regarding).await {
            tracing::warn!(error = %describe(&e), "cannot record an Event");
        }
    }
}
