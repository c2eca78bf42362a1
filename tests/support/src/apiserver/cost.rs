//! An optional CPU cost per request, so that the server can be made to cost what a real
//! kube-apiserver with etcd costs. Left at zero, the server answers as fast as it can, about ten
//! times faster than a real one for writes: a client that spends CPU of its own then competes
//! for the machine with a server far cheaper than any it will meet.
//!
//! The cost is a fixed amount of work (SHA-256 rounds calibrated once on this machine), not a
//! sleep: on a loaded machine a real server's requests take longer, and so do these.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// CPU work per request, by kind, in microseconds of an unloaded core.
#[derive(Default)]
pub(crate) struct RequestCost {
    write_us: AtomicU64,
    read_us: AtomicU64,
}

impl RequestCost {
    pub(crate) fn set(&self, write: Duration, read: Duration) {
        rounds_per_ms();
        self.write_us
            .store(write.as_micros() as u64, Ordering::Relaxed);
        self.read_us
            .store(read.as_micros() as u64, Ordering::Relaxed);
    }

    /// Spends the cost of one request with `verb` (watches cost nothing here) on a blocking
    /// thread, as a real server spends it on one of its own.
    pub(crate) async fn spend(&self, verb: &str) {
        let us = match verb {
            "create" | "update" | "patch" | "delete" | "deletecollection" => &self.write_us,
            "get" | "list" => &self.read_us,
            _ => return,
        }
        .load(Ordering::Relaxed);
        if us == 0 {
            return;
        }
        let rounds = rounds_per_ms() * us / 1000;
        let _ = tokio::task::spawn_blocking(move || work(rounds)).await;
    }
}

/// SHA-256 rounds an unloaded core does in a millisecond, measured on first use.
fn rounds_per_ms() -> u64 {
    static ROUNDS: OnceLock<u64> = OnceLock::new();
    *ROUNDS.get_or_init(|| {
        let mut best = Duration::MAX;
        const SAMPLE: u64 = 20_000;
        for _ in 0..5 {
            let started = Instant::now();
            work(SAMPLE);
            best = best.min(started.elapsed());
        }
        (SAMPLE as f64 / best.as_secs_f64().max(1e-9) / 1000.0).max(1.0) as u64
    })
}

fn work(rounds: u64) -> [u8; 32] {
    let mut digest = [0u8; 32];
    for _ in 0..rounds {
        digest = Sha256::digest(digest).into();
    }
    std::hint::black_box(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_costs_more_than_a_free_read() {
        let cost = RequestCost::default();
        cost.set(Duration::from_millis(20), Duration::ZERO);
        let started = Instant::now();
        cost.spend("get").await;
        let read = started.elapsed();
        let started = Instant::now();
        cost.spend("patch").await;
        let write = started.elapsed();
        // 20 ms of work takes at least about that long, and a free read next to nothing.
        assert!(write >= Duration::from_millis(10), "{write:?}");
        assert!(read < write, "{read:?} vs {write:?}");
    }
}
