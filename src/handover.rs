//! In-process hand-over: an ack that makes work runnable claims it, in the same call,
//! for a fetch of this provider that is already waiting for it, and passes it over
//! without another round trip (SQL: `migrations/functions/09_handover.sql`).
//!
//! * An orchestration ack that enqueues activities reserves up to that many waiting
//!   worker fetches whose tag filter and session settings admit one of them; the ack
//!   call claims one item per reserved fetch with the worker fetch's own claim
//!   (`claim_worker_item`: lease, attempt count, session ownership).
//! * A worker ack whose completion goes to an instance, and a client enqueue of an
//!   item visible now (a start, an event, a cancel), reserve one waiting orchestration
//!   fetch ([`TurnOffer`]); the call claims that instance's turn when it is claimable
//!   now, with the fetch's lease length and capability filter (`claim_instance`), and on
//!   the procedure path reads the turn too. On the hybrid path the fetch then runs its
//!   concurrent reads.
//!
//! Only fetches already waiting (after an empty claim of their own, not while claiming)
//! are reserved, one item each; a reserved fetch does not claim on its own until the
//! ack's reply settles the reservation. When the fetch is gone (its future dropped or its
//! poll timeout over) by the time the reply arrives, the item's lease is released at once
//! and its attempt is not counted (abandon with ignore-attempt). What a fetch returns is
//! the same whichever way the item came, so renew, abandon, poison and lock expiry behave
//! alike.
//! `ProviderOptions::handover` (`DUROXIDE_PG_HANDOVER`) turns it off; it needs long
//! polling (without it no fetch ever waits).

use std::sync::{Arc, Mutex, PoisonError};

use duroxide::providers::WorkItem;

use crate::history_cache::Held;
use crate::notify::{Interest, Queue, Waiter};
use crate::provider::{PostgresProvider, TRACING_TARGET};
use crate::sql_fn::Args;
use crate::turn::{Claim, ClaimArgs, TurnData, TurnRows};

/// What a waiting fetch needs to have work claimed for it.
#[derive(Debug, Clone)]
pub(crate) enum ClaimSpec {
    /// A worker fetch: its lease and session lease lengths (tag filter and session owner
    /// are in the [`Interest`]).
    Work {
        lock_timeout_ms: i64,
        session_lock_timeout_ms: i64,
    },
    /// An orchestration fetch: its claim arguments (lease, capability filter).
    Turn(Arc<ClaimArgs>),
}

/// Work claimed by an ack for a waiting fetch.
pub(crate) enum Handed {
    /// A worker item, as `fetch_work_item` returns it.
    Work(Box<(WorkItem, String, u32)>),
    /// A whole turn (procedure path).
    Turn(Box<TurnRows>),
    /// A claimed turn whose reads the fetch runs (hybrid path).
    Claim(Claim),
}

impl Handed {
    fn queue(&self) -> Queue {
        match self {
            Handed::Work(_) => Queue::Worker,
            Handed::Turn(_) | Handed::Claim(_) => Queue::Orchestrator,
        }
    }
}

#[derive(Default)]
enum State {
    /// Claiming on its own: not reserved (it might claim something itself and then
    /// have to give a handed item back).
    #[default]
    Claiming,
    /// Waiting after an empty claim: may be reserved.
    Open,
    /// An ack in flight may hand it something: it does not claim on its own meanwhile.
    Reserved,
    Delivered(Handed),
    /// The fetch returned or was dropped: nothing can be handed to it any more.
    Closed,
}

