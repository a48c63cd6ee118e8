//! Long polling: one LISTEN connection per provider, shared by every waiting fetch.
//!
//! A fetch that finds nothing waits for the first of: a notification on its queue's
//! channel (sent by the statements that make work visible), the database's next wake-up
//! time (earliest future `visible_at` or lease expiry, returned by the empty claim itself,
//! so no extra query), the fallback poll interval, or its `poll_timeout`. Then it claims
//! again.
//!
//! * No stampede: a notification carries how many items became visible, and wakes that
//!   many waiters (`Notify::notify_one` each), not all of them.
//! * Cancellation: a waiter dropped after being woken hands its wake-up on
//!   ([`WakeGuard`]), so dropping fetch futures at shutdown never strands work.
//! * Reconnects: while the listener is down nothing is delivered, so after every
//!   (re)connect all waiters are woken to poll once.
//! * Credentials: with a password source, every (re)connect of the LISTEN connection
//!   uses the source's current password (`credentials.rs`).
//! * Lazy: the LISTEN connection is opened by the first fetch that actually waits, so a
//!   provider that only short-polls (tests, tools) never opens it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::{Notify, OnceCell};

use crate::credentials::Credentials;
use crate::provider::TRACING_TARGET;

/// The two queues a fetch can wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queue {
    Orchestrator,
    Worker,
}

impl Queue {
    pub(crate) const fn sql_name(self) -> &'static str {
        match self {
            Queue::Orchestrator => "orchestrator",
            Queue::Worker => "worker",
        }
    }
}

/// Wake-up state shared by all fetches of one provider.
pub(crate) struct Notifier {
    orchestrator: Notify,
    worker: Notify,
    listener: OnceCell<()>,
    credentials: Arc<Credentials>,
}

impl Notifier {
    pub(crate) fn new(credentials: Arc<Credentials>) -> Self {
        Self {
            orchestrator: Notify::new(),
            worker: Notify::new(),
            listener: OnceCell::new(),
            credentials,
        }
    }

    pub(crate) fn queue(&self, q: Queue) -> &Notify {
        match q {
            Queue::Orchestrator => &self.orchestrator,
            Queue::Worker => &self.worker,
        }
    }

    fn wake_all(&self) {
        // notify_waiters wakes the registered waiters; the extra notify_one leaves a
        // permit for a fetch that is between its claim and its wait right now.
        for q in [Queue::Orchestrator, Queue::Worker] {
            self.queue(q).notify_waiters();
            self.queue(q).notify_one();
        }
    }

    /// Starts the listener task once. Failure to start is not an error for the caller:
    /// the waits still end at the fallback interval, so fetches degrade to polling.
    pub(crate) async fn ensure_listening(self: &Arc<Self>, pool: &PgPool, schema_q: &str) {
        let me = Arc::downgrade(self);
        let credentials = self.credentials.clone();
        self.listener
            .get_or_init(|| async move {
                // Failure is logged; the query below then reports what it means.
                let _ = credentials.refresh(pool).await;
                let channels = match sqlx::query_as::<_, (String, String)>(&format!(
                    "SELECT {schema_q}.notify_channel('orchestrator'), {schema_q}.notify_channel('worker')"
                ))
                .fetch_one(pool)
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(target: TRACING_TARGET, error = %e, "cannot resolve notification channels; long polling degrades to the fallback interval");
                        return;
                    }
                };
                // A dedicated single-connection pool: the listener never takes a slot of
                // the provider's pool, and the pool handles its reconnects.
                let listen_pool = PgPoolOptions::new()
                    .max_connections(1)
                    .max_lifetime(None)
                    .idle_timeout(None)
                    .connect_lazy_with((*pool.connect_options()).clone());
                tokio::spawn(listen_loop(me, listen_pool, credentials, channels));
            })
            .await;
    }
}

async fn listen_loop(
    notifier: Weak<Notifier>,
    pool: PgPool,
    credentials: Arc<Credentials>,
    (orch_ch, work_ch): (String, String),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let _ = credentials.refresh(&pool).await;
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(target: TRACING_TARGET, error = %e, "LISTEN connection failed; retrying");
                if !sleep_unless_dropped(&notifier, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // No reconnect inside try_recv: it would use the previous password and wake
        // nobody after re-LISTENing. A lost connection returns Ok(None) and we start over.
        listener.eager_reconnect(false);
        if let Err(e) = listener
            .listen_all([orch_ch.as_str(), work_ch.as_str()])
            .await
        {
            tracing::warn!(target: TRACING_TARGET, error = %e, "LISTEN failed; retrying");
            if !sleep_unless_dropped(&notifier, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(100);
        tracing::debug!(target: TRACING_TARGET, orchestrator = %orch_ch, worker = %work_ch, "listening for work notifications");
        // Anything sent while we were not listening is lost: let every waiter poll once.
        match notifier.upgrade() {
            Some(n) => n.wake_all(),
            None => return,
        }
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                // Re-check regularly whether the provider is gone, so the task and its
                // connection do not outlive it.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if notifier.strong_count() == 0 { return; }
                    continue;
                }
            };
            let Some(n) = notifier.upgrade() else {
                return;
            };
            match received {
                Ok(Some(msg)) => {
                    let queue = if msg.channel() == orch_ch {
                        Queue::Orchestrator
                    } else {
                        Queue::Worker
                    };
                    let count: usize = msg.payload().parse().unwrap_or(1).clamp(1, 64);
                    metrics::counter!("duroxide_pg_notifications_received_total", "queue" => queue.sql_name())
                        .increment(1);
                    for _ in 0..count {
                        n.queue(queue).notify_one();
                    }
                }
                Ok(None) => {
                    // Connection lost. Reconnect from the top (password asked again, LISTEN
                    // again, then every waiter polls once) rather than inside try_recv.
                    tracing::debug!(target: TRACING_TARGET, "LISTEN connection lost; reconnecting");
                    n.wake_all();
                    break;
                }
                Err(e) => {
                    tracing::warn!(target: TRACING_TARGET, error = %e, "LISTEN connection failed; reconnecting");
                    n.wake_all();
                    break;
                }
            }
        }
        if !sleep_unless_dropped(&notifier, backoff).await {
            return;
        }
    }
}

async fn sleep_unless_dropped(notifier: &Weak<Notifier>, d: Duration) -> bool {
    tokio::time::sleep(d).await;
    notifier.strong_count() > 0
}

/// Passes a consumed wake-up on if the waiter is dropped before it could claim.
pub(crate) struct WakeGuard<'a> {
    notify: &'a Notify,
    armed: bool,
}

impl<'a> WakeGuard<'a> {
    pub(crate) fn new(notify: &'a Notify) -> Self {
        Self {
            notify,
            armed: true,
        }
    }

    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for WakeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.notify.notify_one();
        }
    }
}
