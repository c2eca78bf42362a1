//! The built-in store: connection records with encrypted credentials, behind [`StoreEngine`].
//!
//! One engine, [`SqlStore`], runs on SQLite (one file, the embedded default) or PostgreSQL (for
//! several replicas and managed backups). Everything but the SQL dialect is shared: record
//! building, rotation state, encryption, row mapping and the statements themselves.
//!
//! Rotation state is kept by the engine itself, from the schedule and the credentials it is
//! given, so every engine reports it the same way: see [`RotationState`].

pub mod api;
mod crypto;
mod dialect;
mod location;
pub mod migrations;
mod sql;
pub mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde_json::Value;
use uuid::Uuid;

use crate::crd::RotationSchedule;
use crate::secret::Credentials;

pub use location::{LocationError, StoreLocation};
pub use sql::{KeyUsage, SqlStore};

/// The engine opened on a SQLite file ([`SqlStore::open`]): the name callers of the embedded
/// store know it by.
pub type SqliteStore = SqlStore;

/// What a caller writes: one connection with its credentials.
#[derive(Clone, Debug)]
pub struct NewRecord {
    pub namespace: String,
    /// `metadata.name` of the AppConnection.
    pub name: String,
    pub connection_name: String,
    pub app: String,
    pub method: Option<String>,
    pub project: Option<String>,
    pub description: Option<String>,
    /// Non-secret fields.
    pub settings: BTreeMap<String, Value>,
    pub credentials: Credentials,
    /// The operator's `hmac-sha256:` hash of everything above.
    pub credentials_hash: String,
    pub rotation: Option<RotationSchedule>,
}

/// Where a connection stands against its rotation schedule. All `None` without a schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationState {
    /// When the credentials last changed while the schedule was on.
    pub last_rotation_time: Option<Timestamp>,
    /// When the credentials must have changed again.
    pub next_rotation_at: Option<Timestamp>,
    /// The record's hash when the current rotation period started.
    pub hash_at_last_rotation: Option<String>,
}

impl RotationState {
    /// State of a record written for the first time.
    pub fn on_insert(schedule: Option<RotationSchedule>, hash: &str, now: Timestamp) -> Self {
        match schedule {
            Some(s) => Self::started(s, hash, now),
            None => Self::default(),
        }
    }

    /// State after an update that changed the record. A rotation is a change of the credentials
    /// themselves: the hash also covers description, settings and schedule, and editing those
    /// rotates nothing.
    pub fn on_update(
        &self,
        old_schedule: Option<RotationSchedule>,
        new_schedule: Option<RotationSchedule>,
        credentials_changed: bool,
        hash: &str,
        now: Timestamp,
    ) -> Self {
        let Some(schedule) = new_schedule else {
            return Self::default();
        };
        let Some(old) = old_schedule.filter(|_| self.next_rotation_at.is_some()) else {
            return Self::started(schedule, hash, now);
        };
        if credentials_changed {
            Self {
                last_rotation_time: Some(now),
                next_rotation_at: Some(next_rotation(now, schedule)),
                hash_at_last_rotation: Some(hash.to_string()),
            }
        } else if old != schedule {
            // The period now counts from the last rotation under the new schedule; without one
            // yet, from this change.
            let from = self.last_rotation_time.unwrap_or(now);
            Self {
                next_rotation_at: Some(next_rotation(from, schedule)),
                ..self.clone()
            }
        } else {
            self.clone()
        }
    }

    fn started(schedule: RotationSchedule, hash: &str, now: Timestamp) -> Self {
        Self {
            last_rotation_time: None,
            next_rotation_at: Some(next_rotation(now, schedule)),
            hash_at_last_rotation: Some(hash.to_string()),
        }
    }
}

