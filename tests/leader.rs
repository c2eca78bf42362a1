//! Leader election against the test API server, with short durations (2s lease, renewed every
//! 500ms) so each test takes a few seconds.

use std::time::Duration;

use appconn::controller::leader::{LeaderElector, LeaseConfig};
use appconn_testkit::apiserver::TestApiServer;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const NAMESPACE: &str = "default";
const LEASE: &str = "appconn-leader";
const LEASE_DURATION: Duration = Duration::from_secs(2);
const RENEW_EVERY: Duration = Duration::from_millis(500);

struct Elector {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Elector {
    fn start(client: &kube::Client, identity: &str) -> Self {
        let config = LeaseConfig {
            lease_duration: LEASE_DURATION,
            renew_every: RENEW_EVERY,
            ..LeaseConfig::new(NAMESPACE, LEASE, identity)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (leading, task) = LeaderElector::new(client.clone(), config).start(async {
            let _ = stopped.await;
        });
        Self {
            leading,
            stop: Some(stop),
            task,
        }
    }

    fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until the published leadership equals `leading`; false if it did not within `limit`.
    async fn becomes(&mut self, leading: bool, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.leading.wait_for(|l| *l == leading))
            .await
            .is_ok()
    }

    /// Shuts the elector down and waits for its task, which releases the lease.
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("the elector stops soon after shutdown")
            .unwrap();
        assert!(
            !*self.leading.borrow(),
            "leadership is withdrawn on shutdown"
        );
    }
}

/// A test API server and a client for it.
async fn start_server() -> (TestApiServer, kube::Client) {
    // No rustls crypto provider is chosen by features alone: the process installs one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = TestApiServer::start().await;
    let client = server.client();
    (server, client)
}

fn leases(client: &kube::Client) -> Api<Lease> {
    Api::namespaced(client.clone(), NAMESPACE)
}

async fn holder(client: &kube::Client) -> Option<String> {
    leases(client)
        .get(LEASE)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
}

