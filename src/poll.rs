//! The fetch loop shared by both queues and both fetch paths: claim, and if nothing was
//! claimable, wait (see `notify.rs`) and claim again until `poll_timeout`.

use std::future::Future;
use std::time::Duration;

use duroxide::providers::ProviderError;
use tokio::time::Instant;

use crate::notify::{Queue, WakeGuard};
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

/// Database wake-up time relative to the database's own "now".
pub(crate) fn wake_in(now_ms: i64, next_wake_ms: Option<i64>) -> Option<Duration> {
    // +1 ms: visibility is `visible_at <= now`, so waking exactly at the boundary could
    // miss by a rounding step and cost an extra sleep.
    next_wake_ms
        .map(|at| Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0) + 1))
}

impl PostgresProvider {
    pub(crate) async fn poll_until<T, F, Fut>(
        &self,
        queue: Queue,
        poll_timeout: Duration,
        mut attempt: F,
    ) -> Result<Option<T>, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Attempt<T>, ProviderError>>,
    {
        let long = self.inner.long_poll && !poll_timeout.is_zero();
        if !long {
            let claimed = match attempt().await? {
                Attempt::Claimed(t) => Some(t),
                Attempt::Empty { .. } => None,
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
        self.inner
            .notifier
            .ensure_listening(self.pool_ref(), &self.inner.schema_q)
            .await;
        let notify = self.inner.notifier.queue(queue);
        let mut woken: Option<WakeGuard<'_>> = None;
        loop {
            // Registered before the claim, so a notification sent while the claim runs
            // is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let outcome = attempt().await;
            if let Some(guard) = woken.take() {
                guard.disarm();
            }
            let wake_in = match outcome? {
                Attempt::Claimed(t) => {
                    metrics::counter!("duroxide_pg_claims_total", "queue" => queue.sql_name(), "outcome" => "claimed")
                        .increment(1);
                    return Ok(Some(t));
                }
                Attempt::Empty { wake_in } => {
                    metrics::counter!("duroxide_pg_claims_total", "queue" => queue.sql_name(), "outcome" => "empty")
                        .increment(1);
                    wake_in
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut until = deadline.min(now + self.inner.fallback_poll_interval);
            if let Some(w) = wake_in {
                until = until.min(now + w);
            }
            tokio::select! {
                _ = &mut notified => {
                    metrics::counter!("duroxide_pg_long_poll_wakeups_total", "queue" => queue.sql_name(), "reason" => "notify").increment(1);
                    woken = Some(WakeGuard::new(notify));
                }
                _ = tokio::time::sleep_until(until) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    metrics::counter!("duroxide_pg_long_poll_wakeups_total", "queue" => queue.sql_name(), "reason" => "timer").increment(1);
                }
            }
        }
    }
}