/// A stored connection with its credentials.
#[derive(Clone, Debug)]
pub struct Record {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub connection_name: String,
    pub app: String,
    pub method: Option<String>,
    pub project: Option<String>,
    pub description: Option<String>,
    pub settings: BTreeMap<String, Value>,
    pub credentials: Credentials,
    pub credentials_hash: String,
    /// 1 on insert, +1 on every update that changed something.
    pub version: i64,
    pub rotation: Option<RotationSchedule>,
    pub rotation_state: RotationState,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A stored connection without its credentials: what listing shows.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordSummary {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub connection_name: String,
    pub app: String,
    pub method: Option<String>,
    pub project: Option<String>,
    pub description: Option<String>,
    pub settings: BTreeMap<String, Value>,
    pub credentials_hash: String,
    pub version: i64,
    pub rotation: Option<RotationSchedule>,
    pub rotation_state: RotationState,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl RecordSummary {
    fn with_credentials(self, credentials: Credentials) -> Record {
        Record {
            id: self.id,
            namespace: self.namespace,
            name: self.name,
            connection_name: self.connection_name,
            app: self.app,
            method: self.method,
            project: self.project,
            description: self.description,
            settings: self.settings,
            credentials,
            credentials_hash: self.credentials_hash,
            version: self.version,
            rotation: self.rotation,
            rotation_state: self.rotation_state,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

impl Record {
    pub fn summary(&self) -> RecordSummary {
        RecordSummary {
            id: self.id,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            connection_name: self.connection_name.clone(),
            app: self.app.clone(),
            method: self.method.clone(),
            project: self.project.clone(),
            description: self.description.clone(),
            settings: self.settings.clone(),
            credentials_hash: self.credentials_hash.clone(),
            version: self.version,
            rotation: self.rotation,
            rotation_state: self.rotation_state.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// Whether writing `new` would change nothing.
    fn same_content(&self, new: &NewRecord) -> bool {
        self.namespace == new.namespace
            && self.name == new.name
            && self.connection_name == new.connection_name
            && self.app == new.app
            && self.method == new.method
            && self.project == new.project
            && self.description == new.description
            && self.settings == new.settings
            && self.credentials_hash == new.credentials_hash
            && self.rotation == new.rotation
            && self.credentials.expose() == new.credentials.expose()
    }

    /// The record after writing `new` at `now`, or `None` when that changes nothing.
    fn updated(&self, new: NewRecord, now: Timestamp) -> Option<Record> {
        if self.same_content(&new) {
            return None;
        }
        let credentials_changed = self.credentials.expose() != new.credentials.expose();
        let rotation_state = self.rotation_state.on_update(
            self.rotation,
            new.rotation,
            credentials_changed,
            &new.credentials_hash,
            now,
        );
        Some(Record {
            id: self.id,
            namespace: new.namespace,
            name: new.name,
            connection_name: new.connection_name,
            app: new.app,
            method: new.method,
            project: new.project,
            description: new.description,
            settings: new.settings,
            credentials: new.credentials,
            credentials_hash: new.credentials_hash,
            version: self.version + 1,
            rotation: new.rotation,
            rotation_state,
            created_at: self.created_at,
            updated_at: now,
        })
    }

    fn inserted(new: NewRecord, id: Uuid, now: Timestamp) -> Record {
        Record {
            id,
            rotation_state: RotationState::on_insert(new.rotation, &new.credentials_hash, now),
            namespace: new.namespace,
            name: new.name,
            connection_name: new.connection_name,
            app: new.app,
            method: new.method,
            project: new.project,
            description: new.description,
            settings: new.settings,
            credentials: new.credentials,
            credentials_hash: new.credentials_hash,
            version: 1,
            rotation: new.rotation,
            created_at: now,
            updated_at: now,
        }
    }
}

/// The calendar day `interval_days` after `from`'s UTC date, at `hours:minutes` UTC.
pub fn next_rotation(from: Timestamp, s: RotationSchedule) -> Timestamp {
    let days = i64::from(s.interval_days.max(1));
    let at = Time::new(s.hours.min(23) as i8, s.minutes.min(59) as i8, 0, 0)
        .expect("hours and minutes are clamped to a time of day");
    from.to_zoned(TimeZone::UTC)
        .date()
        .checked_add(days.days())
        .and_then(|date| date.to_datetime(at).to_zoned(TimeZone::UTC))
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::MAX)
}

/// A failed store operation. Each message is one line a person can act on; none holds a secret.
/// `path` is the store's file, or its PostgreSQL URL without the password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be created or opened (permissions, missing directory, read-only volume),
    /// or the database server refused the connection.
    #[error("cannot open store {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    /// Not a SQLite database, a SQLite database of something else, or damaged.
    #[error("{} is not an appconn store or is corrupt", path.display())]
    Corrupt { path: PathBuf },
    #[error(
        "store {} was written by a newer appconn (schema version {found}, this version reads up to {supported})",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// A key id the store knows comes with different key material.
    #[error("the key file does not match this store ({}): key {key_id} cannot decrypt it", path.display())]
    KeyMismatch { path: PathBuf, key_id: String },
    /// Records are encrypted with a key the installation keys no longer hold.
    #[error(
        "store {} holds records encrypted with key {key_id}, which the installation keys do not contain: restore that key",
        path.display()
    )]
    UnknownKey { path: PathBuf, key_id: String },
    /// A record's ciphertext fails authentication under its key: altered or damaged.
    #[error("record {id} in store {} cannot be decrypted: it was altered or damaged", path.display())]
    Undecryptable { path: PathBuf, id: Uuid },
    #[error("a connection named {connection_name:?} already exists in namespace {namespace:?}")]
    NameTaken {
        namespace: String,
        connection_name: String,
    },
    #[error("the record does not exist")]
    NotFound,
    /// Locked by another writer for longer than the busy timeout.
    #[error("store {} is busy: {reason}", path.display())]
    Busy { path: PathBuf, reason: String },
    /// Disk full, read-only volume, I/O failure while running.
    #[error("store {}: I/O error: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("store {}: {reason}", path.display())]
    Database { path: PathBuf, reason: String },
    /// A key still encrypts records, or is the current one, and cannot be forgotten.
    #[error("key {key_id} cannot be removed: {reason}")]
    KeyInUse { key_id: String, reason: String },
    /// An operation only one engine offers (a file backup of PostgreSQL, say).
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Busy { .. } | StoreError::Io { .. })
    }
}

/// A store of connection records. Every engine passes the same tests.
#[async_trait]
pub trait StoreEngine: Send + Sync {
    async fn get(&self, id: Uuid) -> Result<Option<Record>, StoreError>;

