//! Where a store lives: a SQLite file, or a PostgreSQL database named by its URL.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::zeroize::Zeroizing;
use url::Url;

use crate::keys::describe_io;

/// A store's location, as `--store` gives it: `postgres://` or `postgresql://` URLs name a
/// PostgreSQL database, anything else a SQLite file.
#[derive(Clone)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// The URL may hold the password; it is never displayed.
    Postgres(Url),
}

/// A `--store` value or password file that cannot be used. Never holds the password.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("invalid PostgreSQL URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot read the store password file {}: {reason}", path.display())]
    PasswordFile { path: PathBuf, reason: String },
    #[error("{0}")]
    NotPostgres(String),
}

impl StoreLocation {
    pub fn parse(text: &str) -> Result<Self, LocationError> {
        let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
        if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
            return Ok(Self::Sqlite(PathBuf::from(text)));
        }
        let url = Url::parse(text).map_err(|e| LocationError::BadUrl {
            url: redact_text(text),
            reason: e.to_string(),
        })?;
        if url.host_str().is_none_or(str::is_empty) && !url.query_pairs().any(|(k, _)| k == "host")
        {
            return Err(LocationError::BadUrl {
                url: redacted(&url),
                reason: "no host: write postgres://USER@HOST:PORT/DATABASE".into(),
            });
        }
        Ok(Self::Postgres(url))
    }

    /// Sets the PostgreSQL password from the first line of a file (a mounted Secret key).
    pub fn with_password_file(self, path: &Path) -> Result<Self, LocationError> {
        let Self::Postgres(mut url) = self else {
            return Err(LocationError::NotPostgres(
                "a store password file needs a postgres:// store URL".into(),
            ));
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            LocationError::PasswordFile {
                path: path.into(),
                reason: describe_io(&e),
            }
        })?);
        let password = text.lines().next().unwrap_or_default();
        if password.is_empty() {
            return Err(LocationError::PasswordFile {
                path: path.into(),
                reason: "it is empty".into(),
            });
        }
        url.set_password(Some(password))
            .map_err(|()| LocationError::BadUrl {
                url: redacted(&url),
                reason: "this URL cannot carry a password".into(),
            })?;
        Ok(Self::Postgres(url))
    }

    /// The file path, or the URL without its password: for messages and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(path) => path.display().to_string(),
            Self::Postgres(url) => redacted(url),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreLocation({})", self.describe())
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The URL without its password, nor a `password` query parameter.
fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "password" {
                "***".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if !pairs.is_empty() {
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

/// A URL that does not parse: everything between `//` and the last `@` may be credentials.
fn redact_text(text: &str) -> String {
    match (text.find("//"), text.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}***{}", &text[..start + 2], &text[at..])
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_and_paths_are_told_apart() {
        for url in [
            "postgres://appconn@db:5432/appconn",
            "postgresql://appconn@db/appconn?sslmode=require",
            "POSTGRES://db/appconn",
        ] {
            assert!(
                matches!(StoreLocation::parse(url), Ok(StoreLocation::Postgres(_))),
                "{url}"
            );
        }
        for path in ["appconn.db", "/var/lib/appconn/appconn.db", "postgres.db"] {
            assert!(
                matches!(StoreLocation::parse(path), Ok(StoreLocation::Sqlite(_))),
                "{path}"
            );
        }
        let err = StoreLocation::parse("postgres:///appconn").unwrap_err();
        assert!(err.to_string().contains("no host"), "{err}");
    }

    #[test]
    fn the_password_is_never_shown() {
        let canary = "zebra-canary-7781";
        let location = StoreLocation::parse(&format!(
            "postgres://app:{canary}@db/app?password={canary}&sslmode=require"
        ))
        .unwrap();
        let shown = format!("{location} {location:?} {}", location.describe());
        assert!(!shown.contains(canary), "{shown}");
        assert!(shown.contains("sslmode=require"), "{shown}");
        let err =
            StoreLocation::parse(&format!("postgres://app:{canary}@db:99999/app")).unwrap_err();
        assert!(!err.to_string().contains(canary), "{err}");
    }

    #[test]
    fn a_password_file_sets_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cr3t/with@chars\n").unwrap();
        let location = StoreLocation::parse("postgres://app@db/app")
            .unwrap()
            .with_password_file(&file)
            .unwrap();
        let StoreLocation::Postgres(url) = &location else {
            panic!()
        };
        // Percent-encoded in the URL, decoded again by the driver.
        assert_eq!(url.password(), Some("s3cr3t%2Fwith%40chars"));
        assert!(!location.describe().contains("s3cr3t"));
        let err = StoreLocation::parse("appconn.db")
            .unwrap()
            .with_password_file(&file)
            .unwrap_err();
        assert!(
            err.to_string().contains("needs a postgres:// store URL"),
            "{err}"
        );
        let err = StoreLocation::parse("postgres://app@db/app")
            .unwrap()
            .with_password_file(&dir.path().join("missing"))
            .unwrap_err();
        assert!(
            err.to_string().ends_with("no such file or directory"),
            "{err}"
        );
    }
}
