//! The connection permits of the provider's pool ([`crate::pool`]), handed out in two
//! lanes: calls of the runtime's dispatchers (fetch, ack, renew, abandon, and the
//! worker's history read before each activity: the turns and activities in progress)
//! before everything else (status reads, client enqueues, admin).
//!
//! Why: one provider usually serves both the runtime and the application's clients. When
//! every connection is busy, a first-come queue makes a dispatcher's claim or ack wait
//! behind whatever client reads arrived first: duroxide's `wait_for_orchestration` polls
//! the history and custom status of every instance a client waits for, so a hundred
//! waiting clients put two reads each in front of every turn. The turns then take longer,
//! the orchestrations finish later, and the clients poll more. With the dispatch lane
//! first, a dispatcher waits only for a connection to come back, never for the queue.
//!
//! Calls of the other lane are not starved: the oldest one is passed over by at most
//! [`MAX_PASSES`] dispatch checkouts in a row. (A bound by count, not by time: after a
//! stall of the database every waiter is old, and the renewals queued during it are the
//! calls that must go first.) With `ProviderOptions::dispatch_lane` off, every call is
//! served in arrival order.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::limit::AdaptiveLimit;

/// The lane a pool checkout waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The runtime's dispatch calls: served first.
    Dispatch,
    /// Everything else.
    Other,
}

tokio::task_local! {
    static LANE: Lane;
}

/// Runs `f` with every pool checkout it makes (the concurrent reads it joins included)
/// in the dispatch lane.
pub(crate) async fn in_dispatch_lane<F: Future>(f: F) -> F::Output {
    LANE.scope(Lane::Dispatch, f).await
}

fn current_lane() -> Lane {
    LANE.try_with(|lane| *lane).unwrap_or(Lane::Other)
}

/// Dispatch checkouts served in a row while a checkout of the other lane waits; the
/// next free connection then goes to the oldest of the other lane.
pub(crate) const MAX_PASSES: u32 = 8;

/// A call holding its slot this long no longer counts against the adaptive limit: it is
/// not a short statement queueing for the server's CPUs (a bulk admin call, a lock wait,
/// a large read), and a few of them must not hold every slot the limit allows. Only
/// the pool size bounds them, as without the limit.
pub(crate) const LONG_CALL: Duration = Duration::from_secs(1);

pub(crate) struct Permits {
    state: Mutex<State>,
}

struct State {
    /// The pool size.
    size: usize,
    /// `false`: one first-come queue (both lanes served in arrival order).
    lanes: bool,
    /// `Some`: at most its limit of the `size` slots are handed out at once
    /// ([`crate::limit`]).
    adaptive: Option<AdaptiveLimit>,
    /// Slots handed out, by permit id: since when.
    held: HashMap<u64, Instant>,
    next_id: u64,
    closed: bool,
    dispatch: VecDeque<Waiter>,
    other: VecDeque<Waiter>,
    /// Dispatch checkouts served in a row while the other lane had a waiter.
    passes: u32,
}

struct Waiter {
    tx: oneshot::Sender<Permit>,
}

/// One connection slot; dropping it hands the slot to the next waiter.
pub(crate) struct Permit {
    permits: Option<Arc<Permits>>,
    id: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(p) = self.permits.take() {
            p.release(self.id);
        }
    }
}

