//! Watch streams: newline-delimited JSON events over a chunked response, replayed from the
//! change history and then followed live, with bookmarks, timeouts and 410 Gone.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;
use super::error::{ApiError, Cause};
use super::handlers::{Filter, Mode, Query, json_response};
use super::meta::set_rv;
use super::ops::wire;
use super::resource::ResourceDef;
use super::store::{ChangeKind, Stored};
use super::table::{self, Include};

/// Changes taken from the history per lock acquisition.
const BATCH: usize = 512;
/// Flush the response chunk once it grows past this.
const CHUNK: usize = 64 * 1024;
/// Watches without `timeoutSeconds` end after this, like the server's request timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Params {
    filter: Filter,
    mode: Mode,
    include: Include,
    bookmarks: bool,
    deadline: Instant,
}

pub(crate) fn serve(
    shared: Arc<Shared>,
    def: Arc<ResourceDef>,
    namespace: String,
    query: &Query,
    mode: Mode,
) -> Result<Response, ApiError> {
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or("");
    let truthy = |k: &str| matches!(get(k), "true" | "1");
    let send_initial = truthy("sendInitialEvents");
    let bookmarks = truthy("allowWatchBookmarks");
    if send_initial && get("resourceVersionMatch") != "NotOlderThan" {
        return Err(ApiError::invalid_options(
            "ListOptions",
            &[Cause::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )],
        ));
    }
    if send_initial && !bookmarks {
        return Err(ApiError::invalid_options(
            "ListOptions",
            &[Cause::required(
                "allowWatchBookmarks",
                "allowWatchBookmarks must be set to true when sendInitialEvents is set",
            )],
        ));
    }
    let timeout = match get("timeoutSeconds") {
        "" => DEFAULT_TIMEOUT,
        t => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request("invalid timeoutSeconds"))?,
        ),
    };
    let params = Params {
        filter: Filter::parse(&def, namespace, query)?,
        mode,
        include: Include::parse(query.get("includeObject").map(String::as_str)),
        bookmarks,
        deadline: Instant::now() + timeout,
    };
    let rv = get("resourceVersion");
    let (initial, cursor, gone, notify) = {
        let state = shared.lock();
        let storage = state
            .storages
            .get(&def.storage)
            .ok_or_else(ApiError::unknown_resource)?;
        let notify = storage.notify.subscribe();
        if send_initial || rv.is_empty() || rv == "0" {
            let initial: Vec<Arc<Stored>> = storage
                .objects
                .values()
                .filter(|o| params.filter.matches(o))
                .cloned()
                .collect();
            (initial, state.rv, None, notify)
        } else {
            let from: u64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion: Invalid value: {rv:?}"))
            })?;
            let gone = (from < storage.window_start).then(|| {
                ApiError::gone(format!(
                    "too old resource version: {from} ({})",
                    storage.window_start
                ))
            });
            (Vec::new(), from, gone, notify)
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut stream = Stream {
            tx,
            buf: Vec::new(),
            def,
            params,
        };
        if let Some(err) = gone {
            stream.error(&err).await;
            return;
        }
        stream
            .run(shared, initial, cursor, send_initial, notify)
            .await;
    });
    let mut resp = json_response(200, Body::from_stream(ReceiverStream::new(rx)), &[]);
    resp.headers_mut()
        .remove(axum::http::header::CONTENT_LENGTH);
    Ok(resp)
}

struct Stream {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    def: Arc<ResourceDef>,
    params: Params,
}

impl Stream {
    fn object_bytes(&self, obj: &Stored) -> Bytes {
        match self.params.mode {
            Mode::Full if self.def.is_identity_view(&obj.api_version) => obj.json.clone(),
            Mode::Full => {
                Bytes::from(serde_json::to_vec(&wire(&self.def, obj)).unwrap_or_default())
            }
            Mode::Metadata => obj.metadata_json(),
            Mode::Table(v) => {
                let meta = json!({"resourceVersion": obj.rv.to_string()});
                let t = table::table(
                    &self.def,
                    v,
                    &[wire(&self.def, obj)],
                    meta,
                    self.params.include,
                );
                Bytes::from(serde_json::to_vec(&t).unwrap_or_default())
            }
        }
    }

