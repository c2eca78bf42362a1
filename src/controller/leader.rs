//! Leader election on a `coordination.k8s.io/v1` Lease, following client-go's `leaderelection`:
//! a free or expired lease is taken with a write carrying the read `resourceVersion`, so of two
//! contenders exactly one wins; the leader renews it; a leader that cannot renew in time steps
//! down before anyone else could consider the lease expired; on shutdown the lease is released.
//!
//! A lease held by another identity counts as expired only when both its `renewTime` plus
//! `leaseDurationSeconds` has passed by the wall clock AND it has not changed for
//! `leaseDurationSeconds` by this process's monotonic clock (client-go's rule, which keeps two
//! processes from leading together when their wall clocks disagree).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process (the pod name): a lease held by this identity is ours.
    pub identity: String,
    /// How long a lease stays valid after its last renewal; written as `leaseDurationSeconds`
    /// (rounded up to whole seconds).
    pub lease_duration: Duration,
    /// How often the leader renews and others retry. At most half the lease duration: the leader
    /// steps down when it has not renewed for `lease_duration - renew_every`.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// A config with the default durations (15s lease, renewed every 5s).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_every: DEFAULT_RENEW_EVERY,
        }
    }
}

/// Elects one leader among the processes sharing a Lease; see the module docs.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaderElector {
    /// A lease duration under a second becomes one second; a renew period that is zero or longer
    /// than half the lease duration becomes a third of it, so the leader can retry before it
    /// must step down.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        let config = normalized(config);
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// Runs until `shutdown` resolves: acquires the lease when it is free or expired, renews it
    /// while held, and publishes leadership on the returned channel (true while this process
    /// leads). On shutdown it publishes false, then releases the lease so a successor takes over
    /// at once; the task ends after that, so awaiting the handle waits for the release. Resolve
    /// `shutdown` only after the work guarded by leadership has stopped.
    pub fn start(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (watch::Receiver<bool>, JoinHandle<()>) {
        let (leading, rx) = watch::channel(false);
        let election = Election {
            api: self.api,
            renew_deadline: self.config.lease_duration - self.config.renew_every,
            lease_seconds: whole_seconds(self.config.lease_duration),
            config: self.config,
            leading,
            observed: None,
            renewed_at: None,
            seen_holder: None,
        };
        (rx, tokio::spawn(election.run(shutdown)))
    }
}

/// The lease as last read or written, and when (locally) its spec last changed.
struct Observed {
    lease: Lease,
    changed_at: Instant,
}

struct Election {
    api: Api<Lease>,
    config: LeaseConfig,
    /// Longest time the leader goes without a successful renewal before stepping down.
    renew_deadline: Duration,
    lease_seconds: i32,
    leading: watch::Sender<bool>,
    observed: Option<Observed>,
    /// While leading: the instant just before the last successful write of the lease was sent,
    /// so no later than the `renewTime` it carried.
    renewed_at: Option<Instant>,
    /// The other holder last logged, to log each change of leader once.
    seen_holder: Option<String>,
}