/// Samples both electors every 10ms for `period`, failing if both ever lead at once; returns
/// the fraction of samples in which one of them led.
async fn never_both(a: &Elector, b: &Elector, period: Duration) -> f64 {
    let end = Instant::now() + period;
    let (mut samples, mut led) = (0u32, 0u32);
    while Instant::now() < end {
        let (la, lb) = (a.is_leading(), b.is_leading());
        assert!(!(la && lb), "two leaders at once");
        samples += 1;
        led += u32::from(la || lb);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f64::from(led) / f64::from(samples)
}

#[tokio::test]
async fn a_single_elector_leads_renews_and_releases() {
    let (_server, client) = start_server().await;
    let mut a = Elector::start(&client, "pod-a");
    assert!(
        a.becomes(true, Duration::from_secs(2)).await,
        "pod-a never led"
    );

    let first = leases(&client).get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(first.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(first.lease_duration_seconds, Some(2));
    assert_eq!(first.lease_transitions, Some(0));
    assert!(first.acquire_time.is_some());
    let first_renewal = first.renew_time.clone().expect("renewTime is set");

    tokio::time::sleep(RENEW_EVERY * 3).await;
    let later = leases(&client).get(LEASE).await.unwrap().spec.unwrap();
    assert!(a.is_leading());
    assert_eq!(later.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(
        later.acquire_time, first.acquire_time,
        "renewing keeps acquireTime"
    );
    assert_eq!(later.lease_transitions, Some(0));
    assert!(
        later.renew_time.unwrap() > first_renewal,
        "the leader renews"
    );

    a.stop().await;
    assert_eq!(holder(&client).await, None, "shutdown releases the lease");
}

#[tokio::test]
async fn two_electors_never_lead_at_once() {
    let (_server, client) = start_server().await;
    let a = Elector::start(&client, "pod-a");
    let b = Elector::start(&client, "pod-b");

    let led = never_both(&a, &b, Duration::from_secs(3)).await;
    assert!(a.is_leading() != b.is_leading(), "exactly one leads");
    assert!(led > 0.8, "someone led for most of the time, not {led}");
    let leader = if a.is_leading() { "pod-a" } else { "pod-b" };
    assert_eq!(holder(&client).await.as_deref(), Some(leader));

    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn stopping_the_leader_hands_over_within_the_lease_duration() {
    let (_server, client) = start_server().await;
    let a = Elector::start(&client, "pod-a");
    let b = Elector::start(&client, "pod-b");
    never_both(&a, &b, Duration::from_secs(1)).await;
    let (leader, mut follower, successor) = match (a.is_leading(), b.is_leading()) {
        (true, false) => (a, b, "pod-b"),
        (false, true) => (b, a, "pod-a"),
        other => panic!("expected exactly one leader, got {other:?}"),
    };

    let stopped_at = Instant::now();
    leader.stop().await;
    assert!(
        follower.becomes(true, LEASE_DURATION).await,
        "the follower did not take over"
    );
    assert!(stopped_at.elapsed() < LEASE_DURATION);

    let spec = leases(&client).get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(successor));
    assert_eq!(
        spec.lease_transitions,
        Some(1),
        "a takeover counts as a transition"
    );
    follower.stop().await;
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    let (_server, client) = start_server().await;
    let mut a = Elector::start(&client, "pod-a");
    assert!(a.becomes(true, Duration::from_secs(2)).await);
    let mut b = Elector::start(&client, "pod-b");
    tokio::time::sleep(RENEW_EVERY * 2).await;
    assert!(
        !b.is_leading(),
        "pod-b must not take a lease that is being renewed"
    );

    // No release: pod-b has to wait for the lease to expire.
    a.task.abort();
    let crashed_at = Instant::now();
    assert!(
        b.becomes(true, Duration::from_secs(4)).await,
        "pod-b never took over"
    );
    assert!(
        crashed_at.elapsed() >= LEASE_DURATION - RENEW_EVERY,
        "pod-b took over after {:?}, before the lease could have expired",
        crashed_at.elapsed()
    );
    assert_eq!(holder(&client).await.as_deref(), Some("pod-b"));
    b.stop().await;
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_steps_down() {
    let (_server, client) = start_server().await;
    let mut a = Elector::start(&client, "pod-a");
    assert!(a.becomes(true, Duration::from_secs(2)).await);

    // Another identity takes the lease by force: pod-a's next renewal conflicts.
    let api = leases(&client);
    loop {
        let mut lease = api.get(LEASE).await.unwrap();
        let spec = lease.spec.as_mut().unwrap();
        spec.holder_identity = Some("intruder".into());
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match api.replace(LEASE, &PostParams::default(), &lease).await {
            Ok(_) => break,
            // pod-a renewed in between: read again.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(err) => panic!("taking the lease: {err}"),
        }
    }

    let taken_at = Instant::now();
    assert!(
        a.becomes(false, RENEW_EVERY * 3).await,
        "pod-a kept leading"
    );
    assert!(taken_at.elapsed() < LEASE_DURATION);
    assert_eq!(holder(&client).await.as_deref(), Some("intruder"));

    // The intruder never renews, so pod-a takes the lease back once it expires.
    assert!(
        a.becomes(true, Duration::from_secs(4)).await,
        "pod-a never took the lease back"
    );
    let spec = api.get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_transitions, Some(1));
    a.stop().await;
}

#[tokio::test]
async fn a_leader_that_cannot_reach_the_api_steps_down_within_the_lease_duration() {
    let (server, client) = start_server().await;
    let mut a = Elector::start(&client, "pod-a");
    assert!(a.becomes(true, Duration::from_secs(2)).await);

    drop(server);
    assert!(
        a.becomes(false, LEASE_DURATION).await,
        "pod-a kept leading without renewing"
    );
    a.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), a.task)
        .await
        .expect("shutdown is not held up by an unreachable API")
        .unwrap();
}

#[tokio::test]
async fn a_leader_whose_renewals_fail_steps_down_and_recovers() {
    let (server, client) = start_server().await;
    let mut a = Elector::start(&client, "pod-a");
    assert!(a.becomes(true, Duration::from_secs(2)).await);

    // Every write fails for a while (500s): about 3s of attempts at one or two a period.
    for _ in 0..6 {
        server.fail_next("update", "leases", 500);
    }
    let failing_since = Instant::now();
    assert!(
        a.becomes(false, LEASE_DURATION).await,
        "pod-a kept leading without renewing"
    );
    assert!(
        failing_since.elapsed() >= LEASE_DURATION - RENEW_EVERY * 2,
        "pod-a stepped down after {:?}, at the first failed renewal",
        failing_since.elapsed()
    );

    // Once writes succeed again the lease, still in its name, is renewed without a transition.
    assert!(
        a.becomes(true, Duration::from_secs(5)).await,
        "pod-a never led again"
    );
    let spec = leases(&client).get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_transitions, Some(0));
    a.stop().await;
}
