//! A client-side rate limit per backend: a token bucket (`requestsPerSecond` sustained, `burst` at
//! once), a "not before" gate, so a `Retry-After` from the backend pauses every request to it,
//! not only the one that was refused, and adaptive pacing (AIMD): a throttled answer halves the
//! rate, down to a floor, and the rate climbs back while no throttle comes, quickly up to just
//! below the rate that was throttled, then slowly, up to the configured rate, which stays the
//! ceiling. A server's limit below the ceiling is so found and kept to, with few 429s.
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

/// The lowest rate a backend is slowed to: `rateLimit.minRequestsPerSecond`, else a tenth of
/// the ceiling (at least one request every ten seconds).
pub fn floor(limit: Option<crate::crd::RateLimit>, ceiling: u32) -> f64 {
    let default = (f64::from(ceiling) / 10.0).max(0.1);
    limit
        .and_then(|l| l.min_requests_per_second)
        .filter(|f| f.is_finite() && *f > 0.0)
        .map_or(default, |f| f.min(f64::from(ceiling)))
}

/// How fast the rate climbs back while no throttle comes, as shares of the ceiling per second:
/// quickly up to the threshold (just below the rate a throttle answered), slowly beyond it.
const FAST_RECOVERY: f64 = 0.2;
const SLOW_RECOVERY: f64 = 0.02;
/// Share of the throttled rate below which climbing back is quick.
const THRESHOLD: f64 = 0.9;

/// A token bucket with a pause gate and adaptive pacing, shared by every request to one backend.
#[derive(Debug)]
pub struct RateLimiter {
    /// The configured rate: never exceeded.
    ceiling: f64,
    floor: f64,
    burst: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the bucket would be full again if every reserved request had gone at the rate.
    theoretical_arrival: Instant,
    /// No request goes before this instant (a `Retry-After`).
    not_before: Instant,
    /// The rate now, between the floor and the ceiling.
    rate: f64,
    /// Up to here the rate climbs back quickly: just below the last rate a throttle answered.
    threshold: f64,
    /// When `rate` was last set: recovery counts from here.
    rate_since: Instant,
    /// Throttles until this instant were answers to requests sent before the last decrease:
    /// they do not decrease the rate again.
    decreased_until: Instant,
}

impl RateLimiter {
    /// `rps` requests per second sustained, `burst` at once; both at least 1. The floor is a
    /// tenth of `rps`.
    pub fn new(rps: u32, burst: u32) -> Self {
        let ceiling = f64::from(rps.max(1));
        Self::with_floor(rps, burst, (ceiling / 10.0).max(0.1))
    }