impl Permits {
    /// `n` slots; `adaptive`: fewer of them at once while statements queue in the
    /// server ([`crate::limit`]).
    pub(crate) fn new(n: usize, lanes: bool, adaptive: bool) -> Arc<Self> {
        if adaptive {
            metrics::gauge!("duroxide_pg_pool_limit").set(n as f64);
        }
        Arc::new(Self {
            state: Mutex::new(State {
                size: n,
                lanes,
                adaptive: adaptive.then(|| AdaptiveLimit::new(n)),
                held: HashMap::new(),
                next_id: 0,
                closed: false,
                dispatch: VecDeque::new(),
                other: VecDeque::new(),
                passes: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot, waiting at most `timeout` (`PoolTimedOut`); `PoolClosed` once closed.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> Result<Permit, sqlx::Error> {
        let rx = {
            let mut s = self.lock();
            let lane = if s.lanes { current_lane() } else { Lane::Other };
            if s.closed {
                return Err(sqlx::Error::PoolClosed);
            }
            if s.can_serve(lane, Instant::now()) {
                return Ok(self.grant(&mut s));
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { tx };
            match lane {
                Lane::Dispatch => s.dispatch.push_back(waiter),
                Lane::Other => s.other.push_back(waiter),
            }
            rx
        };
        // A slot sent just as the timeout fires is dropped with the receiver, and its
        // drop passes it on to the next waiter.
        let deadline = Instant::now() + timeout;
        let mut rx = rx;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(sqlx::Error::PoolTimedOut);
            }
            let wait = match self.lock().next_long_call(Instant::now()) {
                Some(after) => left.min(after),
                None => left,
            };
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(Ok(permit)) => return Ok(permit),
                Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
                // Calls may have become long since the last release: serve whoever can
                // go now.
                Err(_) => self.serve(&mut self.lock()),
            }
        }
    }

    fn grant(self: &Arc<Self>, s: &mut State) -> Permit {
        let id = s.next_id;
        s.next_id += 1;
        s.held.insert(id, Instant::now());
        Permit {
            permits: Some(self.clone()),
            id,
        }
    }

    fn release(self: &Arc<Self>, id: u64) {
        let mut s = self.lock();
        s.held.remove(&id);
        self.serve(&mut s);
    }

    /// Hands free slots (within the limit) to waiters.
    fn serve(self: &Arc<Self>, s: &mut State) {
        loop {
            let now = Instant::now();
            let other_ok = s.can_serve(Lane::Other, now);
            if !other_ok && !s.can_serve(Lane::Dispatch, now) {
                return;
            }
            let Some(waiter) = s.next_waiter(other_ok) else {
                return;
            };
            let permit = self.grant(s);
            if let Err(mut unsent) = waiter.tx.send(permit) {
                // That waiter gave up (timed out): the slot goes to the next one.
                // (Disarmed first: its drop would release again under this lock.)
                unsent.permits = None;
                s.held.remove(&unsent.id);
            }
        }
    }

    /// A statement (`key`, a [`crate::pool::statement_key`]) ran in `took` on a
    /// connection that had prepared it: input of the adaptive limit.
    pub(crate) fn record(self: &Arc<Self>, key: u64, took: Duration) {
        let mut s = self.lock();
        let Some(adaptive) = s.adaptive.as_mut() else {
            return;
        };
        let before = adaptive.limit();
        let after = adaptive.record(key, took, Instant::now());
        if after != before {
            metrics::gauge!("duroxide_pg_pool_limit").set(after as f64);
            tracing::debug!(
                target: "duroxide::providers::postgres",
                limit = after,
                "connections running statements at once: {before} -> {after}"
            );
            if after > before {
                self.serve(&mut s);
            }
        }
    }

    /// The number of slots handed out at most at once now.
    #[cfg(test)]
    pub(crate) fn limit(&self) -> usize {
        self.lock().limit()
    }

    /// Refuses new checkouts; waiting ones fail with `PoolClosed`.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.dispatch.clear();
        s.other.clear();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

impl State {
    fn limit(&self) -> usize {
        self.adaptive
            .as_ref()
            .map_or(self.size, AdaptiveLimit::limit)
    }

    /// With the adaptive limit on: when the oldest call that is still short becomes long
    /// and may let a waiter go (at most [`LONG_CALL`] away: the limit may fall below the
    /// pool size meanwhile).
    fn next_long_call(&self, now: Instant) -> Option<Duration> {
        self.adaptive.as_ref()?;
        let oldest_short = self
            .held
            .values()
            .map(|since| LONG_CALL.saturating_sub(now.duration_since(*since)))
            .filter(|left| !left.is_zero())
            .min();
        Some(
            oldest_short
                .unwrap_or(LONG_CALL)
                .max(Duration::from_millis(1)),
        )
    }

    /// Whether a checkout of `lane` may have a slot now: a connection is free, and the
    /// calls running shorter than [`LONG_CALL`] are under the lane's limit.
    fn can_serve(&self, lane: Lane, now: Instant) -> bool {
        if self.held.len() >= self.size {
            return false;
        }
        let limit = self.limit_for(lane);
        if limit >= self.size {
            return true;
        }
        let short = self
            .held
            .values()
            .filter(|since| now.duration_since(**since) < LONG_CALL)
            .count();
        short < limit
    }

    /// How many slots may be in use for a checkout of `lane` to be served. While the
    /// adaptive limit holds the pool below its size, the other lane leaves the last slot
    /// to the dispatch lane: a few slow status reads or admin calls then never hold every
    /// slot a lease renewal could use.
    fn limit_for(&self, lane: Lane) -> usize {
        let limit = self.limit();
        if lane == Lane::Other && self.lanes && limit < self.size {
            limit - 1
        } else {
            limit
        }
    }

    /// The next waiter to serve; `other_ok = false`: only the dispatch lane's.
    fn next_waiter(&mut self, other_ok: bool) -> Option<Waiter> {
        if !other_ok {
            return self.dispatch.pop_front();
        }
        if self.other.is_empty() || self.dispatch.is_empty() {
            self.passes = 0;
            return self.dispatch.pop_front().or_else(|| self.other.pop_front());
        }
        if self.passes >= MAX_PASSES {
            self.passes = 0;
            return self.other.pop_front();
        }
        self.passes += 1;
        self.dispatch.pop_front()
    }
}

/// Instances with an activity this provider's worker fetch handed out whose descriptor
/// read has not come yet. duroxide 0.1.32's worker calls `read(instance)` between the
/// fetch and the activity (for the orchestration's name and version), so that read is
/// on the worker's path as much as the fetch and the ack: it goes in the dispatch lane
/// too. Only a hint for the queue order; what the read returns does not change.
pub(crate) struct DescriptorReads {
    expected: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Expectations older than this are dropped (the runtime did not read, e.g. another
/// duroxide version).
const DESCRIPTOR_READ_WINDOW: Duration = Duration::from_secs(5);
/// Beyond this many instances, expired expectations are dropped before a new one is kept.
const MAX_EXPECTED: usize = 4096;

impl DescriptorReads {
    pub(crate) fn new() -> Self {
        Self {
            expected: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u32, Instant)>> {
        self.expected.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker fetch handed out an activity of `instance`.
    pub(crate) fn expect(&self, instance: &str) {
        let now = Instant::now();
        let mut expected = self.lock();
        if expected.len() >= MAX_EXPECTED {
            expected.retain(|_, (_, at)| now.duration_since(*at) < DESCRIPTOR_READ_WINDOW);
            if expected.len() >= MAX_EXPECTED {
                return;
            }
        }
        let e = expected.entry(instance.to_string()).or_insert((0, now));
        e.0 += 1;
        e.1 = now;
    }

    /// Whether a `read(instance)` now is an expected descriptor read (consumes it).
    pub(crate) fn take(&self, instance: &str) -> bool {
        let mut expected = self.lock();
        let Some((count, at)) = expected.get_mut(instance) else {
            return false;
        };
        let live = at.elapsed() < DESCRIPTOR_READ_WINDOW;
        *count -= 1;
        if *count == 0 || !live {
            expected.remove(instance);
        }
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts a checkout in `lane` as its own task, after the ones started before it; the
    /// task notes its name in `order` when served and gives its slot back at once.
    async fn passing(
        permits: &Arc<Permits>,
        lane: Lane,
        order: &Arc<Mutex<Vec<&'static str>>>,
        name: &'static str,
    ) -> tokio::task::JoinHandle<Result<(), sqlx::Error>> {
        let (p, o) = (permits.clone(), order.clone());
        let handle = tokio::spawn(LANE.scope(lane, async move {
            let permit = p.acquire(Duration::from_secs(5)).await?;
            o.lock().unwrap().push(name);
            drop(permit);
            Ok(())
        }));
        // Let it reach the queue.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        handle
    }

    #[tokio::test]
    async fn a_dispatch_checkout_is_served_before_earlier_other_ones() {
        let permits = Permits::new(1, true, false);
        let held = permits.acquire(Duration::from_secs(1)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let read1 = passing(&permits, Lane::Other, &order, "read1").await;
        let read2 = passing(&permits, Lane::Other, &order, "read2").await;
        let ack = passing(&permits, Lane::Dispatch, &order, "ack").await;
        drop(held);
        for task in [ack, read1, read2] {
            task.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["ack", "read1", "read2"]);
    }

    #[tokio::test]
    async fn without_lanes_checkouts_are_served_in_arrival_order() {
        let permits = Permits::new(1, false, false);
        let held = permits.acquire(Duration::from_secs(1)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let read = passing(&permits, Lane::Other, &order, "read").await;
        let ack = passing(&permits, Lane::Dispatch, &order, "ack").await;
        drop(held);
        read.await.unwrap().unwrap();
        ack.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["read", "ack"]);
    }

    #[tokio::test]
    async fn an_other_checkout_is_passed_over_at_most_max_passes_times_in_a_row() {
        let permits = Permits::new(1, true, false);
        let held = permits.acquire(Duration::from_secs(1)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let read = passing(&permits, Lane::Other, &order, "read").await;
        let mut acks = Vec::new();
        for _ in 0..=MAX_PASSES {
            acks.push(passing(&permits, Lane::Dispatch, &order, "ack").await);
        }
        drop(held);
        read.await.unwrap().unwrap();
        for ack in acks {
            ack.await.unwrap().unwrap();
        }
        let got = order.lock().unwrap().clone();
        let at = got.iter().position(|n| *n == "read").unwrap();
        assert_eq!(at, MAX_PASSES as usize, "{got:?}");
        assert_eq!(got.len(), MAX_PASSES as usize + 2);
    }

    #[tokio::test]
    async fn a_timed_out_waiter_passes_the_slot_on_and_none_is_lost() {
        let permits = Permits::new(2, true, false);
        let a = permits.acquire(Duration::from_secs(1)).await.unwrap();
        let b = permits.acquire(Duration::from_secs(1)).await.unwrap();
        let gave_up = permits.acquire(Duration::from_millis(20)).await;
        assert!(matches!(gave_up, Err(sqlx::Error::PoolTimedOut)));
        let order = Arc::new(Mutex::new(Vec::new()));
        let next = passing(&permits, Lane::Other, &order, "next").await;
        drop(a);
        next.await.unwrap().unwrap();
        drop(b);
        // Both slots are free again: two checkouts succeed at once, a third waits.
        let _x = permits.acquire(Duration::from_millis(10)).await.unwrap();
        let _y = permits.acquire(Duration::from_millis(10)).await.unwrap();
        assert!(matches!(
            permits.acquire(Duration::from_millis(10)).await,
            Err(sqlx::Error::PoolTimedOut)
        ));
    }

    #[tokio::test]
    async fn closing_fails_waiting_and_new_checkouts() {
        let permits = Permits::new(1, true, false);
        let _held = permits.acquire(Duration::from_secs(1)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = passing(&permits, Lane::Dispatch, &order, "w").await;
        permits.close();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(sqlx::Error::PoolClosed)
        ));
        assert!(matches!(
            permits.acquire(Duration::from_secs(1)).await,
            Err(sqlx::Error::PoolClosed)
        ));
        assert!(permits.is_closed());
    }

    /// `n` slots checked out at once in `lane`.
    async fn hold(permits: &Arc<Permits>, lane: Lane, n: usize) -> Vec<Permit> {
        futures::future::try_join_all(
            (0..n).map(|_| LANE.scope(lane, permits.acquire(Duration::from_secs(1)))),
        )
        .await
        .unwrap()
    }

    /// Records statements that take 10× their best (an adaptive limit steps down to its
    /// floor); returns the limit after them.
    fn queueing(permits: &Arc<Permits>) -> usize {
        permits.record(1, Duration::from_micros(100));
        for _ in 0..500 {
            permits.record(1, Duration::from_millis(1));
        }
        permits.limit()
    }

    #[tokio::test]
    async fn an_adaptive_pool_runs_no_more_than_its_limit_and_serves_waiters_when_it_rises() {
        let permits = Permits::new(6, true, true);
        assert_eq!(queueing(&permits), crate::limit::FLOOR);
        let held = hold(&permits, Lane::Dispatch, crate::limit::FLOOR).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let fetch = passing(&permits, Lane::Dispatch, &order, "fetch").await;
        assert!(
            order.lock().unwrap().is_empty(),
            "3 of 6 slots in use: the limit"
        );
        // Calls at their best again: the limit rises and the waiter gets a slot while
        // the others are still held.
        for _ in 0..500 {
            permits.record(1, Duration::from_micros(100));
        }
        assert_eq!(permits.limit(), 6);
        fetch.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["fetch"]);
        drop(held);
    }

    #[tokio::test]
    async fn below_the_pool_size_the_other_lane_leaves_the_last_slot_to_the_dispatch_lane() {
        let permits = Permits::new(6, true, true);
        assert_eq!(queueing(&permits), crate::limit::FLOOR);
        let floor = crate::limit::FLOOR;
        let reads = hold(&permits, Lane::Other, floor - 1).await;
        assert!(
            matches!(
                permits.acquire(Duration::from_millis(20)).await,
                Err(sqlx::Error::PoolTimedOut)
            ),
            "a status read does not take the last slot"
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let read = passing(&permits, Lane::Other, &order, "read").await;
        let renew = passing(&permits, Lane::Dispatch, &order, "renew").await;
        renew.await.unwrap().unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            vec!["renew"],
            "the last slot: dispatch only"
        );
        drop(reads);
        read.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["renew", "read"]);
    }

    #[tokio::test]
    async fn calls_running_longer_than_long_call_do_not_count_against_the_limit() {
        let permits = Permits::new(4, true, true);
        assert_eq!(queueing(&permits), crate::limit::FLOOR);
        let slow = hold(&permits, Lane::Dispatch, crate::limit::FLOOR).await;
        let started = Instant::now();
        let next = LANE
            .scope(Lane::Dispatch, permits.acquire(Duration::from_secs(5)))
            .await
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= LONG_CALL - Duration::from_millis(50)
                && waited < LONG_CALL + Duration::from_millis(500),
            "served once the held calls became long, while they still run: {waited:?}"
        );
        // The pool size still bounds them: every connection is in use.
        assert!(matches!(
            LANE.scope(Lane::Dispatch, permits.acquire(Duration::from_millis(300)))
                .await,
            Err(sqlx::Error::PoolTimedOut)
        ));
        drop((slow, next));
    }

    #[tokio::test]
    async fn without_the_adaptive_limit_every_slot_serves_either_lane() {
        let permits = Permits::new(3, true, false);
        assert_eq!(queueing(&permits), 3, "samples change nothing");
        let all = hold(&permits, Lane::Other, 3).await;
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn a_descriptor_read_is_expected_once_per_fetched_activity() {
        let reads = DescriptorReads::new();
        assert!(!reads.take("i"), "nothing fetched: a status read");
        reads.expect("i");
        reads.expect("i");
        assert!(reads.take("i"));
        assert!(reads.take("i"));
        assert!(!reads.take("i"), "two activities, two descriptor reads");
        assert!(!reads.take("other"));
    }
}