impl Election {
    async fn run(mut self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let limit = self
                .deadline()
                .unwrap_or_else(|| Instant::now() + self.renew_deadline);
            let attempt = tokio::select! {
                biased;
                () = &mut shutdown => break,
                attempt = tokio::time::timeout_at(limit, self.try_acquire_or_renew()) => attempt,
            };
            match attempt {
                // A write that took so long that this process should already have stepped
                // down does not make it lead.
                Ok(Ok(true)) if self.deadline().is_some_and(|d| Instant::now() < d) => self.lead(),
                Ok(Ok(true)) => self.step_down("acquiring or renewing the lease took too long"),
                Ok(Ok(false)) => self.step_down("the lease is held by another identity"),
                Ok(Err(err)) => self.warn("could not acquire or renew the lease", Some(&err)),
                Err(_) => self.warn("acquiring or renewing the lease timed out", None),
            }
            self.check_deadline();
            let period = if self.deadline().is_some() {
                self.config.renew_every
            } else {
                // Contenders spread their retries so they do not hit the API in step.
                self.config
                    .renew_every
                    .mul_f64(rand::random_range(1.0..1.2))
            };
            let next = Instant::now() + period;
            let wake = self.deadline().map_or(next, |deadline| deadline.min(next));
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(wake) => {}
            }
            self.check_deadline();
        }
        let held = self.deadline().is_some()
            || self
                .observed
                .as_ref()
                .is_some_and(|o| holder(&o.lease) == Some(self.identity()));
        self.renewed_at = None;
        if self.publish(false) {
            tracing::info!(
                lease = %self.config.name,
                identity = %self.config.identity,
                "stopped leading: shutting down"
            );
        }
        if held {
            match tokio::time::timeout(self.config.renew_every, self.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => self.warn(
                    "could not release the lease; a successor waits for it to expire",
                    Some(&err),
                ),
                Err(_) => self.warn(
                    "releasing the lease timed out; a successor waits for it to expire",
                    None,
                ),
            }
        }
    }

    /// A lease call that failed (with the API's error) or timed out.
    fn warn(&self, what: &str, err: Option<&kube::Error>) {
        let error = err.map(crate::kube_error::describe);
        tracing::warn!(
            lease = %self.config.name,
            identity = %self.config.identity,
            error = error.as_deref(),
            "{what}"
        );
    }

    fn identity(&self) -> &str {
        &self.config.identity
    }

    /// While leading: when this process must have stepped down unless it renews first.
    fn deadline(&self) -> Option<Instant> {
        self.renewed_at.map(|at| at + self.renew_deadline)
    }

    fn check_deadline(&mut self) {
        if self
            .deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            self.step_down("could not renew the lease in time");
        }
    }

    fn lead(&mut self) {
        self.seen_holder = None;
        if self.publish(true) {
            tracing::info!(
                lease = %self.config.name,
                identity = %self.config.identity,
                "acquired the lease: leading"
            );
        }
    }

    fn step_down(&mut self, why: &str) {
        self.renewed_at = None;
        if self.publish(false) {
            tracing::warn!(
                lease = %self.config.name,
                identity = %self.config.identity,
                "stopped leading: {why}"
            );
        }
    }

    /// Returns whether the value changed.
    fn publish(&self, leading: bool) -> bool {
        self.leading
            .send_if_modified(|current| std::mem::replace(current, leading) != leading)
    }

    /// One round: renew or take the lease. Ok(true) when this process now holds it, Ok(false)
    /// when another identity does or won a race for it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let pp = PostParams::default();
        // The leader writes straight over the lease it last wrote; a conflict means it changed,
        // so read it again below.
        if self.renewed_at.is_some()
            && let Some(observed) = &self.observed
            && holder(&observed.lease) == Some(self.identity())
        {
            let (sent, now) = stamp();
            let next = take(
                observed.lease.clone(),
                self.identity(),
                now,
                self.lease_seconds,
            );
            match self.api.replace(&self.config.name, &pp, &next).await {
                Ok(written) => return Ok(self.wrote(written, sent)),
                Err(err) if is_conflict(&err) => {}
                Err(err) => return Err(err),
            }
        }
        // A lost create race re-reads once to see who won.
        for _ in 0..2 {
            let Some(current) = self.api.get_opt(&self.config.name).await? else {
                let (sent, now) = stamp();
                let fresh = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_duration_seconds: Some(self.lease_seconds),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&pp, &fresh).await {
                    Ok(written) => return Ok(self.wrote(written, sent)),
                    Err(err) if is_conflict(&err) => continue,
                    Err(err) => return Err(err),
                }
            };
            let unchanged_for = self.observe(&current);
            let live = live_other_holder(
                &current,
                self.identity(),
                self.lease_seconds,
                Timestamp::now(),
                unchanged_for,
            );
            if let Some(other) = live {
                if self.seen_holder.as_deref() != Some(other) {
                    tracing::info!(
                        lease = %self.config.name,
                        identity = %self.config.identity,
                        leader = %other,
                        "the lease is held by another identity"
                    );
                    self.seen_holder = Some(other.to_owned());
                }
                return Ok(false);
            }
            let (sent, now) = stamp();
            let next = take(current, self.identity(), now, self.lease_seconds);
            return match self.api.replace(&self.config.name, &pp, &next).await {
                Ok(written) => Ok(self.wrote(written, sent)),
                // Someone else wrote it since the read: they won.
                Err(err) if is_conflict(&err) => Ok(false),
                Err(err) => Err(err),
            };
        }
        Ok(false)
    }

    fn wrote(&mut self, written: Lease, sent: Instant) -> bool {
        self.observed = Some(Observed {
            lease: written,
            changed_at: sent,
        });
        self.renewed_at = Some(sent);
        true
    }

    /// Records `lease` as read now; returns how long its spec has been seen unchanged.
    fn observe(&mut self, lease: &Lease) -> Duration {
        let changed_at = match &self.observed {
            Some(o) if o.lease.spec == lease.spec => o.changed_at,
            _ => Instant::now(),
        };
        self.observed = Some(Observed {
            lease: lease.clone(),
            changed_at,
        });
        changed_at.elapsed()
    }

    /// Clears the holder, if it is still this identity, so a successor need not wait.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        if holder(&lease) != Some(self.identity()) {
            return Ok(());
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        // What client-go writes on release, for readers that only look at the times.
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    lease = %self.config.name,
                    identity = %self.config.identity,
                    "released the lease"
                );
                Ok(())
            }
            // Changed since the read: someone else has it now, nothing to release.
            Err(err) if is_conflict(&err) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// The config with a lease duration of at least a second and a renew period that is positive
