//! Status: the next `AppConnectionStatus` from the prior one and what just happened. Pure.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{BackendInfo, Reason};
use crate::backend::{Remote, RemoteRotation};
use crate::crd::{AppConnectionStatus, BackendStatusRef, RotationStatus};

/// The condition type the operator maintains.
pub const READY: &str = "Ready";

/// What the reconcile learnt, to be folded into the status.
#[derive(Clone, Debug)]
pub struct Observation {
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    /// The backend object as last written or read, when a call was made.
    pub remote: Option<Remote>,
    /// Set when content was written: the hash of what was sent.
    pub written_hash: Option<String>,
    /// Whether the rotation is on in the spec.
    pub rotation_enabled: bool,
}

/// Folds an observation into the prior status. Fields the observation does not speak of are
/// kept, so a failure never erases the recorded id or hash.
pub fn next_status(
    prior: Option<&AppConnectionStatus>,
    generation: Option<i64>,
    backend: Option<&BackendInfo>,
    obs: &Observation,
    now: Timestamp,
) -> AppConnectionStatus {
    let mut status = prior.cloned().unwrap_or_default();
    if let Some(info) = backend {
        status.backend = Some(BackendStatusRef {
            kind: info.kind.clone(),
            name: info.name.clone(),
            type_: info.provider.as_str().to_string(),
        });
    }
    if let Some(remote) = &obs.remote {
        status.id = Some(remote.id.clone());
        status.connection_name = Some(remote.connection_name.clone());
        if remote.credentials_hash.is_some() {
            status.backend_credentials_hash = remote.credentials_hash.clone();
        }
        status.rotation = rotation_status(obs.rotation_enabled, remote.rotation.as_ref());
    }
    if let Some(hash) = &obs.written_hash {
        if status.credentials_hash.as_ref() != Some(hash) {
            status.version = Some(status.version.unwrap_or(0) + 1);
        }
        status.credentials_hash = Some(hash.clone());
        status.last_sync_time = Some(Time(now));
    }
    status.observed_generation = generation;
    set_ready(
        &mut status.conditions,
        obs.ready,
        obs.reason,
        &obs.message,
        generation,
        now,
    );
    status
}

fn rotation_status(enabled: bool, remote: Option<&RemoteRotation>) -> Option<RotationStatus> {
    if !enabled && remote.is_none() {
        return None;
    }
    let remote = remote.cloned().unwrap_or_default();
    Some(RotationStatus {
        enabled,
        status: remote.status,
        last_message: remote.last_message,
        last_rotation_time: remote.last_rotation_time.map(Time),
        next_rotation_at: remote.next_rotation_at.map(Time),
    })
}

/// Replaces the Ready condition in `conditions`; `lastTransitionTime` moves only when its
/// status moves. Shared by every status the operator writes.
pub fn set_ready(
    conditions: &mut Vec<Condition>,
    ready: bool,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if ready { "True" } else { "False" };
    let transition = conditions
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    conditions.retain(|c| c.type_ != READY);
    conditions.push(Condition {
        type_: READY.to_string(),
        status: status.to_string(),
        reason: reason.as_str().to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: transition,
    });
}

/// The Ready condition, if any.
pub fn ready_condition(status: Option<&AppConnectionStatus>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == READY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ready: bool, reason: Reason, written: Option<&str>) -> Observation {
        Observation {
            ready,
            reason,
            message: "m".into(),
            remote: Some(Remote {
                id: "id-1".into(),
                connection_name: "c".into(),
                credentials_hash: Some("b1".into()),
                rotation: None,
                content: None,
            }),
            written_hash: written.map(str::to_string),
            rotation_enabled: false,
        }
    }

    #[test]
    fn version_moves_only_when_content_changes() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let info = BackendInfo::builtin();
        let s1 = next_status(
            None,
            Some(1),
            Some(&info),
            &obs(true, Reason::Synced, Some("h1")),
            t0,
        );
        assert_eq!(s1.version, Some(1));
        let s2 = next_status(
            Some(&s1),
            Some(2),
            Some(&info),
            &obs(true, Reason::Synced, Some("h1")),
            t0,
        );
        assert_eq!(
            s2.version,
            Some(1),
            "same hash written again is not a new version"
        );
        let s3 = next_status(
            Some(&s2),
            Some(2),
            Some(&info),
            &obs(true, Reason::Synced, Some("h2")),
            t0,
        );
        assert_eq!(s3.version, Some(2));
        assert_eq!(s3.observed_generation, Some(2));
        assert_eq!(s3.conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn transition_time_moves_only_with_condition_status() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let t2 = Timestamp::from_second(3_000).unwrap();
        let s1 = next_status(
            None,
            Some(1),
            None,
            &obs(true, Reason::Synced, Some("h")),
            t0,
        );
        let s2 = next_status(
            Some(&s1),
            Some(1),
            None,
            &obs(true, Reason::Synced, None),
            t1,
        );
        assert_eq!(s2.conditions[0].last_transition_time, Time(t0));
        let s3 = next_status(
            Some(&s2),
            Some(1),
            None,
            &obs(false, Reason::SecretNotFound, None),
            t2,
        );
        assert_eq!(s3.conditions[0].last_transition_time, Time(t2));
        assert_eq!(
            s3.id.as_deref(),
            Some("id-1"),
            "a failure keeps the recorded id"
        );
        assert_eq!(s3.credentials_hash.as_deref(), Some("h"));
    }
}
