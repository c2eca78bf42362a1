//! Writes whose response the controller reads only for the version it made.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};

/// Patches `resource` (or its `subresource`) and returns the uid and resourceVersion written.
/// The rest of the response is skipped as it is read, never built: the watch brings the object.
pub(super) async fn patch<K, P>(
    client: &Client,
    resource: &K,
    subresource: Option<&str>,
    params: &PatchParams,
    patch: &Patch<P>,
) -> Result<Option<(String, String)>, kube::Error>
where
    K: Resource<DynamicType = ()>,
    P: Serialize + Debug,
{
    let request = kube::core::Request::new(K::url_path(&(), resource.namespace().as_deref()));
    let name = resource.name_any();
    let (request, verb) = match subresource {
        Some(sub) => (
            request.patch_subresource(sub, &name, params, patch),
            "patch_subresource",
        ),
        None => (request.patch(&name, params, patch), "patch"),
    };
    let mut request = request.map_err(kube::Error::BuildRequest)?;
    // The name kube's own Api gives the request (its tracing reads it).
    request.extensions_mut().insert(verb);
    let written: Written = client.request(request).await?;
    Ok(written.metadata.uid.zip(written.metadata.resource_version))
}

/// What is kept of a written object: its identity and the version written.
#[derive(Deserialize)]
struct Written {
    metadata: WrittenMeta,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WrittenMeta {
    uid: Option<String>,
    resource_version: Option<String>,
}
