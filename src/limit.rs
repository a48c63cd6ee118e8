//! How many of the pool's connections may run a statement at once: an adaptive limit
//! between a floor and the pool size, set from how long the statements take compared
//! with how long each of them takes at best.
//!
//! Why: a provider's calls are short statements. When the database is near (the same
//! host or region), more of them running at once than the server has cores does not
//! finish more of them per second; it makes each one wait for a CPU or a lock while it
//! holds its connection, and makes the server's work per call grow (measured on a
//! two-core host: a pool of 3 connections ran 1.3× the orchestrations per second of a
//! pool of 10 at about 0.6× the server time per orchestration; BENCHMARKS.md). When the
//! database is far (20–200 ms per round trip), a call spends its time on the wire, and
//! every connection is needed to keep the runtime's dispatchers and the clients moving.
//! A fixed pool size is right for one of the two, so the limit follows what the calls
//! show, as TCP Vegas and adaptive concurrency limiters do: each statement's duration
//! (checkout to reply, on a connection that had prepared it) is compared with the
//! shortest one seen for the same statement lately; when calls take well over their
//! best (queueing in the server), the limit steps down, when they run near it, up.
//! Far from the database the wire time dominates every call, so the ratio stays near 1
//! and the limit at the pool size.
//!
//! The shortest duration per statement is kept over two windows of [`WINDOW`] and then
//! forgotten, so a lasting change (the database moved further away, a bigger machine)
//! is learned within two windows. Only successful calls are counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The limit never goes below this (or the pool size, if smaller): the hybrid fetch
/// runs its reads on separate connections at once, and renewals must find a slot.
pub(crate) const FLOOR: usize = 3;
/// How long a statement's shortest duration is remembered without being seen again
/// (between one and two windows).
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Weight of a new sample in the running mean of best / actual durations.
const SMOOTHING: f64 = 1.0 / 16.0;
/// Below this mean ratio (calls take over 2.5× their best) the limit steps down ...
const STEP_DOWN_BELOW: f64 = 0.4;
/// ... above this one (calls take under 1.5× their best) it steps up.
const STEP_UP_ABOVE: f64 = 0.65;

/// The adaptive limit and what it is computed from.
#[derive(Debug)]
pub(crate) struct AdaptiveLimit {
    floor: usize,
    ceiling: usize,
    limit: usize,
    /// Per statement key: the shortest duration in the current and the previous window.
    best: HashMap<u64, (Duration, Duration)>,
    window_started: Instant,
    /// Running mean of best / actual duration (1 = every call at its best).
    ratio: f64,
    /// Samples since the limit last moved: it moves at most once per `limit` samples,
    /// about once per round of the calls it lets run together.
    since_step: usize,
}

impl AdaptiveLimit {
    /// Starts at the pool size (`ceiling`).
    pub(crate) fn new(ceiling: usize) -> Self {
        let ceiling = ceiling.max(1);
        Self {
            floor: FLOOR.min(ceiling),
            ceiling,
            limit: ceiling,
            best: HashMap::new(),
            window_started: Instant::now(),
            ratio: 1.0,
            since_step: 0,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// A statement (`key`) took `took` at `now`; returns the limit after it.
    pub(crate) fn record(&mut self, key: u64, took: Duration, now: Instant) -> usize {
        if now.duration_since(self.window_started) >= WINDOW {
            self.window_started = now;
            // A statement not seen for a whole window is forgotten; the others start a
            // new window.
            self.best
                .retain(|_, (current, _)| *current != Duration::MAX);
            for (current, previous) in self.best.values_mut() {
                *previous = std::mem::replace(current, Duration::MAX);
            }
        }
        let took = took.max(Duration::from_micros(1));
        let (current, previous) = self
            .best
            .entry(key)
            .or_insert((Duration::MAX, Duration::MAX));
        *current = (*current).min(took);
        let best = (*current).min(*previous);
        let sample = best.as_secs_f64() / took.as_secs_f64();
        self.ratio += (sample - self.ratio) * SMOOTHING;
        self.since_step += 1;
        if self.since_step >= self.limit {
            self.since_step = 0;
            if self.ratio < STEP_DOWN_BELOW && self.limit > self.floor {
                self.limit -= 1;
            } else if self.ratio > STEP_UP_ABOVE && self.limit < self.ceiling {
                self.limit += 1;
            }
        }
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `n` samples of two statements (one twice as long as the other at best),
    /// each `stretch` times its best duration, `step` apart.
    fn feed(l: &mut AdaptiveLimit, now: &mut Instant, n: usize, stretch: f64, step: Duration) {
        for i in 0..n {
            let (key, best) = if i % 2 == 0 { (1, MS) } else { (2, 2 * MS) };
            l.record(key, best.mul_f64(stretch), *now);
            *now += step;
        }
    }

    #[test]
    fn calls_at_their_best_keep_the_limit_at_the_pool_size() {
        let mut l = AdaptiveLimit::new(10);
        let mut now = Instant::now();
        feed(&mut l, &mut now, 1000, 1.0, MS);
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn calls_that_queue_in_the_server_step_the_limit_down_to_the_floor() {
        let mut l = AdaptiveLimit::new(10);
        let mut now = Instant::now();
        feed(&mut l, &mut now, 20, 1.0, MS);
        feed(&mut l, &mut now, 40, 4.0, MS);
        assert!(
            l.limit() < 10 && l.limit() > FLOOR,
            "steps, not a jump: {}",
            l.limit()
        );
        feed(&mut l, &mut now, 1000, 4.0, MS);
        assert_eq!(l.limit(), FLOOR);
    }

    #[test]
    fn the_limit_steps_back_up_when_calls_run_near_their_best_again() {
        let mut l = AdaptiveLimit::new(10);
        let mut now = Instant::now();
        feed(&mut l, &mut now, 20, 1.0, MS);
        feed(&mut l, &mut now, 1000, 4.0, MS);
        assert_eq!(l.limit(), FLOOR);
        feed(&mut l, &mut now, 1000, 1.2, MS);
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn far_from_the_database_jitter_does_not_lower_the_limit() {
        // 20 ms round trips with up to 4 ms of queueing on top.
        let mut l = AdaptiveLimit::new(10);
        let mut now = Instant::now();
        for i in 0..2000u32 {
            let took = 20 * MS + Duration::from_micros(u64::from(i * 7919 % 4000));
            l.record(u64::from(i % 5), took, now);
            now += MS;
        }
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn a_lasting_slowdown_becomes_the_new_best_within_two_windows() {
        // The database moved further away: every call now takes 5× what it did. At
        // first that reads as queueing; once the old bests are forgotten, it does not.
        let mut l = AdaptiveLimit::new(10);
        let mut now = Instant::now();
        feed(&mut l, &mut now, 100, 1.0, MS);
        feed(&mut l, &mut now, 200, 5.0, MS);
        assert!(l.limit() < 10);
        feed(&mut l, &mut now, 2000, 5.0, 2 * WINDOW / 1000);
        feed(&mut l, &mut now, 2000, 5.0, MS);
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn the_floor_is_the_pool_size_when_the_pool_is_smaller() {
        let mut l = AdaptiveLimit::new(2);
        let mut now = Instant::now();
        feed(&mut l, &mut now, 20, 1.0, MS);
        feed(&mut l, &mut now, 1000, 10.0, MS);
        assert_eq!(l.limit(), 2);
        assert_eq!(AdaptiveLimit::new(0).limit(), 1);
    }
}