/// and at most half the lease duration, so the leader can retry before it must step down.
fn normalized(mut config: LeaseConfig) -> LeaseConfig {
    config.lease_duration = config.lease_duration.max(Duration::from_secs(1));
    if config.renew_every.is_zero() || config.renew_every * 2 > config.lease_duration {
        let renew_every = config.lease_duration / 3;
        tracing::warn!(
            configured = ?config.renew_every,
            lease_duration = ?config.lease_duration,
            using = ?renew_every,
            "lease renew period must be positive and at most half the lease duration"
        );
        config.renew_every = renew_every;
    }
    config
}

/// `leaseDurationSeconds` for `duration`, rounded up so others never see a shorter lease.
fn whole_seconds(duration: Duration) -> i32 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// `lease` held by `identity` and renewed at `now`, keeping its metadata (and so its
/// resourceVersion, which makes the write fail if the lease changed since it was read). Taking
/// it from another holder, or a released lease, sets `acquireTime` and counts a transition.
fn take(mut lease: Lease, identity: &str, now: MicroTime, lease_seconds: i32) -> Lease {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        spec.holder_identity = Some(identity.to_owned());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(lease_seconds);
    lease
}

/// The holder of `lease` when it is an identity other than `identity` and its lease is live:
/// renewed within its duration by the wall clock (`now`), or seen to change within its duration
/// by this process (`unchanged_for`). Only a lease stale by both counts as expired.
fn live_other_holder<'a>(
    lease: &'a Lease,
    identity: &str,
    default_seconds: i32,
    now: Timestamp,
    unchanged_for: Duration,
) -> Option<&'a str> {
    let holder = holder(lease).filter(|h| *h != identity)?;
    let spec = lease.spec.as_ref()?;
    let seconds = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .unwrap_or(default_seconds);
    let renewed_recently = spec.renew_time.as_ref().is_some_and(|renewed| {
        now.duration_since(renewed.0) < SignedDuration::from_secs(seconds.into())
    });
    let changed_recently = unchanged_for < Duration::from_secs(seconds.unsigned_abs().into());
    (renewed_recently || changed_recently).then_some(holder)
}

