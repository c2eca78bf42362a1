//! A client-side rate limit per backend: a token bucket (`requestsPerSecond` sustained, `burst` at
//! once) and a "not before" gate, so a `Retry-After` from the backend pauses every request to it,
//! not only the one that was refused.
//!
//! The bucket is kept as a GCRA "theoretical arrival time": each caller reserves the next free
//! slot under the lock and sleeps until it outside the lock, so waiters are served in order
//! without polling.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

/// `(requests per second, burst)` of a backend resource's `rateLimit`, else `default`. A
/// limit without a burst allows a burst of one second's worth.
pub fn rate(limit: Option<crate::crd::RateLimit>, default: (u32, u32)) -> (u32, u32) {
    match limit {
        Some(limit) => {
            let rps = limit.requests_per_second.clamp(1, 10_000) as u32;
            (rps, limit.burst.map_or(rps, |b| b.clamp(1, 10_000) as u32))
        }
        None => default,
    }
}

/// A token bucket with a pause gate, shared by every request to one backend.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained rate a burst may run: `(burst - 1) * interval`.
    tolerance: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the bucket would be full again if every reserved request had gone at the rate.
    theoretical_arrival: Instant,
    /// No request goes before this instant (a `Retry-After`).
    not_before: Instant,
}

impl RateLimiter {
    /// `rps` requests per second sustained, `burst` at once; both at least 1.
    pub fn new(rps: u32, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / f64::from(rps.max(1)));
        let tolerance = interval * (burst.max(1) - 1);
        let now = Instant::now();
        Self {
            interval,
            tolerance,
            state: Mutex::new(State {
                theoretical_arrival: now,
                not_before: now,
            }),
        }
    }

    /// Waits until one request may go.
    pub async fn acquire(&self) {
        loop {
            let slot = self.reserve(Instant::now());
            sleep_until(slot).await;
            // A pause that began while this caller slept covers its slot: queue behind it.
            if self.lock().not_before <= slot {
                return;
            }
        }
    }

    /// Holds every request back until `delay` from now has passed. After the pause, requests
    /// resume at the sustained rate rather than as a burst, so the backend is not hit again at
    /// once by everything that queued up.
    pub fn pause_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut state = self.lock();
        if until > state.not_before {
            state.not_before = until;
            state.theoretical_arrival = state.theoretical_arrival.max(until + self.tolerance);
        }
    }

    /// The end of the current pause, if one is running.
    pub fn paused_until(&self) -> Option<Instant> {
        let not_before = self.lock().not_before;
        (not_before > Instant::now()).then_some(not_before)
    }

    fn reserve(&self, now: Instant) -> Instant {
        let mut state = self.lock();
        let start = now.max(state.not_before);
        let earliest = state
            .theoretical_arrival
            .checked_sub(self.tolerance)
            .unwrap_or(start);
        let slot = start.max(earliest);
        state.theoretical_arrival = state.theoretical_arrival.max(slot) + self.interval;
        slot
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two instants, valid after any panic: keep going with it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Starts `n` acquires at once and returns when each got through, relative to the start.
    async fn acquire_times(limiter: Arc<RateLimiter>, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.acquire().await;
                    start.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times.sort();
        times
    }

    #[tokio::test]
    async fn burst_goes_at_once_then_the_sustained_rate() {
        let times = acquire_times(Arc::new(RateLimiter::new(20, 5)), 15).await;
        // Five at once, then ten more at 50 ms apart: the last at about 500 ms.
        assert!(times[4] < Duration::from_millis(30), "{times:?}");
        assert!(times[5] >= Duration::from_millis(45), "{times:?}");
        assert!(times[14] >= Duration::from_millis(495), "{times:?}");
        assert!(times[14] < Duration::from_millis(800), "{times:?}");
        for pair in times[5..].windows(2) {
            // Each sleeper wakes at its own reserved slot; allow scheduler jitter only upwards.
            assert!(pair[1] + Duration::from_millis(5) >= pair[0] + Duration::from_millis(45));
        }
    }

    #[tokio::test]
    async fn burst_of_one_spaces_every_request() {
        let times = acquire_times(Arc::new(RateLimiter::new(50, 1)), 6).await;
        assert!(times[5] >= Duration::from_millis(100), "{times:?}");
    }

    #[tokio::test]
    async fn a_pause_holds_every_request_back_and_resumes_at_the_rate() {
        let limiter = Arc::new(RateLimiter::new(100, 10));
        limiter.pause_for(Duration::from_millis(300));
        assert!(limiter.paused_until().is_some());
        let times = acquire_times(limiter.clone(), 4).await;
        assert!(times[0] >= Duration::from_millis(295), "{times:?}");
        // No burst after a pause: 10 ms apart.
        assert!(
            times[3] >= times[0] + Duration::from_millis(29),
            "{times:?}"
        );
        assert!(limiter.paused_until().is_none());
    }

    #[tokio::test]
    async fn a_pause_that_starts_while_waiting_moves_the_waiter_behind_it() {
        let limiter = Arc::new(RateLimiter::new(10, 1));
        limiter.acquire().await;
        let start = Instant::now();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                // Reserved for ~100 ms from now.
                limiter.acquire().await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        limiter.pause_for(Duration::from_millis(250));
        let went = waiter.await.unwrap();
        assert!(went >= Duration::from_millis(265), "{went:?}");
    }
}
