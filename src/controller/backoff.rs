//! Per-object exponential backoff with jitter (kube-runtime has none per object): 1 s doubling
//! to 5 min, at least the backend's `Retry-After`, reset on success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

const BASE: Duration = Duration::from_secs(1);
const CAP: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Backoff {
    attempts: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// The delay before the next attempt for `key`, counting this failure.
    pub fn next(&self, key: &str, retry_after: Option<Duration>) -> Duration {
        let attempt = {
            let mut attempts = self.attempts.lock().expect("backoff lock");
            let n = attempts.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let exp = BASE.saturating_mul(1u32 << (attempt - 1).min(16)).min(CAP);
        // Full jitter in the upper half keeps retries spread without making them much shorter.
        let jittered = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
        jittered.max(retry_after.unwrap_or_default())
    }

    pub fn reset(&self, key: &str) {
        self.attempts.lock().expect("backoff lock").remove(key);
    }
}

/// `d` spread by up to ±10%, so periodic checks of many objects do not line up.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..=1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_honours_retry_after_and_resets() {
        let b = Backoff::default();
        let delays: Vec<Duration> = (0..12).map(|_| b.next("x", None)).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= BASE);
        assert!(delays[3] >= Duration::from_secs(4) && delays[3] <= Duration::from_secs(8));
        assert!(delays.iter().all(|d| *d <= CAP));
        assert!(delays[11] >= CAP / 2);
        assert!(b.next("y", Some(Duration::from_secs(42))) >= Duration::from_secs(42));
        b.reset("x");
        assert!(b.next("x", None) <= BASE);
    }
}