/// The local instant and the wall-clock time of a write, taken together just before sending it.
fn stamp() -> (Instant, MicroTime) {
    (Instant::now(), MicroTime(Timestamp::now()))
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

/// 409: AlreadyExists on create, Conflict on a stale resourceVersion.
fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409 || status.is_conflict())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, seconds: i32) -> Lease {
        let renewed = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
        Lease {
            metadata: ObjectMeta {
                name: Some("appconn".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                acquire_time: Some(MicroTime(renewed)),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(seconds),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn taking_from_another_holder_counts_a_transition() {
        let now = MicroTime(Timestamp::now());
        let taken = take(lease(Some("pod-b"), 30, 15), "pod-a", now.clone(), 15);
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("7"));
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
        assert_eq!(spec.acquire_time.as_ref(), Some(&now));
        assert_eq!(spec.renew_time.as_ref(), Some(&now));
        assert_eq!(spec.lease_transitions, Some(4));

        let released = take(lease(None, 30, 1), "pod-a", now, 15);
        let spec = released.spec.unwrap();
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.lease_duration_seconds, Some(15));
    }

    #[test]
    fn renewing_keeps_acquire_time_and_transitions() {
        let held = lease(Some("pod-a"), 2, 15);
        let acquired = held.spec.as_ref().unwrap().acquire_time.clone();
        let now = MicroTime(Timestamp::now());
        let spec = take(held, "pod-a", now.clone(), 15).spec.unwrap();
        assert_eq!(spec.acquire_time, acquired);
        assert_eq!(spec.renew_time, Some(now));
        assert_eq!(spec.lease_transitions, Some(3));
    }

    #[test]
    fn a_lease_expires_only_when_stale_by_both_clocks() {
        let now = Timestamp::now();
        let long = Duration::from_secs(60);
        let fresh = lease(Some("pod-b"), 1, 15);
        assert_eq!(
            live_other_holder(&fresh, "pod-a", 15, now, long),
            Some("pod-b")
        );
        let stale = lease(Some("pod-b"), 30, 15);
        assert_eq!(live_other_holder(&stale, "pod-a", 15, now, long), None);
        // Its renewTime is old, but it changed recently as seen here: the holder's wall clock
        // may be behind ours.
        let recently = Duration::from_secs(2);
        assert_eq!(
            live_other_holder(&stale, "pod-a", 15, now, recently),
            Some("pod-b")
        );
        // Our own lease, and a released one, are never someone else's.
        assert_eq!(live_other_holder(&fresh, "pod-b", 15, now, long), None);
        assert_eq!(
            live_other_holder(&lease(None, 0, 15), "pod-a", 15, now, recently),
            None
        );
        assert_eq!(
            live_other_holder(&lease(Some(""), 0, 15), "pod-a", 15, now, recently),
            None
        );
    }

    #[test]
    fn durations_are_made_workable() {
        let config = normalized(LeaseConfig::new("ns", "lease", "pod-a"));
        assert_eq!(config.lease_duration, DEFAULT_LEASE_DURATION);
        assert_eq!(config.renew_every, DEFAULT_RENEW_EVERY);

        let config = normalized(LeaseConfig {
            lease_duration: Duration::from_millis(300),
            renew_every: Duration::ZERO,
            ..LeaseConfig::new("ns", "lease", "pod-a")
        });
        assert_eq!(config.lease_duration, Duration::from_secs(1));
        assert_eq!(config.renew_every, Duration::from_secs(1) / 3);

        let config = normalized(LeaseConfig {
            renew_every: Duration::from_secs(10),
            ..LeaseConfig::new("ns", "lease", "pod-a")
        });
        assert_eq!(config.renew_every, Duration::from_secs(5));

        assert_eq!(whole_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(whole_seconds(Duration::from_secs(15)), 15);
    }
}
