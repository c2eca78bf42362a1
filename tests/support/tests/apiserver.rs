//! The test API server driven through the real `kube::Client` and kube-runtime.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use appconn_testkit::apiserver::{TestApiServer, UserInfo};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Secret};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::core::{GroupVersionKind, PartialObjectMeta, Status};
use kube::discovery::{ApiResource, Discovery};
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResource, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.appconn.io
spec:
  group: test.appconn.io
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
    categories: [appconn]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Ready
      type: string
      jsonPath: .status.conditions[?(@.type=="Ready")].status
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size:
                type: integer
                minimum: 0
                maximum: 10
              color:
                type: string
                maxLength: 16
                x-kubernetes-validations:
                - rule: self == oldSelf
                  message: color is immutable; delete and recreate
              value:
                x-kubernetes-int-or-string: true
              tags:
                type: array
                maxItems: 8
                items:
                  type: string
                  maxLength: 32
          status:
            type: object
            properties:
              observedGeneration:
                type: integer
              phase:
                type: string
              conditions:
                type: array
                maxItems: 8
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [type]
                items:
                  type: object
                  required: [type, status]
                  properties:
                    type:
                      type: string
                      maxLength: 64
                    status:
                      type: string
                      enum: ["True", "False", "Unknown"]
                    reason:
                      type: string
                      maxLength: 64
"#;

const GADGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.test.appconn.io
spec:
  group: test.appconn.io
  scope: Cluster
  names: {plural: gadgets, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "test.appconn.io",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wd"
)]
struct WidgetSpec {
    size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
struct WidgetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phase: Option<String>,
}

fn widget(name: &str, size: i64) -> Widget {
    let mut w = Widget::new(
        name,
        WidgetSpec {
            size,
            ..Default::default()
        },
    );
    w.metadata.namespace = Some("default".into());
    w
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "password".to_string(),
            "hunter2".to_string(),
        )])),
        ..Default::default()
    }
}

/// The Status a failed call carried.
fn api_error<T: Debug>(r: kube::Result<T>) -> Box<Status> {
    match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn install_crd(client: &Client, yaml: &str) -> CustomResourceDefinition {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).unwrap();
    let name = crd.name_any();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    tokio::time::timeout(
        WAIT,
        await_condition(crds.clone(), &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .unwrap();
    crds.get(&name).await.unwrap()
}

async fn started() -> (TestApiServer, Client) {
    let server = TestApiServer::start().await;
    let client = server.client();
    (server, client)
}

/// Waits for the first item the predicate accepts.
async fn next_where<S, T>(stream: &mut S, mut pred: impl FnMut(&T) -> bool) -> T
where
    S: Stream<Item = T> + Unpin,
    T: Debug,
{
    tokio::time::timeout(WAIT, async {
        loop {
            let item = stream.next().await.expect("stream ended early");
            if pred(&item) {
                return item;
            }
        }
    })
    .await
    .expect("expected item did not arrive in time")
}

#[tokio::test]
async fn secrets_crud_with_real_status_bodies() {
    let (server, client) = started().await;
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let created = secrets
        .create(&PostParams::default(), &secret("db", &[]))
        .await
        .unwrap();
    assert!(
        created.string_data.is_none(),
        "stringData is folded into data"
    );
    assert_eq!(created.data.as_ref().unwrap()["password"].0, b"hunter2");
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    let m = &created.metadata;
    assert!(m.uid.is_some() && m.creation_timestamp.is_some() && m.resource_version.is_some());
    assert!(
        m.generation.is_none(),
        "core kinds like Secret carry no generation"
    );
    assert!(m.managed_fields.as_ref().is_some_and(|f| !f.is_empty()));

    let dup = api_error(
        secrets
            .create(&PostParams::default(), &secret("db", &[]))
            .await,
    );
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(dup.message, "secrets \"db\" already exists");

    let missing = api_error(secrets.get("nope").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "secrets \"nope\" not found");

    let bad = api_error(
        secrets
            .create(&PostParams::default(), &secret("Bad_Name", &[]))
            .await,
    );
    assert_eq!((bad.code, bad.reason.as_str()), (422, "Invalid"));
    assert!(
        bad.message
            .starts_with("Secret \"Bad_Name\" is invalid: metadata.name: Invalid value")
    );

    let mut generated = secret("", &[]);
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let g = secrets
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(g.name_any().starts_with("gen-") && g.name_any().len() == 9);

    let mut stale = created.clone();
    stale.string_data = Some(BTreeMap::from([("password".into(), "x".into())]));
    secrets
        .replace("db", &PostParams::default(), &stale)
        .await
        .unwrap();
    let conflict = api_error(secrets.replace("db", &PostParams::default(), &stale).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        conflict.message,
        "Operation cannot be fulfilled on secrets \"db\": the object has been modified; please \
         apply your changes to the latest version and try again"
    );

    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    secrets.create(&dry, &secret("dry", &[])).await.unwrap();
    assert!(secrets.get_opt("dry").await.unwrap().is_none());

    let deleted = secrets
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        deleted.is_right(),
        "no finalizers: gone at once with a Status"
    );
    assert!(secrets.get_opt("db").await.unwrap().is_none());
    assert_eq!(server.writes("secrets"), 4);
}

#[tokio::test]
async fn missing_namespace_and_namespace_labels() {
    let (_server, client) = started().await;
    let elsewhere: Api<Secret> = Api::namespaced(client.clone(), "team-a");
    let err = api_error(
        elsewhere
            .create(&PostParams::default(), &secret("s", &[]))
            .await,
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (404, "namespaces \"team-a\" not found")
    );

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace {
        metadata: meta("team-a"),
        ..Default::default()
    };
    ns.metadata.labels = Some(BTreeMap::from([("team".to_string(), "data".to_string())]));
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let labelled = namespaces
        .list(&ListParams::default().labels("team=data"))
        .await
        .unwrap();
    let got = &labelled.items[0];
    assert_eq!(got.labels()["kubernetes.io/metadata.name"], "team-a");
    assert_eq!(
        got.status.as_ref().unwrap().phase.as_deref(),
        Some("Active")
    );
    elsewhere
        .create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();

    let immortal = api_error(namespaces.delete("default", &DeleteParams::default()).await);
    assert_eq!(immortal.code, 403);

    // Deleting a namespace deletes its content, then the namespace itself; finalizers hold
    // both, and nothing new may be created meanwhile.
    let mut held = secret("held", &[]);
    held.metadata.finalizers = Some(vec!["test.appconn.io/hold".into()]);
    elsewhere
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = namespaces.get("team-a").await.unwrap();
    assert_eq!(
        terminating.status.unwrap().phase.as_deref(),
        Some("Terminating")
    );
    let refused = api_error(
        elsewhere
            .create(&PostParams::default(), &secret("new", &[]))
            .await,
    );
    assert_eq!(refused.code, 403);
    assert!(
        elsewhere
            .get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    let release = json!({"metadata": {"finalizers": null}});
    elsewhere
        .patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while namespaces.get_opt("team-a").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(elsewhere.get_opt("s").await.unwrap().is_none());
}

#[tokio::test]
async fn list_selectors_pagination_and_resource_versions() {
    let (_server, client) = started().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta("other"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let here: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let there: Api<ConfigMap> = Api::namespaced(client.clone(), "other");
    let mut last_rv = 0u64;
    for i in 0..12 {
        let tier = if i % 3 == 0 { "db" } else { "web" };
        let mut cm = ConfigMap {
            metadata: meta(&format!("cm-{i:02}")),
            ..Default::default()
        };
        let mut labels = BTreeMap::from([("tier".to_string(), tier.to_string())]);
        if i % 2 == 0 {
            labels.insert("even".into(), "yes".into());
        }
        cm.metadata.labels = Some(labels);
        let api = if i < 8 { &here } else { &there };
        let c = api.create(&PostParams::default(), &cm).await.unwrap();
        last_rv = c.resource_version().unwrap().parse().unwrap();
    }
    let count = |sel: &str| {
        let here = here.clone();
        let sel = sel.to_string();
        async move {
            here.list(&ListParams::default().labels(&sel))
                .await
                .unwrap()
                .items
                .len()
        }
    };
    assert_eq!(count("tier=db").await, 3);
    assert_eq!(count("tier==web").await, 5);
    assert_eq!(count("tier!=db").await, 5);
    assert_eq!(count("tier in (db,web)").await, 8);
    assert_eq!(count("tier notin (web)").await, 3);
    assert_eq!(count("even").await, 4);
    assert_eq!(count("!even").await, 4);
    assert_eq!(count("even,tier=db").await, 2);

    let all: Api<ConfigMap> = Api::all(client.clone());
    let everything = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(everything.items.len(), 12);
    let list_rv: u64 = everything
        .metadata
        .resource_version
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        list_rv >= last_rv,
        "a list carries the current global resourceVersion"
    );
    let by_field = all
        .list(&ListParams::default().fields("metadata.namespace=other"))
        .await
        .unwrap();
    assert_eq!(by_field.items.len(), 4);
    let by_name = here
        .list(&ListParams::default().fields("metadata.name=cm-03"))
        .await
        .unwrap();
    assert_eq!(by_name.items[0].name_any(), "cm-03");
    let bad = api_error(here.list(&ListParams::default().fields("data.x=1")).await);
    assert_eq!(bad.code, 400);

    // Pages share one snapshot: a change between pages does not show up in later pages.
    let first = all.list(&ListParams::default().limit(5)).await.unwrap();
    assert_eq!(first.items.len(), 5);
    assert_eq!(first.metadata.remaining_item_count, Some(7));
    here.delete("cm-07", &DeleteParams::default())
        .await
        .unwrap();
    let mut names: Vec<String> = first.items.iter().map(|c| c.name_any()).collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = all
            .list(&ListParams::default().limit(5).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|c| c.name_any()));
        token = page.metadata.continue_;
    }
    assert_eq!(names.len(), 12);
    assert!(names.contains(&"cm-07".to_string()));

    let dp = DeleteParams::default();
    here.delete_collection(&dp, &ListParams::default().labels("tier=db"))
        .await
        .unwrap();
    assert_eq!(count("tier=db").await, 0);
    assert_eq!(count("tier=web").await, 4);
}