    async fn find_by_name(
        &self,
        namespace: &str,
        connection_name: &str,
    ) -> Result<Option<Record>, StoreError>;

    /// `NameTaken` when `(namespace, connection_name)` exists.
    async fn insert(&self, new: NewRecord, now: Timestamp) -> Result<Record, StoreError>;

    /// Replaces the content; `NotFound` when absent. Writes nothing, and keeps the version, when
    /// nothing changed.
    async fn update(&self, id: Uuid, new: NewRecord, now: Timestamp) -> Result<Record, StoreError>;

    /// `true` when a record was deleted.
    async fn delete(&self, id: Uuid) -> Result<bool, StoreError>;

    /// All records, or one namespace's, ordered by namespace and connection name.
    async fn list(&self, namespace: Option<&str>) -> Result<Vec<RecordSummary>, StoreError>;

    /// A small non-secret JSON document kept under `key`.
    async fn load_state(&self, key: &str) -> Result<Option<Value>, StoreError>;

    /// Stores the document; writes nothing when it equals what is stored.
    async fn save_state(&self, key: &str, value: &Value) -> Result<(), StoreError>;

    async fn delete_state(&self, key: &str) -> Result<(), StoreError>;

    /// Every document whose key starts with `prefix`, ordered by key.
    async fn list_state(&self, prefix: &str) -> Result<Vec<(String, Value)>, StoreError>;