/// A waiting fetch's hand-over state.
#[derive(Default)]
pub(crate) struct Slot(Mutex<State>);

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn try_reserve(&self) -> bool {
        let mut s = self.state();
        if matches!(*s, State::Open) {
            *s = State::Reserved;
            true
        } else {
            false
        }
    }

    /// Before a claim of its own: false when an ack has reserved the fetch (it waits
    /// for the reply instead) or handed it something.
    pub(crate) fn try_start_claim(&self) -> bool {
        let mut s = self.state();
        match *s {
            State::Open | State::Claiming => {
                *s = State::Claiming;
                true
            }
            _ => false,
        }
    }

    /// After an empty claim: the fetch waits and may be reserved.
    pub(crate) fn open(&self) {
        let mut s = self.state();
        if matches!(*s, State::Claiming) {
            *s = State::Open;
        }
    }

    pub(crate) fn is_reserved(&self) -> bool {
        matches!(*self.state(), State::Reserved)
    }

    pub(crate) fn has_delivered(&self) -> bool {
        matches!(*self.state(), State::Delivered(_))
    }

    /// Takes a delivered item; the slot is closed (the fetch returns with it).
    pub(crate) fn take(&self) -> Option<Handed> {
        let mut s = self.state();
        match std::mem::take(&mut *s) {
            State::Delivered(h) => {
                *s = State::Closed;
                Some(h)
            }
            other => {
                *s = other;
                None
            }
        }
    }

    /// Closes the slot; returns an item delivered and not taken (to be released).
    pub(crate) fn close(&self) -> Option<Handed> {
        match std::mem::replace(&mut *self.state(), State::Closed) {
            State::Delivered(h) => Some(h),
            _ => None,
        }
    }

    fn deliver(&self, h: Handed) -> Result<(), Handed> {
        let mut s = self.state();
        if matches!(*s, State::Reserved) {
            *s = State::Delivered(h);
            Ok(())
        } else {
            Err(h)
        }
    }

    fn cancel(&self) {
        let mut s = self.state();
        if matches!(*s, State::Reserved) {
            *s = State::Open;
        }
    }
}

/// A waiting fetch reserved by an ack. Dropped without delivering, the reservation is
/// cancelled and the fetch carries on (claiming if it was woken meanwhile).
pub(crate) struct Reservation {
    pub(crate) waiter: Arc<Waiter>,
}

impl Reservation {
    pub(crate) fn interest(&self) -> &Interest {
        self.waiter.interest()
    }

    /// Hands `h` to the fetch; gives it back when the fetch is gone.
    fn deliver(self, h: Handed) -> Result<(), Handed> {
        let r = self.waiter.slot().deliver(h);
        // Drop wakes the fetch (and cancels nothing: the slot is no longer reserved).
        drop(self);
        r
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.waiter.slot().cancel();
        self.waiter.notify().notify_one();
    }
}

/// Closes a fetch's slot when the fetch ends, however it ends (returned, failed or
/// dropped), releasing an item delivered and not taken.
pub(crate) struct SlotGuard<'a> {
    pub(crate) provider: &'a PostgresProvider,
    pub(crate) waiter: &'a Waiter,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.waiter.slot().close() {
            self.provider.release_handed_later(h);
        }
    }
}

/// A waiting orchestration fetch reserved by a call that makes an instance runnable
/// (a worker ack, a client enqueue), and what the call sends to claim the turn for it:
/// the `p_turn_lock_token` .. `p_history_guard` arguments of `ack_work_item_handover`
/// and `enqueue_orchestrator_handover`.
pub(crate) struct TurnOffer {
    reservation: Reservation,
    args: Arc<ClaimArgs>,
    token: String,
    read_turn: bool,
    held: Option<Held>,
}

impl TurnOffer {
    /// Binds the offer's arguments, or the values that claim nothing when there is none.
    pub(crate) fn bind(offer: Option<&Self>, args: Args) -> Args {
        let claim = offer.map_or(&ClaimArgs::NONE, |o| o.args.as_ref());
        let held = offer.and_then(|o| o.held.as_ref());
        claim
            .bind_to(args.bind("p_turn_lock_token", offer.map(|o| o.token.as_str())))
            .bind("p_read_turn", offer.is_some_and(|o| o.read_turn))
            .bind("p_history_execution_id", held.map(|h| h.execution_id))
            .bind("p_history_after_event_id", held.map(|h| h.last_event_id))
            .bind("p_history_guard", held.map(|h| h.guard))
    }
}