#[tokio::test]
async fn metadata_only_reads_and_watches() {
    let (server, client) = started().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    secrets
        .create(&PostParams::default(), &secret("m1", &[("a", "1")]))
        .await
        .unwrap();
    let listed = secrets.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].metadata.labels.as_ref().unwrap()["a"], "1");
    let one = secrets.get_metadata("m1").await.unwrap();
    assert_eq!(one.types.unwrap().kind, "PartialObjectMetadata");

    let rv = listed.metadata.resource_version.unwrap();
    let mut raw = secrets
        .watch_metadata(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    secrets
        .create(&PostParams::default(), &secret("m2", &[]))
        .await
        .unwrap();
    let added = next_where(&mut raw, |e| matches!(e, Ok(WatchEvent::Added(_))))
        .await
        .unwrap();
    let WatchEvent::Added(obj) = added else {
        unreachable!()
    };
    assert_eq!(obj.metadata.name.as_deref(), Some("m2"));

    let partial: Api<PartialObjectMeta<Secret>> = Api::default_namespaced(client.clone());
    let mut events = watcher(partial, watcher::Config::default())
        .applied_objects()
        .boxed();
    next_where(&mut events, |o| {
        o.as_ref().is_ok_and(|o| o.name_any() == "m1")
    })
    .await
    .unwrap();
    secrets
        .delete("m1", &DeleteParams::default())
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &secret("m3", &[]))
        .await
        .unwrap();
    next_where(&mut events, |o| {
        o.as_ref().is_ok_and(|o| o.name_any() == "m3")
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn watch_replays_history_sends_bookmarks_and_times_out() {
    let (server, client) = started().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let c = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("w"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let from = c.resource_version().unwrap();
    let patch = json!({"data": {"k": "v"}});
    cms.patch("w", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    cms.delete("w", &DeleteParams::default()).await.unwrap();

    let wp = WatchParams::default().timeout(1);
    let events: Vec<WatchEvent<ConfigMap>> =
        tokio::time::timeout(WAIT, cms.watch(&wp, &from).await.unwrap().try_collect())
            .await
            .unwrap()
            .unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        })
        .filter(|k| *k != "BOOKMARK")
        .collect();
    assert_eq!(
        kinds,
        ["MODIFIED", "DELETED"],
        "replay after the given resourceVersion, then timeout"
    );
    assert!(
        events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))),
        "bookmarks while idle"
    );
    if let Some(WatchEvent::Deleted(gone)) =
        events.iter().find(|e| matches!(e, WatchEvent::Deleted(_)))
    {
        let rv: u64 = gone.resource_version().unwrap().parse().unwrap();
        assert!(
            rv > from.parse::<u64>().unwrap() + 1,
            "DELETED carries the deletion's resourceVersion"
        );
    }

    // "0" means: everything current as ADDED, then live.
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("x"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut live = cms
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    next_where(
        &mut live,
        |e| matches!(e, Ok(WatchEvent::Added(c)) if c.name_any() == "x"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn watch_selectors_turn_relabels_into_added_and_deleted() {
    let (_server, client) = started().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let mut cm = ConfigMap {
        metadata: meta("sel"),
        ..Default::default()
    };
    cm.metadata.labels = Some(BTreeMap::from([("watched".to_string(), "yes".to_string())]));
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let wp = WatchParams::default().labels("watched=yes");
    let mut stream = cms.watch(&wp, "0").await.unwrap().boxed();
    next_where(&mut stream, |e| matches!(e, Ok(WatchEvent::Added(_))))
        .await
        .unwrap();
    let unlabel = json!({"metadata": {"labels": {"watched": "no"}}});
    cms.patch("sel", &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    next_where(&mut stream, |e| matches!(e, Ok(WatchEvent::Deleted(_))))
        .await
        .unwrap();
    let relabel = json!({"metadata": {"labels": {"watched": "yes"}}});
    cms.patch("sel", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    next_where(&mut stream, |e| matches!(e, Ok(WatchEvent::Added(_))))
        .await
        .unwrap();
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_a_bookmark() {
    let (_server, client) = started().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for n in ["a", "b"] {
        cms.create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta(n),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let mut stream = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Init => {}
            watcher::Event::InitApply(c) => initial.push(c.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, ["a", "b"]);
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("c"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    next_where(
        &mut stream,
        |e| matches!(e, Ok(watcher::Event::Apply(c)) if c.name_any() == "c"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn compaction_gives_410_and_watchers_recover() {
    let (server, client) = started().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let old = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("a"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let old_rv = old.resource_version().unwrap();
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("b"),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    next_where(&mut events, |e| matches!(e, Ok(watcher::Event::InitDone)))
        .await
        .unwrap();

    server.compact();
    let mut raw = cms
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, raw.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    let lp = ListParams::default()
        .at(&old_rv)
        .matching(kube::api::VersionMatch::Exact);
    let gone = api_error(cms.list(&lp).await);
    assert_eq!(gone.code, 410);

    // A watcher that lost its watch, and whose resourceVersion was compacted away meanwhile,
    // gets 410, relists and carries on.
    server.cut_watches();
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("c"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    server.compact();
    let err = next_where(&mut events, Result::is_err).await.unwrap_err();
    assert!(
        matches!(err, watcher::Error::WatchError(ref s) if s.code == 410),
        "{err:?}"
    );
    next_where(&mut events, |e| matches!(e, Ok(watcher::Event::Init)))
        .await
        .unwrap();
    next_where(
        &mut events,
        |e| matches!(e, Ok(watcher::Event::InitApply(c)) if c.name_any() == "c"),
    )
    .await
    .unwrap();
    next_where(&mut events, |e| matches!(e, Ok(watcher::Event::InitDone)))
        .await
        .unwrap();
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("d"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    next_where(
        &mut events,
        |e| matches!(e, Ok(watcher::Event::Apply(c)) if c.name_any() == "d"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn cut_watches_forces_a_rewatch_without_losing_events() {
    let (server, client) = started().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let leases: Api<Lease> = Api::default_namespaced(client.clone());
    let mut stream = watcher(leases.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let lease = |name: &str| Lease {
        metadata: meta(name),
        spec: Some(LeaseSpec::default()),
    };
    leases
        .create(&PostParams::default(), &lease("one"))
        .await
        .unwrap();
    next_where(&mut stream, |o| {
        o.as_ref().is_ok_and(|l| l.name_any() == "one")
    })
    .await
    .unwrap();
    let before = server
        .requests()
        .iter()
        .filter(|r| r.verb == "watch")
        .count();
    server.cut_watches();
    leases
        .create(&PostParams::default(), &lease("two"))
        .await
        .unwrap();
    next_where(&mut stream, |o| {
        o.as_ref().is_ok_and(|l| l.name_any() == "two")
    })
    .await
    .unwrap();
    let after = server
        .requests()
        .iter()
        .filter(|r| r.verb == "watch")
        .count();
    assert!(after > before, "the watcher re-watched");
}

#[tokio::test]
async fn crd_registration_scope_and_discovery() {
    let (_server, client) = started().await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let before = api_error(widgets.list(&ListParams::default()).await);
    assert_eq!(
        before.code, 404,
        "unknown resources are 404 until the CRD is established"
    );

    let crd = install_crd(&client, WIDGET_CRD).await;
    let status = crd.status.unwrap();
    let types: Vec<(String, String)> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    assert!(types.contains(&("Established".into(), "True".into())));
    assert!(types.contains(&("NamesAccepted".into(), "True".into())));
    assert_eq!(status.stored_versions, Some(vec!["v1".to_string()]));

    widgets
        .create(&PostParams::default(), &widget("w1", 1))
        .await
        .unwrap();
    install_crd(&client, GADGET_CRD).await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (gadget, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("test.appconn.io", "v1", "Gadget"))
        .expect("discovered");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    let gadgets: Api<DynamicObject> = Api::all_with(client.clone(), &gadget);
    let mut g = DynamicObject::new("g1", &gadget).data(json!({"spec": {"anything": [1, 2]}}));
    g.metadata.namespace = None;
    let g = gadgets.create(&PostParams::default(), &g).await.unwrap();
    assert_eq!(
        g.data["spec"]["anything"],
        json!([1, 2]),
        "preserve-unknown-fields keeps data"
    );
    assert!(
        discovery
            .resolve_gvk(&GroupVersionKind::gvk("test.appconn.io", "v1", "Widget"))
            .is_some()
    );

    // Deleting the CRD removes its objects and the resource.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("widgets.test.appconn.io", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while crds
            .get_opt("widgets.test.appconn.io")
            .await
            .unwrap()
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(api_error(widgets.get("w1").await).code, 404);
    let ar = ApiResource::erase::<Widget>(&());
    let dynamic: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), &ar);
    assert_eq!(
        api_error(dynamic.list(&ListParams::default()).await).code,
        404
    );
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let (server, client) = started().await;
    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let mut w = widget("g", 1);
    w.status = Some(WidgetStatus {
        phase: Some("ignored on create".into()),
        ..Default::default()
    });
    let w = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(w.metadata.generation, Some(1));
    assert!(
        w.status.is_none(),
        "create drops status when status is a subresource"
    );

    // A status write changes only status and leaves generation alone.
    let status =
        json!({"spec": {"size": 9}, "status": {"phase": "Ready", "observedGeneration": 1}});
    let s = widgets
        .patch_status("g", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(s.spec.size, 1);
    assert_eq!(s.status.as_ref().unwrap().phase.as_deref(), Some("Ready"));
    assert_eq!(s.metadata.generation, Some(1));

    // A main-resource write ignores status; spec changes bump generation, metadata ones do not.
    let mut replaced = s.clone();
    replaced.spec.size = 2;
    replaced.status = Some(WidgetStatus::default());
    let r = widgets
        .replace("g", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(r.metadata.generation, Some(2));
    assert_eq!(r.status.as_ref().unwrap().phase.as_deref(), Some("Ready"));
    let labels = json!({"metadata": {"labels": {"x": "y"}}});
    let l = widgets
        .patch("g", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    assert_eq!(l.metadata.generation, Some(2));

    // Unchanged writes do not create a new resourceVersion.
    let again = widgets
        .patch("g", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    assert_eq!(again.resource_version(), l.resource_version());
    assert_eq!(server.writes("widgets/status"), 1);
    assert_eq!(server.writes("widgets"), 4);

    // PUT without resourceVersion is refused for custom resources.
    let mut unconditional = again.clone();
    unconditional.metadata.resource_version = None;
    let err = api_error(
        widgets
            .replace("g", &PostParams::default(), &unconditional)
            .await,
    );
    assert_eq!(err.code, 422);
}

#[tokio::test]
async fn schema_validation_pruning_and_cel() {
    let (_server, client) = started().await;
    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let too_big = api_error(
        widgets
            .create(&PostParams::default(), &widget("big", 11))
            .await,
    );
    assert_eq!((too_big.code, too_big.reason.as_str()), (422, "Invalid"));
    assert!(too_big.message.contains("spec.size"), "{}", too_big.message);

    let dynamic: Api<DynamicObject> =
        Api::default_namespaced_with(client.clone(), &ApiResource::erase::<Widget>(&()));
    let mut obj = DynamicObject::new("pruned", &ApiResource::erase::<Widget>(&()))
        .data(json!({"spec": {"size": 1, "color": "red", "unknown": true}}));
    obj.metadata.namespace = Some("default".into());
    let created = dynamic.create(&PostParams::default(), &obj).await.unwrap();
    assert!(
        created.data["spec"].get("unknown").is_none(),
        "unknown fields are pruned"
    );

    let recolor = json!({"spec": {"color": "blue"}});
    let err = api_error(
        widgets
            .patch("pruned", &PatchParams::default(), &Patch::Merge(&recolor))
            .await,
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message
            .contains("color is immutable; delete and recreate"),
        "{}",
        err.message
    );
    let resize = json!({"spec": {"size": 3}});
    widgets
        .patch("pruned", &PatchParams::default(), &Patch::Merge(&resize))
        .await
        .unwrap();
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_server, client) = started().await;
    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let mut w = widget("fin", 1);
    w.metadata.finalizers = Some(vec!["test.appconn.io/cleanup".into()]);
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let mut stream = widgets
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    next_where(&mut stream, |e| matches!(e, Ok(WatchEvent::Added(_))))
        .await
        .unwrap();

    let pending = widgets
        .delete("fin", &DeleteParams::default())
        .await
        .unwrap();
    let marked = pending.left().expect("finalizers keep the object");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(0));
    assert_eq!(marked.metadata.generation, Some(2));
    next_where(
        &mut stream,
        |e| matches!(e, Ok(WatchEvent::Modified(w)) if w.metadata.deletion_timestamp.is_some()),
    )
    .await
    .unwrap();

    let add =
        json!({"metadata": {"finalizers": ["test.appconn.io/cleanup", "test.appconn.io/other"]}});
    let err = api_error(
        widgets
            .patch("fin", &PatchParams::default(), &Patch::Merge(&add))
            .await,
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message
            .contains("no new finalizers can be added if the object is being deleted")
    );

    let remove = json_patch::Patch(
        serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "test.appconn.io/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]))
        .unwrap(),
    );
    widgets
        .patch("fin", &PatchParams::default(), &Patch::Json::<()>(remove))
        .await
        .unwrap();
    next_where(&mut stream, |e| matches!(e, Ok(WatchEvent::Deleted(_))))
        .await
        .unwrap();
    assert!(widgets.get_opt("fin").await.unwrap().is_none());
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let (_server, client) = started().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let mut cm = ConfigMap {
        metadata: meta("p"),
        ..Default::default()
    };
    cm.metadata.finalizers = Some(vec!["a.io/x".into()]);
    let c = cms.create(&PostParams::default(), &cm).await.unwrap();

    let strategic = json!({"metadata": {"finalizers": ["a.io/y"]}, "data": {"k": "v"}});
    let s = cms
        .patch("p", &PatchParams::default(), &Patch::Strategic(&strategic))
        .await
        .unwrap();
    assert_eq!(
        s.finalizers(),
        ["a.io/x", "a.io/y"],
        "strategic merge unions finalizers"
    );

    let failing = json_patch::Patch(
        serde_json::from_value(json!([
            {"op": "test", "path": "/data/k", "value": "other"},
            {"op": "replace", "path": "/data/k", "value": "w"}
        ]))
        .unwrap(),
    );
    let err = api_error(
        cms.patch("p", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await,
    );
    assert_eq!(err.code, 422);

    let stale = json!({"metadata": {"resourceVersion": c.resource_version()}, "data": {"k": "z"}});
    let err = api_error(
        cms.patch("p", &PatchParams::default(), &Patch::Merge(&stale))
            .await,
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));

    let clear = json!({"metadata": {"finalizers": null}});
    cms.patch("p", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .unwrap();

    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    widgets
        .create(&PostParams::default(), &widget("sp", 1))
        .await
        .unwrap();
    let err = api_error(
        widgets
            .patch(
                "sp",
                &PatchParams::default(),
                &Patch::Strategic(&json!({"spec": {"size": 2}})),
            )
            .await,
    );
    assert_eq!(err.code, 415, "no strategic merge for custom resources");
}

#[tokio::test]
async fn server_side_apply_ownership_and_conflicts() {
    let (_server, client) = started().await;
    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let apply = |spec: Value| {
        json!({"apiVersion": "test.appconn.io/v1", "kind": "Widget", "metadata": {"name": "ssa"},
               "spec": spec})
    };

    let no_manager = api_error(
        widgets
            .patch(
                "ssa",
                &PatchParams::default(),
                &Patch::Apply(apply(json!({"size": 1}))),
            )
            .await,
    );
    assert_eq!(
        (no_manager.code, no_manager.reason.as_str()),
        (422, "Invalid")
    );
    assert_eq!(
        no_manager.message,
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for \
         apply patch"
    );

    let alice = PatchParams::apply("alice");
    let created = widgets
        .patch(
            "ssa",
            &alice,
            &Patch::Apply(apply(json!({"size": 1, "tags": ["a"]}))),
        )
        .await
        .unwrap();
    let managers: Vec<(String, String)> = created
        .managed_fields()
        .iter()
        .map(|m| (m.manager.clone().unwrap(), m.operation.clone().unwrap()))
        .collect();
    assert_eq!(managers, [("alice".to_string(), "Apply".to_string())]);

    let bob = PatchParams::apply("bob");
    let conflict = api_error(
        widgets
            .patch("ssa", &bob, &Patch::Apply(apply(json!({"size": 2}))))
            .await,
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        conflict.message,
        "Apply failed with 1 conflict: conflict with \"alice\" using test.appconn.io/v1: .spec.size"
    );
    // Same value: shared ownership, no conflict.
    widgets
        .patch("ssa", &bob, &Patch::Apply(apply(json!({"size": 1}))))
        .await
        .unwrap();
    // Forced: bob takes .spec.size.
    let forced = widgets
        .patch(
            "ssa",
            &bob.clone().force(),
            &Patch::Apply(apply(json!({"size": 3}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.size, 3);
    // alice stops applying tags: they go, as nobody else owns them.
    let dropped = widgets
        .patch("ssa", &alice, &Patch::Apply(apply(json!({"size": 3}))))
        .await
        .unwrap();
    assert_eq!(dropped.spec.tags, None);

    // Apply on the status subresource, with list-map conditions merged by key.
    let status = |c: Value| {
        json!({"apiVersion": "test.appconn.io/v1", "kind": "Widget",
               "status": {"conditions": [c]}})
    };
    widgets
        .patch_status(
            "ssa",
            &PatchParams::apply("ctrl-a"),
            &Patch::Apply(status(json!({"type": "A", "status": "True"}))),
        )
        .await
        .unwrap();
    let both = widgets
        .patch_status(
            "ssa",
            &PatchParams::apply("ctrl-b"),
            &Patch::Apply(status(json!({"type": "B", "status": "False"}))),
        )
        .await
        .unwrap();
    assert_eq!(both.status.and_then(|s| s.phase), None);
    let ar = ApiResource::erase::<Widget>(&());
    let dynamic: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), &ar);
    let raw = dynamic.get("ssa").await.unwrap();
    let types: Vec<&str> = raw.data["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["A", "B"], "each controller owns its own condition");

    let dry = widgets
        .patch(
            "ssa",
            &PatchParams::apply("carol").dry_run(),
            &Patch::Apply(apply(json!({"size": 3, "color": "red"}))),
        )
        .await
        .unwrap();
    assert_eq!(dry.spec.color.as_deref(), Some("red"));
    assert_eq!(
        widgets.get("ssa").await.unwrap().spec.color,
        None,
        "dryRun stores nothing"
    );
}

#[tokio::test]
async fn apply_creates_built_ins_and_tracks_update_managers() {
    let (_server, client) = started().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"},
                     "data": {"x": "1", "y": "2"}});
    cms.patch("a", &PatchParams::apply("kubectl"), &Patch::Apply(&cfg))
        .await
        .unwrap();
    let edit = json!({"data": {"x": "changed"}});
    cms.patch(
        "a",
        &PatchParams {
            field_manager: Some("editor".into()),
            ..Default::default()
        },
        &Patch::Merge(&edit),
    )
    .await
    .unwrap();
    let err = api_error(
        cms.patch("a", &PatchParams::apply("kubectl"), &Patch::Apply(&cfg))
            .await,
    );
    assert!(
        err.message.contains("conflict with \"editor\""),
        "{}",
        err.message
    );
    let forced = cms
        .patch(
            "a",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&cfg),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["x"], "1");
}

#[tokio::test]
async fn recorder_events_show_in_both_event_apis() {
    let (server, client) = started().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("ev"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "appconn-test".into(),
            instance: Some("pod-0".into()),
        },
    );
    let ev = RecorderEvent {
        type_: EventType::Warning,
        reason: "Drift".into(),
        note: Some("changed outside".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder.publish(&ev, &cm.object_ref(&())).await.unwrap();
    recorder.publish(&ev, &cm.object_ref(&())).await.unwrap();
    assert_eq!(server.writes("events"), 2);

    let v1: Api<EventV1> = Api::default_namespaced(client.clone());
    let listed = v1.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].series.as_ref().map(|s| s.count), Some(2));
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let legacy = core
        .list(&ListParams::default().fields("involvedObject.name=ev"))
        .await
        .unwrap();
    assert_eq!(legacy.items[0].message.as_deref(), Some("changed outside"));
    assert_eq!(legacy.items[0].reason.as_deref(), Some("Drift"));

    let long = RecorderEvent {
        note: Some("x".repeat(2000)),
        reason: "Other".into(),
        ..ev
    };
    let err = api_error(recorder.publish(&long, &cm.object_ref(&())).await);
    assert_eq!(err.code, 422, "notes over 1 KiB are refused");
}

#[tokio::test]
async fn leases_update_and_create_on_put() {
    let (server, client) = started().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let spec = LeaseSpec {
        holder_identity: Some("a".into()),
        lease_duration_seconds: Some(15),
        ..Default::default()
    };
    let l = Lease {
        metadata: meta("leader"),
        spec: Some(spec),
    };
    let created = leases
        .replace("leader", &PostParams::default(), &l)
        .await
        .unwrap();
    let mut next = created.clone();
    next.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("leader", &PostParams::default(), &next)
        .await
        .unwrap();
    let err = api_error(
        leases
            .replace("leader", &PostParams::default(), &next)
            .await,
    );
    assert_eq!(err.code, 409);
    assert_eq!(server.writes("leases"), 2);
}

#[tokio::test]
async fn token_and_access_reviews() {
    let (server, client) = started().await;
    let user = UserInfo {
        username: Some("system:serviceaccount:apps:reader".into()),
        groups: Some(vec!["system:serviceaccounts".into()]),
        ..Default::default()
    };
    server.set_token("good-token", user);
    server.allow(
        "system:serviceaccount:apps:reader",
        "get",
        "appconn.io",
        "appconnections/credentials",
        Some("apps"),
    );

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec {
            token: token.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("good-token"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(
        ok.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:apps:reader")
    );
    let bad = reviews
        .create(&PostParams::default(), &review("bad"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_ne!(bad.authenticated, Some(true));

    let sars: Api<SubjectAccessReview> = Api::all(client.clone());
    let ask = |ns: &str, sub: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some("system:serviceaccount:apps:reader".into()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.into()),
                verb: Some("get".into()),
                group: Some("appconn.io".into()),
                resource: Some("appconnections".into()),
                subresource: Some(sub.into()),
                name: Some("warehouse".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let allowed = |r: SubjectAccessReview| r.status.unwrap().allowed;
    assert!(allowed(
        sars.create(&PostParams::default(), &ask("apps", "credentials"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        sars.create(&PostParams::default(), &ask("other", "credentials"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        sars.create(&PostParams::default(), &ask("apps", ""))
            .await
            .unwrap()
    ));
    assert_eq!(server.writes("tokenreviews"), 0, "reviews store nothing");
}

#[tokio::test]
async fn injected_failures_and_request_records() {
    let (server, client) = started().await;
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    server.fail_next("create", "secrets", 500);
    let err = api_error(
        secrets
            .create(&PostParams::default(), &secret("f", &[]))
            .await,
    );
    assert_eq!((err.code, err.reason.as_str()), (500, "InternalError"));
    secrets
        .create(&PostParams::default(), &secret("f", &[]))
        .await
        .unwrap();
    // kube retries 429 (honouring Retry-After) on its own.
    server.fail_next("get", "secrets", 429);
    secrets.get("f").await.unwrap();
    let records = server.requests();
    assert_eq!(records.iter().filter(|r| r.verb == "get").count(), 2);
    let creates: Vec<_> = records
        .iter()
        .filter(|r| r.verb == "create" && r.resource == "secrets")
        .collect();
    assert_eq!(creates.len(), 2);
    assert_eq!(creates[0].namespace.as_deref(), Some("default"));
    assert_eq!(creates[0].group, "");
    assert_eq!(server.writes("secrets"), 1);
    assert_eq!(server.total_writes(), 1);
}

#[tokio::test]
async fn controller_runs_end_to_end() {
    use kube::runtime::controller::{Action, Controller};
    use std::sync::Arc;

    let (server, client) = started().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    for i in 0..20 {
        widgets
            .create(&PostParams::default(), &widget(&format!("c{i}"), i % 10))
            .await
            .unwrap();
    }
    async fn reconcile(w: Arc<Widget>, api: Arc<Api<Widget>>) -> Result<Action, kube::Error> {
        let generation = w.metadata.generation;
        if w.status.as_ref().and_then(|s| s.observed_generation) != generation {
            let status = json!({"status": {"observedGeneration": generation, "phase": "Ready"}});
            api.patch_status(
                &w.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;
        }
        Ok(Action::await_change())
    }
    let api = Arc::new(widgets.clone());
    let controller = Controller::new(widgets.clone(), watcher::Config::default())
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_secs(1)),
            api,
        )
        .for_each(|_| async {});
    let handle = tokio::spawn(controller);
    tokio::time::timeout(WAIT, async {
        loop {
            let list = widgets.list(&ListParams::default()).await.unwrap();
            if list
                .items
                .iter()
                .all(|w| w.status.as_ref().and_then(|s| s.observed_generation) == Some(1))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.writes("widgets/status"),
        20,
        "one status write per object, then quiet"
    );
    handle.abort();
}

#[tokio::test]
async fn garbage_collection_follows_owner_references() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    let (_server, client) = started().await;
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let owned_by = |owner: &Secret, name: &str| {
        let mut cm = ConfigMap {
            metadata: meta(name),
            ..Default::default()
        };
        cm.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Secret".into(),
            name: owner.name_any(),
            uid: owner.uid().unwrap(),
            ..Default::default()
        }]);
        cm
    };
    let parent = secrets
        .create(&PostParams::default(), &secret("parent", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_by(&parent, "child"))
        .await
        .unwrap();
    secrets
        .delete("parent", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        cms.get_opt("child").await.unwrap().is_none(),
        "background deletion"
    );

    let parent = secrets
        .create(&PostParams::default(), &secret("parent", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_by(&parent, "kept"))
        .await
        .unwrap();
    secrets
        .delete("parent", &DeleteParams::orphan())
        .await
        .unwrap();
    let kept = cms.get("kept").await.unwrap();
    assert!(
        kept.owner_references().is_empty(),
        "orphaned dependents lose the reference"
    );
}

#[tokio::test]
async fn kube_runtime_finalizer_helper_round_trip() {
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (_server, client) = started().await;
    install_crd(&client, WIDGET_CRD).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let cleanups = Arc::new(AtomicUsize::new(0));
    type Ctx = (Api<Widget>, Arc<AtomicUsize>);
    async fn reconcile(w: Arc<Widget>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        let (api, cleanups) = (&ctx.0, &ctx.1);
        finalizer(api, "test.appconn.io/cleanup", w, |event| async move {
            if let Finalizer::Cleanup(_) = event {
                cleanups.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, kube::Error>(Action::await_change())
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e)
            | kube::runtime::finalizer::Error::AddFinalizer(e)
            | kube::runtime::finalizer::Error::RemoveFinalizer(e) => e,
            other => panic!("{other}"),
        })
    }
    let ctx = Arc::new((widgets.clone(), cleanups.clone()));
    let controller = Controller::new(widgets.clone(), watcher::Config::default())
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_millis(50)),
            ctx,
        )
        .for_each(|_| async {});
    let handle = tokio::spawn(controller);
    widgets
        .create(&PostParams::default(), &widget("f", 1))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while widgets.get("f").await.unwrap().finalizers().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the helper added its finalizer");
    widgets.delete("f", &DeleteParams::default()).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while widgets.get_opt("f").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the helper removed its finalizer and the object went");
    assert_eq!(cleanups.load(Ordering::SeqCst), 1);
    handle.abort();
}

/// A namespaced `test.appconn.io/v1` CRD with one version and the given schema.
fn crd_with_schema(plural: &str, kind: &str, schema: Value) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.test.appconn.io")},
        "spec": {
            "group": "test.appconn.io",
            "scope": "Namespaced",
            "names": {"plural": plural, "kind": kind},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }))
    .unwrap()
}

/// A schema whose `spec` has the given properties and rules.
fn spec_schema(properties: Value, rules: Value) -> Value {
    json!({"type": "object", "properties": {"spec": {
        "type": "object",
        "properties": properties,
        "x-kubernetes-validations": rules,
    }}})
}

/// `spec.credentials`: a map of sources, each an untyped `value` or a typed `secretKeyRef`,
/// the entries further constrained by `entry` (rules or junctors).
fn credentials_crd(entry: Value) -> CustomResourceDefinition {
    let mut source = json!({
        "type": "object",
        "properties": {
            "value": {"x-kubernetes-preserve-unknown-fields": true},
            "secretKeyRef": {"type": "object", "properties": {
                "name": {"type": "string"},
                "key": {"type": "string"},
            }},
        },
    });
    for (k, v) in entry.as_object().unwrap() {
        source[k] = v.clone();
    }
    let schema = json!({"type": "object", "properties": {"spec": {
        "type": "object",
        "properties": {"credentials": {"type": "object", "additionalProperties": source}},
    }}});
    crd_with_schema("credentials", "Credential", schema)
}

const SOURCE_RULE_PATH: &str = "spec.versions[0].schema.openAPIV3Schema.properties[spec]\
     .properties[credentials].additionalProperties.x-kubernetes-validations[0].rule";

/// (reason, field, message) of each cause a failure carried.
fn causes(status: &Status) -> Vec<(String, String, String)> {
    status
        .details
        .as_ref()
        .map(|d| {
            d.causes
                .iter()
                .map(|c| (c.reason.clone(), c.field.clone(), c.message.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Installs a CRD; its objects are created through the returned API with [`create_spec`].
async fn install(
    client: &Client,
    crd: &CustomResourceDefinition,
) -> (Api<DynamicObject>, ApiResource) {
    install_crd(client, &serde_yaml::to_string(crd).unwrap()).await;
    let gvk = GroupVersionKind::gvk("test.appconn.io", "v1", &crd.spec.names.kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
    (Api::default_namespaced_with(client.clone(), &ar), ar)
}

/// Creates an object with the given spec and returns the spec the server stored.
async fn create_spec(
    (api, ar): &(Api<DynamicObject>, ApiResource),
    name: &str,
    spec: Value,
) -> kube::Result<Value> {
    let obj = DynamicObject::new(name, ar).data(json!({"spec": spec}));
    let created = api.create(&PostParams::default(), &obj).await?;
    Ok(created.data["spec"].clone())
}

fn untyped_rule() -> Value {
    json!({"x-kubernetes-validations": [{
        "rule": "has(self.value) != has(self.secretKeyRef)",
        "message": "exactly one of value and secretKeyRef",
    }]})
}

fn one_of_required() -> Value {
    json!({"oneOf": [{"required": ["value"]}, {"required": ["secretKeyRef"]}]})
}

#[tokio::test]
async fn crd_rules_naming_untyped_properties_do_not_compile() {
    let (_server, client) = started().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let refused = api_error(
        crds.create(&PostParams::default(), &credentials_crd(untyped_rule()))
            .await,
    );
    assert_eq!((refused.code, refused.reason.as_str()), (422, "Invalid"));
    let expected = (
        "FieldValueInvalid".to_string(),
        SOURCE_RULE_PATH.to_string(),
        "Invalid value: apiextensions.ValidationRule{Rule:\"has(self.value) != \
         has(self.secretKeyRef)\", Message:\"exactly one of value and secretKeyRef\", \
         MessageExpression:\"\", Reason:(*apiextensions.FieldValueErrorReason)(nil), \
         FieldPath:\"\", OptionalOldSelf:(*bool)(nil)}: compilation failed: ERROR: \
         <input>:1:4: undefined field 'value'\n | has(self.value) != \
         has(self.secretKeyRef)\n | ...^"
            .to_string(),
    );
    assert_eq!(causes(&refused), vec![expected.clone()]);
    assert!(
        crds.get_opt("credentials.test.appconn.io")
            .await
            .unwrap()
            .is_none()
    );

    // Unparsable rules stay refused; a messageExpression is checked like its rule; a rule on a
    // node with no CEL type cannot be compiled at all.
    let refused_with = |entry: Value| {
        let crds = crds.clone();
        async move {
            let status = api_error(
                crds.create(&PostParams::default(), &credentials_crd(entry))
                    .await,
            );
            assert_eq!(status.code, 422);
            causes(&status)
        }
    };
    let unparsable =
        refused_with(json!({"x-kubernetes-validations": [{"rule": "has(self.secretKeyRef) &&"}]}))
            .await;
    assert_eq!(unparsable.len(), 1, "{unparsable:?}");
    assert_eq!(unparsable[0].1, SOURCE_RULE_PATH);
    assert!(
        unparsable[0]
            .2
            .contains("compilation failed: ERROR: <input>:1:"),
        "{}",
        unparsable[0].2
    );
    let message = refused_with(json!({"x-kubernetes-validations": [{
        "rule": "has(self.secretKeyRef)",
        "messageExpression": "'missing ' + self.value",
    }]}))
    .await;
    assert_eq!(
        message.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        vec![SOURCE_RULE_PATH.replace(".rule", ".messageExpression")]
    );
    assert!(
        message[0].2.ends_with(
            "messageExpression compilation failed: ERROR: <input>:1:18: undefined field \
             'value'\n | 'missing ' + self.value\n | .................^"
        ),
        "{}",
        message[0].2
    );
    let mut on_untyped = credentials_crd(json!({}));
    let mut schema = serde_json::to_value(&on_untyped.spec.versions[0].schema).unwrap();
    schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["credentials"]["additionalProperties"]
        ["properties"]["value"]["x-kubernetes-validations"] = json!([{"rule": "self == oldSelf"}]);
    on_untyped.spec.versions[0].schema = serde_json::from_value(schema).unwrap();
    let untyped = causes(&api_error(
        crds.create(&PostParams::default(), &on_untyped).await,
    ));
    assert_eq!(
        untyped,
        vec![(
            "InternalError".to_string(),
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[credentials]\
             .additionalProperties.properties[value].x-kubernetes-validations"
                .to_string(),
            "Internal error: internal error: failed to construct type information for \
             x-kubernetes-validations rules: unable to convert structural schema to CEL \
             declarations"
                .to_string(),
        )]
    );

    // The same rule is refused when an update brings it into an accepted CRD.
    install(&client, &credentials_crd(one_of_required())).await;
    let mut current = crds.get("credentials.test.appconn.io").await.unwrap();
    current.spec = credentials_crd(untyped_rule()).spec;
    let refused = api_error(
        crds.replace(
            "credentials.test.appconn.io",
            &PostParams::default(),
            &current,
        )
        .await,
    );
    assert_eq!(refused.code, 422);
    assert_eq!(causes(&refused), vec![expected]);
    let kept = crds.get("credentials.test.appconn.io").await.unwrap();
    let kept = serde_json::to_value(&kept.spec.versions[0].schema).unwrap();
    assert!(
        kept.pointer(
            "/openAPIV3Schema/properties/spec/properties/credentials/additionalProperties/oneOf"
        )
        .is_some(),
        "the refused update changed nothing"
    );
}

#[tokio::test]
async fn one_of_required_branches_pick_exactly_one_source() {
    let (_server, client) = started().await;
    let api = install(&client, &credentials_crd(one_of_required())).await;
    let spec = create_spec(
        &api,
        "one-each",
        json!({"credentials": {
            "db": {"value": {"any": ["json", 1]}},
            "api": {"secretKeyRef": {"name": "s", "key": "k"}},
        }}),
    )
    .await
    .unwrap();
    assert_eq!(
        spec["credentials"]["db"]["value"],
        json!({"any": ["json", 1]})
    );

    let both = api_error(
        create_spec(
            &api,
            "both",
            json!({"credentials": {"db": {"value": "v", "secretKeyRef": {"name": "s"}}}}),
        )
        .await,
    );
    assert_eq!((both.code, both.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        causes(&both),
        vec![(
            "FieldValueInvalid".to_string(),
            "<nil>".to_string(),
            "Invalid value: \"\": \"spec.credentials.db\" must validate one and only one \
             schema (oneOf). Found 2 valid alternatives"
                .to_string(),
        )]
    );
    assert!(
        both.message.contains(
            "<nil>: Invalid value: \"\": \"spec.credentials.db\" must validate one and only one schema (oneOf)"
        ),
        "{}",
        both.message
    );

    let neither = api_error(create_spec(&api, "neither", json!({"credentials": {"db": {}}})).await);
    assert_eq!(neither.code, 422);
    assert_eq!(
        causes(&neither),
        vec![
            (
                "FieldValueInvalid".to_string(),
                "<nil>".to_string(),
                "Invalid value: \"\": \"spec.credentials.db\" must validate one and only one \
                 schema (oneOf). Found none valid"
                    .to_string(),
            ),
            (
                "FieldValueRequired".to_string(),
                "spec.credentials.db.value".to_string(),
                "Required value".to_string(),
            ),
        ]
    );
}

#[tokio::test]
async fn int_or_string_properties_are_visible_to_rules() {
    let (_server, client) = started().await;
    let schema = spec_schema(
        json!({"port": {"x-kubernetes-int-or-string": true}, "name": {"type": "string"}}),
        json!([{"rule": "has(self.port)", "message": "a port is required"}]),
    );
    let api = install(&client, &crd_with_schema("endpoints", "Endpoint", schema)).await;
    assert_eq!(
        create_spec(&api, "numbered", json!({"port": 8080}))
            .await
            .unwrap()["port"],
        json!(8080)
    );
    assert_eq!(
        create_spec(&api, "named", json!({"port": "http"}))
            .await
            .unwrap()["port"],
        json!("http")
    );
    let missing = api_error(create_spec(&api, "missing", json!({"name": "x"})).await);
    assert_eq!(missing.code, 422);
    assert!(
        missing.message.contains("a port is required"),
        "{}",
        missing.message
    );
}

#[tokio::test]
async fn reserved_and_special_property_names_are_escaped() {
    let (_server, client) = started().await;
    let properties = json!({
        "ref": {"type": "object", "properties": {
            "namespace": {"type": "string"},
            "name": {"type": "string"},
        }},
        "max-size": {"type": "integer"},
    });
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let unescaped = spec_schema(
        properties.clone(),
        json!([{"rule": "!has(self.ref) || has(self.ref.namespace)"}]),
    );
    let refused = api_error(
        crds.create(
            &PostParams::default(),
            &crd_with_schema("refs", "Ref", unescaped),
        )
        .await,
    );
    assert_eq!(refused.code, 422);
    let found = causes(&refused);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].1,
        "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule"
    );
    assert!(
        found[0].2.ends_with(
            "compilation failed: ERROR: <input>:1:22: undefined field 'namespace'\n \
                 | !has(self.ref) || has(self.ref.namespace)\n \
                 | .....................^"
        ),
        "{}",
        found[0].2
    );

    let escaped = spec_schema(
        properties,
        json!([
            {"rule": "!has(self.ref) || has(self.ref.__namespace__)",
             "message": "ref needs a namespace"},
            {"rule": "!has(self.max__dash__size) || self.max__dash__size > 0",
             "message": "max-size must be positive"},
        ]),
    );
    let api = install(&client, &crd_with_schema("refs", "Ref", escaped)).await;
    create_spec(
        &api,
        "full",
        json!({"ref": {"namespace": "ns", "name": "n"}, "max-size": 3}),
    )
    .await
    .unwrap();
    let no_namespace = api_error(create_spec(&api, "bare", json!({"ref": {"name": "n"}})).await);
    assert!(
        no_namespace.message.contains("ref needs a namespace"),
        "{}",
        no_namespace.message
    );
    let zero = api_error(create_spec(&api, "zero", json!({"max-size": 0})).await);
    assert!(
        zero.message.contains("max-size must be positive"),
        "{}",
        zero.message
    );
}

#[tokio::test]
async fn map_keys_and_list_macros_type_check() {
    let (_server, client) = started().await;
    let properties = json!({
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"},
        }}},
    });
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let wrong = spec_schema(
        properties.clone(),
        json!([{"rule": "!has(self.items) || self.items.all(i, has(i.title))"}]),
    );
    let refused = api_error(
        crds.create(
            &PostParams::default(),
            &crd_with_schema("boxes", "Box", wrong),
        )
        .await,
    );
    assert!(
        causes(&refused)
            .iter()
            .any(|c| c.2.contains("undefined field 'title'")),
        "{:?}",
        causes(&refused)
    );

    let rules = json!([
        {"rule": "!has(self.labels) || !has(self.labels.team) || self.labels.team != ''",
         "message": "team must not be empty"},
        {"rule": "!has(self.labels) || self.labels.all(k, k.size() < 64 && self.labels[k].size() < 64)"},
        {"rule": "!has(self.items) || self.items.all(i, has(i.name))",
         "message": "every item needs a name"},
        {"rule": "!has(self.items) || self.items.map(i, i.name).filter(n, n == 'x').size() <= 1"},
        {"rule": "!has(self.items) || self.items.exists_one(i, i.name == 'main') || self.items.exists(i, i.name == 'any')"},
    ]);
    let api = install(
        &client,
        &crd_with_schema("boxes", "Box", spec_schema(properties, rules)),
    )
    .await;
    create_spec(
        &api,
        "ok",
        json!({"labels": {"team": "a"}, "items": [{"name": "main"}]}),
    )
    .await
    .unwrap();
    let empty_team = api_error(create_spec(&api, "team", json!({"labels": {"team": ""}})).await);
    assert!(
        empty_team.message.contains("team must not be empty"),
        "{}",
        empty_team.message
    );
    let unnamed = api_error(create_spec(&api, "unnamed", json!({"items": [{}]})).await);
    assert!(
        unnamed.message.contains("every item needs a name"),
        "{}",
        unnamed.message
    );
}

#[tokio::test]
async fn the_repository_crds_install_with_every_rule_compiled() {
    let (_server, client) = started().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for file in files {
        let yaml = std::fs::read_to_string(&file).unwrap();
        assert!(
            yaml.contains("x-kubernetes-validations"),
            "{} has CEL rules to check",
            file.display()
        );
        let crd = install_crd(&client, &yaml).await;
        assert!(
            crd.status.is_some(),
            "{} is installed and established",
            file.display()
        );
    }
}

#[tokio::test]
async fn resource_roots_expose_type_meta_and_name_only() {
    let (_server, client) = started().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let root = |rule: &str| {
        json!({
            "type": "object",
            "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
            "x-kubernetes-validations": [{"rule": rule}],
        })
    };
    let labels = api_error(
        crds.create(
            &PostParams::default(),
            &crd_with_schema("roots", "Root", root("has(self.metadata.labels)")),
        )
        .await,
    );
    let found = causes(&labels);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].1,
        "spec.versions[0].schema.openAPIV3Schema.x-kubernetes-validations[0].rule"
    );
    assert!(
        found[0].2.contains("undefined field 'labels'"),
        "{}",
        found[0].2
    );
    let rule = "self.metadata.name.size() < 64 && self.kind == 'Root' && has(self.apiVersion)";
    install(&client, &crd_with_schema("roots", "Root", root(rule))).await;
}
