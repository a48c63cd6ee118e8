//! The fetch loop shared by both queues and both fetch paths: claim, and if nothing was
//! claimable, wait (see `notify.rs`) and claim again until `poll_timeout`.

use std::future::Future;
use std::time::Duration;

use duroxide::providers::ProviderError;
use tokio::time::Instant;

use crate::handover::{Handed, SlotGuard};
use crate::notify::Interest;
use crate::provider::PostgresProvider;

/// Outcome of one claim attempt.
pub(crate) enum Attempt<T> {
    Claimed(T),
    /// Nothing claimable. `wake_in`: when the database expects work to become claimable
    /// without a new write (a timer or a lease running out), on its own clock.
    Empty {
        wake_in: Option<Duration>,
    },
}

/// A short poll whose claim says "look again within this" (claimable work held by a
/// claim in flight: `sp_fetch_and_lock` answers now + 10 ms) looks again, at most
/// `SHORT_POLL_RECHECKS` times, instead of returning "no work" at once.
const SHORT_POLL_RECHECK: Duration = Duration::from_millis(20);
const SHORT_POLL_RECHECKS: u32 = 3;

/// Database wake-up time relative to the database's own "now".
pub(crate) fn wake_in(now_ms: i64, next_wake_ms: Option<i64>) -> Option<Duration> {
    // +1 ms: visibility is `visible_at <= now`, so waking exactly at the boundary could
    // miss by a rounding step and cost an extra sleep.
    next_wake_ms
        .map(|at| Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0) + 1))
}

impl PostgresProvider {
    /// Claims until something is claimed or `poll_timeout` ends, waking for items that
    /// `interest` admits (see `notify.rs`). `attempt(None)` claims; `attempt(Some(h))`
    /// turns work an ack handed over (`handover.rs`, when `interest.claim` is set) into
    /// the fetch's result.
    pub(crate) async fn poll_for<T, F, Fut>(
        &self,
        interest: Interest,
        poll_timeout: Duration,
        mut attempt: F,
    ) -> Result<Option<T>, ProviderError>
    where
        F: FnMut(Option<Handed>) -> Fut,
        Fut: Future<Output = Result<Attempt<T>, ProviderError>>,
    {
        let queue = interest.queue;
        let long = self.inner.long_poll && !poll_timeout.is_zero();
        if !long {
            let mut retries = 0;
            let claimed = loop {
                match attempt(None).await? {
                    Attempt::Claimed(t) => break Some(t),
                    // Claimable work that another transaction was claiming (its row was
                    // skipped), or work due within a few milliseconds: look again shortly
                    // instead of answering "no work". The other claim may still roll back
                    // (a caller dropped before its COMMIT), and then this fetch must not
                    // have reported an empty queue.
                    Attempt::Empty { wake_in: Some(w) }
                        if w <= SHORT_POLL_RECHECK && retries < SHORT_POLL_RECHECKS =>
                    {
                        retries += 1;
                        tokio::time::sleep(w).await;
                    }
                    Attempt::Empty { .. } => break None,
                }
            };
            let outcome = if claimed.is_some() {
                "claimed"
            } else {
                "empty"
            };
            metrics::counter!("duroxide_pg_claims_total", "queue" => queue.sql_name(), "outcome" => outcome).increment(1);
            return Ok(claimed);
        }
        let deadline = Instant::now() + poll_timeout;
        if let Some(listen) = &self.inner.listen_connect {
            self.inner
                .notifier
                .ensure_listening(listen, &self.inner.schema_q);
        }
        // Registered before the first claim and for the whole call, so a notification
        // sent while a claim runs is not missed.
        let quiet_key = interest.quiet_key;
        let notifier = &self.inner.notifier;
        let registration = notifier.register(interest);
        let waiter = registration.waiter();
        // After registering: a notification from here on wakes this fetch.
        let mut quiet = quiet_key.and_then(|k| notifier.quiet_until(&k));
        // Whatever way this fetch ends, nothing can be handed to it afterwards, and an
        // item handed and not taken is released.
        let _slot = SlotGuard {
            provider: self,
            waiter,
        };
        loop {
            let notified = waiter.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            if let Some(handed) = waiter.slot().take() {
                // A wake-up this fetch did not act on is handed on when it returns.
                if let Attempt::Claimed(t) = attempt(Some(handed)).await? {
                    return Ok(Some(t));
                }
                continue;
            }
            // Reserved by an ack in flight: no claim of its own until the reply settles
            // it (delivered or cancelled, both wake this fetch).
            let wake_in = if !waiter.slot().try_start_claim() {
                None
            } else if let Some(until) = quiet.take() {
                // The last empty claim's answer still holds (notify.rs, "quiet"): wait
                // as if this fetch had made it, open to hand-overs at once.
                metrics::counter!("duroxide_pg_quiet_waits_total").increment(1);
                waiter.slot().open();
                Some(until.saturating_duration_since(Instant::now()))
            } else {
                let epoch = quiet_key.and_then(|_| notifier.orch_epoch());
                // Acting on the wake-up now; handed on if this future is dropped mid-claim.
                let hand_on = registration.hand_on_guard(waiter.take_pending());
                // A delayed-work time that has passed is served by this claim.
                let _ = waiter.wake_at();
                let outcome = attempt(None).await;
                hand_on.disarm();
                match outcome? {
                    Attempt::Claimed(t) => {
                        metrics::counter!("duroxide_pg_claims_total", "queue" => queue.sql_name(), "outcome" => "claimed")
                            .increment(1);
                        return Ok(Some(t));
                    }
                    Attempt::Empty { wake_in } => {
                        metrics::counter!("duroxide_pg_claims_total", "queue" => queue.sql_name(), "outcome" => "empty")
                            .increment(1);
                        if let Some(key) = quiet_key {
                            let holds = wake_in.map_or(self.inner.fallback_poll_interval, |w| {
                                w.min(self.inner.fallback_poll_interval)
                            });
                            notifier.note_quiet(epoch, key, Instant::now() + holds);
                        }
                        // Waiting from here on: an ack may claim for this fetch.
                        waiter.slot().open();
                        wake_in
                    }
                }
            };
            if waiter.slot().has_delivered() {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut until = deadline.min(now + self.inner.fallback_poll_interval);
            if let Some(w) = wake_in {
                until = until.min(now + w);
            }
            loop {
                // Delayed work announced by `at:` notifications shortens the sleep.
                let sleep_to = waiter.wake_at().map_or(until, |t| t.min(until));
                tokio::select! {
                    _ = &mut notified => {
                        if waiter.slot().has_delivered() {
                            break;
                        }
                        if waiter.has_pending() && !waiter.slot().is_reserved() {
                            metrics::counter!("duroxide_pg_long_poll_wakeups_total", "queue" => queue.sql_name(), "reason" => "notify").increment(1);
                            break;
                        }
                        // Only a new wake-up time: sleep again, to it.
                        notified.set(waiter.notify().notified());
                        notified.as_mut().enable();
                    }
                    _ = tokio::time::sleep_until(sleep_to) => {
                        if Instant::now() >= deadline {
                            return Ok(None);
                        }
                        metrics::counter!("duroxide_pg_long_poll_wakeups_total", "queue" => queue.sql_name(), "reason" => "timer").increment(1);
                        break;
                    }
                }
            }
        }
    }
}
