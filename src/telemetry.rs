//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG`, as JSON lines or plain text.

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset, empty or unparsable. kube's own logs are noisy at
/// info (every watch restart), so they start at warn.
pub const DEFAULT_FILTER: &str = "info,kube=warn";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Plain,
}

/// Installs the global subscriber. A second call (tests start many) leaves the first in place.
pub fn init(format: LogFormat) {
    let (filter, rejected) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(err) => (EnvFilter::new(DEFAULT_FILTER), Some((spec, err))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
    // Said only once the subscriber exists, so the warning itself is not lost.
    if let (Ok(()), Some((spec, err))) = (installed, rejected) {
        tracing::warn!(
            rust_log = %spec,
            error = %err,
            "ignoring invalid RUST_LOG, using {DEFAULT_FILTER}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_twice_is_harmless() {
        init(LogFormat::Json);
        init(LogFormat::Plain);
        tracing::info!("still logging");
    }

    #[test]
    fn default_filter_parses() {
        assert!(EnvFilter::try_new(DEFAULT_FILTER).is_ok());
    }
}
