//! Schedules and intervals as the API writes them: a connection's rotation schedule and the
//! duration syntax of `refreshInterval` (also used by the operator's flags).

use std::time::Duration;

/// Rotation schedule as the spec asks for it (only present when rotation is enabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationSchedule {
    pub interval_days: u16,
    pub hours: u8,
    pub minutes: u8,
}

/// Parses `1h30m`, `10m`, `45s`, `500ms`: the `refreshInterval` pattern of the CRD.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(value), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(value), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(value * 60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(value * 3600), 1)
        } else {
            return None;
        };
        total += unit;
        rest = &rest[len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration("m"), None);
    }
}
