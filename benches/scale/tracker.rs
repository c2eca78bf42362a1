//! The driver's own watch of the benchmark's AppConnections: how many are Ready, and each
//! one's `status.version`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appconn::crd::AppConnection;
use futures::StreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, oneshot};

/// What the driver's own watch of the AppConnections has seen.
#[derive(Default)]
pub struct Seen {
    /// How many are Ready now.
    pub ready: usize,
    /// name -> Ready
    readiness: HashMap<String, bool>,
    /// name -> status.version
    pub versions: HashMap<String, i64>,
    /// When the first change after the initial list was seen.
    pub first_change: Option<Instant>,
}

pub struct Tracker {
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Tracker {
    /// Watches the benchmark namespace's AppConnections; returns once the watch has listed.
    pub async fn start(client: &Client, namespace: &str) -> Tracker {
        let api: Api<AppConnection> = Api::namespaced(client.clone(), namespace);
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let (listed_tx, listed_rx) = oneshot::channel::<()>();
        let task = {
            let seen = seen.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut listed = Some(listed_tx);
                let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
                while let Some(event) = events.next().await {
                    let (conn, change) = match event {
                        Ok(watcher::Event::Apply(c)) => (c, true),
                        Ok(watcher::Event::InitApply(c)) => (c, false),
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = listed.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    let name = conn.name_any();
                    let status = conn.status.as_ref();
                    let ready = status.is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                    let version = status.and_then(|s| s.version).unwrap_or(0);
                    let mut seen = seen.lock().expect("tracker lock");
                    if change {
                        seen.first_change.get_or_insert_with(Instant::now);
                    }
                    let was = seen.readiness.insert(name.clone(), ready).unwrap_or(false);
                    match (was, ready) {
                        (false, true) => seen.ready += 1,
                        (true, false) => seen.ready -= 1,
                        _ => {}
                    }
                    seen.versions.insert(name, version);
                    drop(seen);
                    changed.notify_waiters();
                }
            })
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), listed_rx).await;
        Tracker {
            seen,
            changed,
            task,
        }
    }

    /// When the watch first saw a change after its initial list.
    pub fn first_change(&self) -> Option<Instant> {
        self.seen.lock().expect("tracker lock").first_change
    }

    pub fn ready(&self) -> usize {
        self.seen.lock().expect("tracker lock").ready
    }

    /// The last `status.version` seen for a connection (0 before any).
    pub fn version(&self, name: &str) -> i64 {
        let seen = self.seen.lock().expect("tracker lock");
        seen.versions.get(name).copied().unwrap_or(0)
    }

    /// Waits until `done` holds for what the watch has seen; false on timeout.
    pub async fn wait(&self, timeout: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(&self.seen.lock().expect("tracker lock")) {
                return true;
            }
            // Bounded waits: a notification between the check and the wait is not lost for long.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            let _ = tokio::time::timeout_at(wake, notified).await;
            if tokio::time::Instant::now() >= deadline {
                return done(&self.seen.lock().expect("tracker lock"));
            }
        }
    }

    pub fn stop(self) {
        self.task.abort();
    }
}