impl PostgresProvider {
    /// Reserves a waiting orchestration fetch for `instance`'s next turn, when hand-over
    /// is on and one waits. `execution_id`: the execution the caller knows the instance
    /// to be on (its cached history is sent for an incremental read), `None` for any.
    /// `read_turn`: the call reads the claimed turn too (the procedure path, and a start
    /// on either path); otherwise the hybrid fetch runs its concurrent reads.
    pub(crate) fn offer_turn(
        &self,
        instance: &str,
        execution_id: Option<i64>,
        read_turn: bool,
    ) -> Option<TurnOffer> {
        if !self.handover_enabled() {
            return None;
        }
        let reservation = self.inner.notifier.reserve_turn_waiter()?;
        let args = match &reservation.interest().claim {
            Some(ClaimSpec::Turn(a)) => a.clone(),
            _ => return None,
        };
        let cache = &self.inner.history_cache;
        let held = match execution_id {
            _ if !read_turn => None,
            Some(e) => cache.held(instance, e),
            None => cache.held_any(instance),
        };
        Some(TurnOffer {
            reservation,
            args,
            token: format!("lock_{}", uuid::Uuid::new_v4()),
            read_turn,
            held,
        })
    }

    /// Hands the turn the call claimed (`execution_id` not NULL) to the reserved fetch,
    /// with its data on the procedure path; a turn whose data is inconsistent is
    /// released. Nothing claimed: the reservation is dropped and the fetch carries on.
    pub(crate) async fn settle_turn_offer(
        &self,
        offer: TurnOffer,
        instance: &str,
        execution_id: Option<i64>,
        attempt_count: Option<i32>,
        turn: TurnData,
        operation: &str,
    ) {
        let Some(execution_id) = execution_id else {
            return;
        };
        let mut claim = Claim {
            instance: instance.to_string(),
            lock_token: offer.token,
            execution_id,
            attempt_count: attempt_count.unwrap_or(1),
            batch: None,
        };
        if !offer.read_turn {
            claim.batch = turn.claimed_batch();
            self.hand_over(offer.reservation, Handed::Claim(claim));
            return;
        }
        match turn.into_turn_rows(claim, offer.held.as_ref()) {
            Ok(rows) => {
                self.hand_over(offer.reservation, Handed::Turn(Box::new(rows)));
            }
            Err((claim, e)) => {
                drop(offer.reservation);
                tracing::warn!(
                    target: TRACING_TARGET,
                    operation,
                    instance = %claim.instance,
                    error = %e,
                    "handed-over turn is inconsistent; released"
                );
                self.release_claim(&claim.lock_token, &claim.instance).await;
            }
        }
    }

    /// Whether acks look for waiting fetches.
    pub(crate) fn handover_enabled(&self) -> bool {
        self.inner.handover && self.inner.long_poll
    }

    /// Hands `h` to a reserved fetch, or releases it (attempt not counted) when the
    /// fetch is gone; true when handed.
    pub(crate) fn hand_over(&self, reservation: Reservation, h: Handed) -> bool {
        let queue = h.queue();
        match reservation.deliver(h) {
            Ok(()) => {
                metrics::counter!("duroxide_pg_handovers_total", "queue" => queue.sql_name())
                    .increment(1);
                true
            }
            Err(h) => {
                self.release_handed_later(h);
                false
            }
        }
    }

    /// Releases a handed item nobody took, in the background (callers may be in `Drop`).
    pub(crate) fn release_handed_later(&self, h: Handed) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (process ending): the lease runs out on its own.
            return;
        };
        let p = self.clone();
        rt.spawn(async move { p.release_handed(h).await });
    }

    /// Gives a handed item back at once: lease dropped, attempt not counted.
    pub(crate) async fn release_handed(&self, h: Handed) {
        let queue = h.queue();
        metrics::counter!("duroxide_pg_handovers_released_total", "queue" => queue.sql_name())
            .increment(1);
        let released = match h {
            Handed::Work(w) => self.abandon_work(&w.1, None, true).await.map(|_| ()),
            Handed::Turn(rows) => {
                self.release_claim(&rows.claim.lock_token, &rows.claim.instance)
                    .await;
                Ok(())
            }
            Handed::Claim(c) => {
                self.release_claim(&c.lock_token, &c.instance).await;
                Ok(())
            }
        };
        if let Err(e) = released {
            tracing::warn!(
                target: TRACING_TARGET,
                error = %e,
                "could not release a handed-over work item nobody took; its lease will expire"
            );
        }
    }
}