    fn push(&mut self, kind: &str, object: &[u8]) {
        self.buf.extend_from_slice(b"{\"type\":\"");
        self.buf.extend_from_slice(kind.as_bytes());
        self.buf.extend_from_slice(b"\",\"object\":");
        self.buf.extend_from_slice(object);
        self.buf.extend_from_slice(b"}\n");
    }

    fn push_object(&mut self, kind: &str, obj: &Stored) {
        let bytes = self.object_bytes(obj);
        self.push(kind, &bytes);
    }

    fn push_bookmark(&mut self, rv: u64, initial_end: bool) {
        let (kind, api_version) = match self.params.mode {
            Mode::Metadata => (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            ),
            _ => (self.def.kind.clone(), self.def.api_version()),
        };
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": kind, "apiVersion": api_version, "metadata": meta});
        self.push("BOOKMARK", &serde_json::to_vec(&obj).unwrap_or_default());
    }

    /// Sends what is buffered; false once the client has gone.
    async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx.send(Ok(chunk)).await.is_ok()
    }

    async fn error(&mut self, err: &ApiError) {
        let status = serde_json::to_vec(&err.to_status()).unwrap_or_default();
        self.push("ERROR", &status);
        self.flush().await;
    }

    async fn run(
        &mut self,
        shared: Arc<Shared>,
        initial: Vec<Arc<Stored>>,
        mut cursor: u64,
        send_initial: bool,
        mut notify: tokio::sync::watch::Receiver<u64>,
    ) {
        let mut cut = shared.cut.subscribe();
        if *cut.borrow_and_update() == u64::MAX {
            return;
        }
        for obj in &initial {
            self.push_object("ADDED", obj);
            if self.buf.len() > CHUNK && !self.flush().await {
                return;
            }
        }
        if send_initial {
            self.push_bookmark(cursor, true);
        }
        if !self.flush().await {
            return;
        }
        let storage_id = self.def.storage.clone();
        loop {
            let next = {
                let state = shared.lock();
                match state.storages.get(&storage_id) {
                    None => None,
                    Some(storage) if cursor < storage.window_start => {
                        Some(Err(ApiError::gone(format!(
                            "too old resource version: {cursor} ({})",
                            storage.window_start
                        ))))
                    }
                    Some(storage) => {
                        notify.borrow_and_update();
                        let start = storage.first_after(cursor);
                        let batch: Vec<_> = storage
                            .history
                            .range(start..)
                            .take(BATCH)
                            .cloned()
                            .collect();
                        cursor = match batch.last() {
                            Some(last) if batch.len() == BATCH => last.rv,
                            _ => cursor.max(state.rv),
                        };
                        Some(Ok(batch))
                    }
                }
            };
            let batch = match next {
                None => return,
                Some(Err(gone)) => {
                    self.error(&gone).await;
                    return;
                }
                Some(Ok(batch)) => batch,
            };
            for change in &batch {
                let now = self.params.filter.matches(&change.obj);
                let before = change
                    .prev
                    .as_ref()
                    .is_some_and(|p| self.params.filter.matches(p));
                match (change.kind, before, now) {
                    (ChangeKind::Added, _, true) => self.push_object("ADDED", &change.obj),
                    (ChangeKind::Modified, true, true) => self.push_object("MODIFIED", &change.obj),
                    (ChangeKind::Modified, false, true) => self.push_object("ADDED", &change.obj),
                    (ChangeKind::Modified, true, false) => {
                        let prev = change.prev.as_ref().expect("matched a previous version");
                        let mut v: Value = prev.value();
                        set_rv(&mut v, change.rv);
                        let gone = Stored::new(&v, change.rv, &[]);
                        self.push_object("DELETED", &gone);
                    }
                    (ChangeKind::Deleted, true, _) => self.push_object("DELETED", &change.obj),
                    _ => {}
                }
                if self.buf.len() > CHUNK && !self.flush().await {
                    return;
                }
            }
            if !self.flush().await {
                return;
            }
            if !batch.is_empty() {
                continue;
            }
            let interval = shared.bookmark_interval();
            tokio::select! {
                changed = notify.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = cut.changed() => return,
                _ = sleep_until(self.params.deadline) => return,
                _ = self.tx.closed() => return,
                _ = sleep(interval), if self.params.bookmarks => {
                    self.push_bookmark(cursor, false);
                    if !self.flush().await {
                        return;
                    }
                }
            }
        }
    }
}
