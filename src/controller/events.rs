//! Events on the operator's objects (`events.k8s.io/v1`), with the same series as
//! kube-runtime's recorder: the same event about the same object again within six minutes is
//! counted on the first one (a patch of its `series`) instead of piling up as new Events.
//!
//! kube-runtime's recorder keeps every Event it sent, whole, for those six minutes and scans
//! them all on every publish under one lock: at 10,000 new connections, some 20 MiB held and
//! 10,000 scans of up to 10,000 entries. Here an Event is remembered by a hash of what makes it
//! the same and its name, and old entries are swept once a minute.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};
use serde_json::json;

/// How long a repeat of an Event is counted on it rather than sent anew.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// How often entries older than the window are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    recent: Arc<Mutex<Recent>>,
}

struct Recent {
    /// Hash of (type, action, reason, regarding, related) -> the Event sent for it.
    sent: HashMap<u64, Sent>,
    swept: Instant,
}

struct Sent {
    name: String,
    count: i32,
    last: Instant,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Recorder {
        Recorder {
            client,
            reporter,
            recent: Arc::new(Mutex::new(Recent {
                sent: HashMap::new(),
                swept: Instant::now(),
            })),
        }
    }

    /// Records `event` about `regarding`: a new Event, or the next count of the same one sent
    /// within the window. Events about a cluster-scoped object go to `default`.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = self.key(event, regarding);
        let repeat = {
            let mut recent = self.recent.lock().expect("events lock");
            if recent.swept.elapsed() >= SWEEP_EVERY {
                recent.sent.retain(|_, s| s.last.elapsed() < SERIES_WINDOW);
                recent.swept = Instant::now();
            }
            recent
                .sent
                .get(&key)
                .filter(|s| s.last.elapsed() < SERIES_WINDOW)
                .map(|s| (s.name.clone(), s.count + 1))
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let now = jiff::Timestamp::now();
        let sent = match repeat {
            Some((name, count)) => {
                let series =
                    json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
                match events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(series))
                    .await
                {
                    Ok(_) => Some((name, count)),
                    // Gone meanwhile (an Event's time to live is short): a new one.
                    Err(kube::Error::Api(s)) if s.code == 404 => None,
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        let (name, count) = match sent {
            Some(sent) => sent,
            None => {
                let created = self.event(event, regarding, namespace, now);
                let name = created.metadata.name.clone().unwrap_or_default();
                events.create(&PostParams::default(), &created).await?;
                (name, 1)
            }
        };
        self.recent.lock().expect("events lock").sent.insert(
            key,
            Sent {
                name,
                count,
                last: Instant::now(),
            },
        );
        Ok(())
    }

    /// What makes two Events the same: as kube-runtime's recorder, not the note.
    fn key(&self, event: &Event, regarding: &ObjectReference) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        matches!(event.type_, EventType::Warning).hash(&mut hasher);
        event.action.hash(&mut hasher);
        event.reason.hash(&mut hasher);
        for reference in std::iter::once(regarding).chain(event.secondary.as_ref()) {
            (
                &reference.api_version,
                &reference.kind,
                &reference.namespace,
                &reference.name,
                &reference.uid,
                &reference.field_path,
                &reference.resource_version,
            )
                .hash(&mut hasher);
        }
        hasher.finish()
    }

    fn event(
        &self,
        event: &Event,
        regarding: &ObjectReference,
        namespace: &str,
        now: jiff::Timestamp,
    ) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use appconn_testkit::apiserver::TestApiServer;
    use kube::api::ListParams;

    use super::*;

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }

    fn about(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("appconn.io/v1alpha1".into()),
            kind: Some("AppConnection".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn recorder(server: &TestApiServer) -> Recorder {
        let reporter = Reporter {
            controller: "appconn".into(),
            instance: None,
        };
        Recorder::new(server.client(), reporter)
    }

    #[tokio::test]
    async fn a_repeat_is_counted_on_the_first_event_and_others_are_new() {
        let server = TestApiServer::start().await;
        let recorder = recorder(&server);
        for (reason, note, name) in [
            ("SecretNotFound", "first", "a"),
            ("SecretNotFound", "again", "a"),
            ("SecretNotFound", "third", "a"),
            ("SecretNotFound", "first", "b"),
            ("BackendUnavailable", "x", "a"),
        ] {
            recorder
                .publish(&event(reason, note), &about(name))
                .await
                .unwrap();
        }

        let events: Api<K8sEvent> = Api::namespaced(server.client(), "default");
        let mut listed: Vec<_> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                (
                    e.regarding.and_then(|r| r.name).unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                    e.series.map(|s| s.count),
                    e.reporting_controller.unwrap_or_default(),
                )
            })
            .collect();
        listed.sort();
        let row = |name: &str, reason: &str, note: &str, count: Option<i32>| {
            (
                name.into(),
                reason.into(),
                note.into(),
                count,
                "appconn".to_string(),
            )
        };
        assert_eq!(
            listed,
            [
                row("a", "BackendUnavailable", "x", None),
                row("a", "SecretNotFound", "first", Some(3)),
                row("b", "SecretNotFound", "first", None),
            ]
        );
        let writes = server
            .requests()
            .into_iter()
            .filter(|r| r.resource == "events" && r.verb != "list")
            .map(|r| r.verb)
            .collect::<Vec<_>>();
        assert_eq!(writes, ["create", "patch", "patch", "create", "create"]);
        assert_eq!(recorder.recent.lock().unwrap().sent.len(), 3);
    }

    #[tokio::test]
    async fn an_event_deleted_meanwhile_is_sent_anew() {
        let server = TestApiServer::start().await;
        let recorder = recorder(&server);
        let a = about("a");
        recorder
            .publish(&event("SecretNotFound", "one"), &a)
            .await
            .unwrap();
        let events: Api<K8sEvent> = Api::namespaced(server.client(), "default");
        events
            .delete_collection(&Default::default(), &ListParams::default())
            .await
            .unwrap();
        recorder
            .publish(&event("SecretNotFound", "two"), &a)
            .await
            .unwrap();
        let notes: Vec<_> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.note.unwrap_or_default(), e.series.map(|s| s.count)))
            .collect();
        assert_eq!(notes, [("two".to_string(), None)]);
    }
}