    /// Write statements that changed the store since it was opened.
    fn write_count(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn every(interval_days: u16, hours: u8, minutes: u8) -> RotationSchedule {
        RotationSchedule {
            interval_days,
            hours,
            minutes,
        }
    }

    #[test]
    fn next_rotation_is_the_calendar_day_at_the_given_time() {
        let cases = [
            (
                "2026-01-15T23:00:00Z",
                every(30, 11, 29),
                "2026-02-14T11:29:00Z",
            ),
            (
                "2026-01-15T01:00:00Z",
                every(1, 0, 0),
                "2026-01-16T00:00:00Z",
            ),
            // The time of `from` does not matter, only its UTC date.
            (
                "2026-01-15T23:59:59.9Z",
                every(1, 23, 59),
                "2026-01-16T23:59:00Z",
            ),
            (
                "2026-01-31T12:00:00Z",
                every(1, 6, 0),
                "2026-02-01T06:00:00Z",
            ),
            (
                "2026-02-28T12:00:00Z",
                every(1, 6, 0),
                "2026-03-01T06:00:00Z",
            ),
            (
                "2028-02-28T12:00:00Z",
                every(1, 6, 0),
                "2028-02-29T06:00:00Z",
            ),
            (
                "2026-12-31T22:00:00Z",
                every(1, 11, 29),
                "2027-01-01T11:29:00Z",
            ),
            (
                "2026-12-01T00:00:00Z",
                every(365, 0, 0),
                "2027-12-01T00:00:00Z",
            ),
            (
                "2027-03-01T00:00:00Z",
                every(365, 0, 0),
                "2028-02-29T00:00:00Z",
            ),
        ];
        for (from, schedule, expected) in cases {
            assert_eq!(
                next_rotation(ts(from), schedule),
                ts(expected),
                "{from} {schedule:?}"
            );
        }
    }

    #[test]
    fn next_rotation_clamps_out_of_range_schedules() {
        let from = ts("2026-01-15T10:00:00Z");
        assert_eq!(
            next_rotation(from, every(0, 99, 99)),
            ts("2026-01-16T23:59:00Z")
        );
        assert_eq!(
            next_rotation(Timestamp::MAX, every(1, 0, 0)),
            Timestamp::MAX
        );
    }

    #[test]
    fn rotation_state_follows_credentials_and_schedule() {
        let s = every(30, 11, 29);
        let t0 = ts("2026-01-01T08:00:00Z");
        let start = RotationState::on_insert(Some(s), "h1", t0);
        assert_eq!(
            start,
            RotationState {
                last_rotation_time: None,
                next_rotation_at: Some(ts("2026-01-31T11:29:00Z")),
                hash_at_last_rotation: Some("h1".into()),
            }
        );
        assert_eq!(
            RotationState::on_insert(None, "h1", t0),
            RotationState::default()
        );

        // Description edited: a new hash, same credentials: not a rotation.
        let t1 = ts("2026-01-10T00:00:00Z");
        assert_eq!(start.on_update(Some(s), Some(s), false, "h2", t1), start);

        // Credentials changed: a rotation.
        let rotated = start.on_update(Some(s), Some(s), true, "h3", t1);
        assert_eq!(
            rotated,
            RotationState {
                last_rotation_time: Some(t1),
                next_rotation_at: Some(ts("2026-02-09T11:29:00Z")),
                hash_at_last_rotation: Some("h3".into()),
            }
        );

        // Shorter schedule: counts from the last rotation.
        let weekly = every(7, 0, 0);
        let t2 = ts("2026-01-12T00:00:00Z");
        let moved = rotated.on_update(Some(s), Some(weekly), false, "h4", t2);
        assert_eq!(moved.next_rotation_at, Some(ts("2026-01-17T00:00:00Z")));
        assert_eq!(moved.last_rotation_time, Some(t1));
        // No rotation yet: counts from the change.
        let moved = start.on_update(Some(s), Some(weekly), false, "h4", t2);
        assert_eq!(moved.next_rotation_at, Some(ts("2026-01-19T00:00:00Z")));

        // Off clears, on again starts afresh.
        let off = rotated.on_update(Some(s), None, true, "h5", t2);
        assert_eq!(off, RotationState::default());
        let on = off.on_update(None, Some(s), false, "h6", t2);
        assert_eq!(on, RotationState::on_insert(Some(s), "h6", t2));
    }
}
