//! Commits to the operator's SQLite store, watched from outside the operator.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::oneshot;

/// Commits to the store by any other connection, seen through SQLite's `data_version`, which
/// changes whenever another connection commits; polled often, so the count is a lower bound
/// and zero means none. The fingerprint also catches a change between two polls.
pub struct StoreCommits {
    commits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<SqliteConnection>,
    stop: oneshot::Sender<()>,
    reader: tokio::sync::Mutex<SqliteConnection>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fingerprint {
    pub commits: u64,
    rows: i64,
    versions: i64,
    state_rows: i64,
}

impl StoreCommits {
    pub async fn start(path: &Path) -> StoreCommits {
        let options = SqliteConnectOptions::new().filename(path).read_only(true);
        let mut poller = SqliteConnection::connect_with(&options)
            .await
            .expect("opening the store read-only");
        let reader = SqliteConnection::connect_with(&options)
            .await
            .expect("opening the store read-only");
        let commits = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let counted = commits.clone();
        let task = tokio::spawn(async move {
            let mut last: Option<i64> = None;
            loop {
                let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                    .fetch_one(&mut poller)
                    .await
                    .expect("reading data_version");
                if last.is_some_and(|l| l != version) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                last = Some(version);
                tokio::select! {
                    _ = &mut stopped => return poller,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        });
        StoreCommits {
            commits,
            task,
            stop,
            reader: tokio::sync::Mutex::new(reader),
        }
    }

    pub async fn fingerprint(&self) -> Fingerprint {
        let mut reader = self.reader.lock().await;
        let (rows, versions): (i64, i64) =
            sqlx::query_as("SELECT count(*), coalesce(sum(version), 0) FROM connections")
                .fetch_one(&mut *reader)
                .await
                .expect("reading the store");
        let state_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM state")
            .fetch_one(&mut *reader)
            .await
            .expect("reading the store");
        Fingerprint {
            commits: self.commits.load(Ordering::Relaxed),
            rows,
            versions,
            state_rows,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        if let Ok(poller) = self.task.await {
            let _ = poller.close().await;
        }
        let _ = self.reader.into_inner().close().await;
    }
}
