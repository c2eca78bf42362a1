use std::fmt;

/// The fixed set of condition reasons; also the only values of the `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Synced,
    Suspended,
    Deleting,
    SecretNotFound,
    SecretKeyNotFound,
    InvalidCredential,
    InvalidSpec,
    BackendNotFound,
    BackendNotReady,
    BackendAuthFailed,
    BackendRejected,
    BackendUnavailable,
    AlreadyExists,
    RotationFailed,
    RotationOverdue,
    ConnectionTestFailed,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::Synced,
        Reason::Suspended,
        Reason::Deleting,
        Reason::SecretNotFound,
        Reason::SecretKeyNotFound,
        Reason::InvalidCredential,
        Reason::InvalidSpec,
        Reason::BackendNotFound,
        Reason::BackendNotReady,
        Reason::BackendAuthFailed,
        Reason::BackendRejected,
        Reason::BackendUnavailable,
        Reason::AlreadyExists,
        Reason::RotationFailed,
        Reason::RotationOverdue,
        Reason::ConnectionTestFailed,
    ];

    /// The reason a condition carries, if it is one of ours.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Synced => "Synced",
            Reason::Suspended => "Suspended",
            Reason::Deleting => "Deleting",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyNotFound => "SecretKeyNotFound",
            Reason::InvalidCredential => "InvalidCredential",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::BackendNotFound => "BackendNotFound",
            Reason::BackendNotReady => "BackendNotReady",
            Reason::BackendAuthFailed => "BackendAuthFailed",
            Reason::BackendRejected => "BackendRejected",
            Reason::BackendUnavailable => "BackendUnavailable",
            Reason::AlreadyExists => "AlreadyExists",
            Reason::RotationFailed => "RotationFailed",
            Reason::RotationOverdue => "RotationOverdue",
            Reason::ConnectionTestFailed => "ConnectionTestFailed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