    /// Like [`RateLimiter::new`] with the lowest rate that throttling may slow it to.
    pub fn with_floor(rps: u32, burst: u32, floor: f64) -> Self {
        let ceiling = f64::from(rps.max(1));
        let now = Instant::now();
        Self {
            ceiling,
            floor: floor.clamp(0.001, ceiling),
            burst: burst.max(1),
            state: Mutex::new(State {
                theoretical_arrival: now,
                not_before: now,
                rate: ceiling,
                threshold: ceiling,
                rate_since: now,
                decreased_until: now,
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

    /// Waits until one request may go, ahead of those already waiting: for the rare request
    /// every waiter needs first (a login). It still waits for a pause, and keeps its distance:
    /// a waiter whose slot falls within one interval after it queues again behind it.
    pub async fn acquire_first(&self) {
        loop {
            let (slot, kept_clear) = {
                let mut state = self.lock();
                let now = Instant::now();
                let slot = now.max(state.not_before);
                let interval = self.interval_at(self.current(&state, now));
                state.not_before = slot + interval;
                state.theoretical_arrival = state.theoretical_arrival.max(slot + interval);
                (slot, slot + interval)
            };
            sleep_until(slot).await;
            // Only a pause that began while this caller slept (beyond the gap it keeps clear
            // itself) sends it back.
            if self.lock().not_before <= kept_clear {
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
            let tolerance = self.tolerance(&state);
            state.theoretical_arrival = state.theoretical_arrival.max(until + tolerance);
        }
    }

    /// The backend throttled a request: pause for `delay` and halve the rate (down to the
    /// floor). The throttles that answer requests already on their way when the rate was cut
    /// do not cut it again: one decrease per pause.
    pub fn throttled(&self, delay: Duration) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            if now >= state.decreased_until {
                let rate = self.current(&state, now);
                state.threshold = (rate * THRESHOLD).max(self.floor);
                state.rate = (rate / 2.0).max(self.floor);
                state.rate_since = now;
                state.decreased_until = now + delay.max(self.interval_at(state.rate));
            }
        }
        self.pause_for(delay);
    }

    /// The end of the current pause, if one is running.
    pub fn paused_until(&self) -> Option<Instant> {
        let not_before = self.lock().not_before;
        (not_before > Instant::now()).then_some(not_before)
    }

    /// The rate requests go at now, in requests per second.
    pub fn current_rate(&self) -> f64 {
        let state = self.lock();
        self.current(&state, Instant::now())
    }

    /// The rate after the recovery since the last change.
    fn current(&self, state: &State, now: Instant) -> f64 {
        let elapsed = now
            .saturating_duration_since(state.rate_since)
            .as_secs_f64();
        let (fast, slow) = (FAST_RECOVERY * self.ceiling, SLOW_RECOVERY * self.ceiling);
        let to_threshold = ((state.threshold - state.rate) / fast).max(0.0);
        let rate = if elapsed <= to_threshold {
            state.rate + fast * elapsed
        } else {
            state.rate.max(state.threshold) + slow * (elapsed - to_threshold)
        };
        rate.min(self.ceiling)
    }

    fn interval_at(&self, rate: f64) -> Duration {
        Duration::from_secs_f64(1.0 / rate)
    }

    /// How far ahead of the rate a burst may run: none while the rate recovers.
    fn tolerance(&self, state: &State) -> Duration {
        if state.rate < self.ceiling {
            Duration::ZERO
        } else {
            self.interval_at(self.ceiling) * (self.burst - 1)
        }
    }

    fn reserve(&self, now: Instant) -> Instant {
        let mut state = self.lock();
        let rate = self.current(&state, now);
        if rate >= self.ceiling && state.rate < self.ceiling {
            // Fully recovered: bursts are allowed again.
            state.rate = self.ceiling;
            state.threshold = self.ceiling;
            state.rate_since = now;
        }
        let interval = self.interval_at(rate);
        let tolerance = self.tolerance(&state);
        let start = now.max(state.not_before);
        let earliest = state
            .theoretical_arrival
            .checked_sub(tolerance)
            .unwrap_or(start);
        let slot = start.max(earliest);
        state.theoretical_arrival = state.theoretical_arrival.max(slot) + interval;
        slot
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is instants and a rate, valid after any panic: keep going with it.
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

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
    async fn burst_of_one_spaces_every_request() {
        let times = acquire_times(Arc::new(RateLimiter::new(50, 1)), 6).await;
        assert!(times[5] >= Duration::from_millis(100), "{times:?}");
    }

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
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

    // Time is paused in these tests: sleeps advance the clock exactly, so timing is checked
    // exactly whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn a_throttle_halves_the_rate_once_per_pause_and_it_climbs_back() {
        let limiter = RateLimiter::with_floor(10, 20, 1.0);
        assert_eq!(limiter.current_rate(), 10.0);
        limiter.throttled(Duration::from_secs(1));
        assert_eq!(limiter.current_rate(), 5.0);
        // Answers to requests already sent: the same pause, no second cut.
        limiter.throttled(Duration::from_secs(1));
        limiter.throttled(Duration::from_secs(1));
        assert_eq!(limiter.current_rate(), 5.0);
        // Quickly (+2/s) back to 9, just below the rate that was throttled...
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!((limiter.current_rate() - 7.0).abs() < 1e-9);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // ...then slowly (+0.2/s): 9 at 2 s, 9.2 at 3 s.
        assert!((limiter.current_rate() - 9.2).abs() < 1e-9);
        // A throttle after the pause cuts again: from 9.2 to 4.6, quick up to 8.28.
        limiter.throttled(Duration::from_secs(1));
        assert!((limiter.current_rate() - 4.6).abs() < 1e-9);
        // Down to the floor and no lower.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            limiter.throttled(Duration::from_secs(1));
        }
        let low = limiter.current_rate();
        assert!((1.0..2.0).contains(&low), "{low}");
        // Back to the ceiling, never above it.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(limiter.current_rate(), 10.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_goes_first_keeps_its_distance_from_the_queue() {
        let limiter = Arc::new(RateLimiter::with_floor(10, 1, 1.0));
        let start = Instant::now();
        let queued: Vec<_> = (0..3)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.acquire().await;
                    start.elapsed()
                })
            })
            .collect();
        // The queue holds slots at 0, 100 and 200 ms; the first request comes at 50 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
        limiter.acquire_first().await;
        let first = start.elapsed();
        assert_eq!(first, Duration::from_millis(50), "not behind the queue");
        let mut times = Vec::new();
        for task in queued {
            times.push(task.await.unwrap());
        }
        times.push(first);
        times.sort();
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(50), "{times:?}");
        }
        assert!(
            times
                .iter()
                .filter(|t| **t > first)
                .all(|t| *t >= first + Duration::from_millis(100)),
            "nothing within one interval after it: {times:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn while_recovering_requests_are_spaced_without_bursts() {
        let limiter = Arc::new(RateLimiter::with_floor(10, 20, 1.0));
        limiter.throttled(Duration::from_millis(500));
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..5 {
            limiter.acquire().await;
            times.push(start.elapsed());
        }
        // After the pause, at 5 to 7 a second as the rate climbs: no burst of 20.
        assert!(times[0] >= Duration::from_millis(500), "{times:?}");
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(140), "{times:?}");
        }
    }

    #[test]
    fn the_floor_comes_from_the_spec_or_a_tenth_of_the_ceiling() {
        let limit = |min: Option<f64>| crate::crd::RateLimit {
            requests_per_second: 10,
            burst: None,
            min_requests_per_second: min,
        };
        assert_eq!(floor(None, 10), 1.0);
        assert_eq!(floor(None, 1), 0.1);
        assert_eq!(floor(Some(limit(Some(0.5))), 10), 0.5);
        assert_eq!(
            floor(Some(limit(Some(50.0))), 10),
            10.0,
            "never above the ceiling"
        );
        assert_eq!(floor(Some(limit(Some(-1.0))), 10), 1.0);
    }
}
