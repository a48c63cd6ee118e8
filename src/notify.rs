//! Long polling: one LISTEN connection per provider, shared by every waiting fetch.
//!
//! A fetch that finds nothing waits for the first of: a wake-up from a notification on
//! its queue's channel (sent by the statements that make work visible), the database's
//! next wake-up time (earliest future `visible_at` or lease expiry, returned by the empty
//! claim itself), a delayed-visibility notification (`at:`), the fallback poll interval,
//! or its `poll_timeout`. Then it claims again.
//!
//! * Targeted: every waiting fetch registers what it can take ([`Interest`]: queue, tag
//!   filter, session owner). A worker notification says, per item, its tag and session
//!   (`w:` payload, `notify_worker_items`), and wakes a waiter that can take it: one
//!   whose tag filter admits the tag and, for a session item, the local owner of that
//!   session if this provider claimed it recently, else every waiter that may claim a
//!   session. A bare count (the orchestrator queue, or a worker notification from an
//!   older release) wakes that many orchestrator waiters, or every worker waiter (the
//!   items' routing is unknown).
//! * No stampede: an item wakes one waiter that is not already woken.
//! * Delayed work (`at:<visible_ms>,<now_ms>`): every waiter of the queue shortens its
//!   sleep to that time, without a claim now.
//! * Cancellation: a waiter dropped after being woken hands its wake-up on (to another
//!   waiter that can take the same item), so dropping fetch futures at shutdown never
//!   strands work.
//! * Reconnects: while the listener is down nothing is delivered, so after every
//!   (re)connect all waiters are woken to poll once.
//! * Lazy and persistent: the LISTEN task starts with the first fetch that waits, and
//!   retries resolving the channels and listening until it works (a failure at start-up
//!   never leaves the provider deaf).
//! * Quiet orchestrator queue: an empty orchestration claim's answer ("nothing
//!   claimable for this capability filter") holds for as long as a waiting fetch would
//!   rely on it: until an orchestrator notification arrives (every write that makes a
//!   turn claimable sends one, which is what waiting fetches already depend on), the
//!   listener reconnects, the claim's next wake-up time passes or the fallback poll
//!   interval runs out. A fetch that starts while it holds waits without claiming first
//!   ([`Notifier::quiet_until`]): no empty claim, and the fetch is open to hand-overs at
//!   once (a dispatcher back from its ack is then waiting when the activity it scheduled
//!   completes, instead of racing that completion with a claim).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio::time::Instant;

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

/// What a waiting fetch can take.
#[derive(Debug, Clone)]
pub(crate) struct Interest {
    pub queue: Queue,
    /// Worker: tag mode of the claim (0 untagged only, 1 listed tags, 2 untagged and
    /// listed tags, 3 any) and its tags.
    pub tag_mode: i32,
    pub tags: Vec<String>,
    /// Worker: the session owner id when the fetch may claim session items.
    pub session_owner: Option<String>,
    /// What an ack needs to claim work for this fetch (`None`: no hand-over to it).
    pub claim: Option<crate::handover::ClaimSpec>,
    /// Orchestrator: the capability filter its empty claims answer for (the quiet
    /// hint's key; `None`: no hint used or recorded).
    pub quiet_key: Option<QuietKey>,
}

/// An orchestration claim's capability filter: enabled, lowest and highest version.
pub(crate) type QuietKey = (bool, (i32, i32, i32), (i32, i32, i32));

/// "Nothing claimable for `key`", from an empty claim sent at orchestrator epoch
/// `epoch`; holds until `until` while the epoch does not move.
struct Quiet {
    key: QuietKey,
    epoch: u64,
    until: Instant,
}

impl Interest {
    /// Anything on `queue` (the orchestrator queue; no filter).
    pub(crate) fn any(queue: Queue) -> Self {
        Self {
            queue,
            tag_mode: 3,
            tags: Vec::new(),
            session_owner: None,
            claim: None,
            quiet_key: None,
        }
    }

    fn admits_tag(&self, tag: Option<&str>) -> bool {
        match (self.tag_mode, tag) {
            (3, _) => true,
            (0 | 2, None) => true,
            (1 | 2, Some(t)) => self.tags.iter().any(|x| x == t),
            _ => false,
        }
    }
}

/// Why a waiter was woken: what it should be able to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Unknown routing (bare count, reconnect): anything of the queue.
    Any(Queue),
    /// A worker item with this tag and session.
    Worker {
        tag: Option<String>,
        session: Option<String>,
    },
}

/// One waiting fetch.
pub(crate) struct Waiter {
    id: u64,
    interest: Interest,
    notify: Notify,
    /// A wake-up delivered and not yet acted on (the route it was for).
    pending: Mutex<Option<Route>>,
    /// Earliest time delayed work becomes visible, learned from `at:` notifications.
    wake_at: Mutex<Option<Instant>>,
    /// Work an ack of this provider claimed for this fetch (`handover.rs`).
    slot: crate::handover::Slot,
}

impl Waiter {
    fn is_woken(&self) -> bool {
        lock(&self.pending).is_some()
    }

    fn wake(&self, route: Route) {
        *lock(&self.pending) = Some(route);
        self.notify.notify_one();
    }

    /// Takes the pending wake-up (the waiter is about to claim).
    pub(crate) fn take_pending(&self) -> Option<Route> {
        lock(&self.pending).take()
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.is_woken()
    }

    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }

    pub(crate) fn slot(&self) -> &crate::handover::Slot {
        &self.slot
    }

    pub(crate) fn interest(&self) -> &Interest {
        &self.interest
    }

    /// The earliest delayed-visibility time still ahead, if any (one that has passed is
    /// forgotten: the claim that follows it sees the item).
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let mut at = lock(&self.wake_at);
        if at.is_some_and(|t| t <= Instant::now()) {
            *at = None;
        }
        *at
    }

    fn wake_no_later_than(&self, t: Instant) {
        let mut at = lock(&self.wake_at);
        if at.is_none_or(|old| t < old) {
            *at = Some(t);
            drop(at);
            self.notify.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most session ownership hints kept (a hint older than its lease is dropped anyway).
const MAX_SESSION_HINTS: usize = 10_000;

/// Wake-up state shared by all fetches of one provider.
pub(crate) struct Notifier {
    waiters: Mutex<Vec<Arc<Waiter>>>,
    next_id: AtomicU64,
    /// Session id -> (owner id, until): sessions this provider claimed, while their
    /// lease from that claim lasts. A session item wakes its owner's waiter only.
    sessions: Mutex<HashMap<String, (String, Instant)>>,
    listener_started: AtomicBool,
    credentials: Option<Arc<Credentials>>,
    /// Set by `PostgresProvider::close`: the listener task stops.
    shut_down: AtomicBool,
    shut_down_signal: Notify,
    /// Moves with every orchestrator notification and listener (re)connect or loss.
    orch_epoch: AtomicU64,
    /// The LISTEN connection is up (notifications are being received).
    listening: AtomicBool,
    /// The last empty orchestration claim's answer (see the module docs).
    quiet: Mutex<Option<Quiet>>,
}

impl Notifier {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::with_credentials(None)
    }

    /// `credentials`: asked for the password of every (re)connect of the LISTEN
    /// connection (`None`: the pool's connect options as they are).
    pub(crate) fn with_credentials(credentials: Option<Arc<Credentials>>) -> Self {
        Self {
            credentials,
            waiters: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            listener_started: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
            shut_down_signal: Notify::new(),
            orch_epoch: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            quiet: Mutex::new(None),
        }
    }

    /// The orchestrator epoch to record before an orchestration claim is sent; `None`
    /// while nothing is listening (then no notification is seen and no hint may hold).
    pub(crate) fn orch_epoch(&self) -> Option<u64> {
        self.listening
            .load(Ordering::SeqCst)
            .then(|| self.orch_epoch.load(Ordering::SeqCst))
    }

    /// An orchestration claim sent at `epoch` (from [`Self::orch_epoch`]) found nothing
    /// for `key`; `until`: when that answer stops holding on its own (the claim's next
    /// wake-up time or the fallback poll, whichever is first).
    pub(crate) fn note_quiet(&self, epoch: Option<u64>, key: QuietKey, until: Instant) {
        let mut q = lock(&self.quiet);
        match epoch {
            Some(epoch) if self.orch_epoch() == Some(epoch) => {
                *q = Some(Quiet { key, epoch, until });
            }
            _ => *q = None,
        }
    }

    /// When the last empty claim's answer for `key` still holds (nothing notified since,
    /// the listener up all along): the time it stops holding.
    pub(crate) fn quiet_until(&self, key: &QuietKey) -> Option<Instant> {
        let q = lock(&self.quiet);
        let quiet = q.as_ref()?;
        (quiet.key == *key
            && self.orch_epoch() == Some(quiet.epoch)
            && quiet.until > Instant::now())
        .then_some(quiet.until)
    }

    fn set_listening(&self, up: bool) {
        self.listening.store(up, Ordering::SeqCst);
        self.orch_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops the listener task (the provider is closing).
    pub(crate) fn shut_down(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        self.shut_down_signal.notify_one();
    }

    fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::SeqCst)
    }

    /// Registers a waiting fetch; it stays registered (and can be woken, also while it
    /// claims) until the returned guard is dropped.
    pub(crate) fn register(self: &Arc<Self>, interest: Interest) -> Registration {
        let waiter = Arc::new(Waiter {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            interest,
            notify: Notify::new(),
            pending: Mutex::new(None),
            wake_at: Mutex::new(None),
            slot: crate::handover::Slot::default(),
        });
        lock(&self.waiters).push(waiter.clone());
        Registration {
            notifier: self.clone(),
            waiter,
        }
    }

    /// Remembers that `owner` holds `session` until `until` (from a claim of this
    /// provider), so the session's next item wakes that owner's waiter.
    pub(crate) fn note_session_owner(&self, session: &str, owner: &str, until: Instant) {
        let mut s = lock(&self.sessions);
        if s.len() >= MAX_SESSION_HINTS {
            let now = Instant::now();
            s.retain(|_, (_, t)| *t > now);
            if s.len() >= MAX_SESSION_HINTS {
                s.clear();
            }
        }
        s.insert(session.to_string(), (owner.to_string(), until));
    }

    fn session_owner(&self, session: &str) -> Option<String> {
        let s = lock(&self.sessions);
        s.get(session)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(owner, _)| owner.clone())
    }

    fn waiters_of(&self, queue: Queue) -> Vec<Arc<Waiter>> {
        lock(&self.waiters)
            .iter()
            .filter(|w| w.interest.queue == queue)
            .cloned()
            .collect()
    }

    /// Reserves one waiting orchestration fetch that takes hand-overs (`handover.rs`).
    pub(crate) fn reserve_turn_waiter(&self) -> Option<crate::handover::Reservation> {
        self.waiters_of(Queue::Orchestrator)
            .into_iter()
            .filter(|w| w.interest.claim.is_some())
            .find(|w| w.slot.try_reserve())
            .map(|waiter| crate::handover::Reservation { waiter })
    }

    /// Reserves waiting worker fetches for new items (`(tag, session)` each): at most one
    /// fetch per item, each admitting one of them (tag filter; session items only to a
    /// fetch that takes sessions, and to the local owner's fetch when this provider holds
    /// the session). All reserved fetches share one tag filter (the ack claims with one).
    pub(crate) fn reserve_work_waiters(
        &self,
        items: &[(Option<String>, Option<String>)],
    ) -> Vec<crate::handover::Reservation> {
        let mut out: Vec<crate::handover::Reservation> = Vec::new();
        let waiters: Vec<_> = self
            .waiters_of(Queue::Worker)
            .into_iter()
            .filter(|w| w.interest.claim.is_some())
            .collect();
        for (tag, session) in items {
            let owner = session.as_deref().and_then(|s| self.session_owner(s));
            let fits = |w: &Waiter| {
                w.interest.admits_tag(tag.as_deref())
                    && (session.is_none() || w.interest.session_owner.is_some())
                    && owner
                        .as_ref()
                        .is_none_or(|o| w.interest.session_owner.as_ref() == Some(o))
                    && out.first().is_none_or(|r| {
                        r.interest().tag_mode == w.interest.tag_mode
                            && r.interest().tags == w.interest.tags
                    })
            };
            if let Some(w) = waiters.iter().find(|w| {
                !out.iter().any(|r| r.waiter.id == w.id) && fits(w) && w.slot.try_reserve()
            }) {
                out.push(crate::handover::Reservation { waiter: w.clone() });
            }
        }
        out
    }

    /// Wakes waiters for `count` items routed `route`. Returns how many were woken.
    pub(crate) fn dispatch(&self, route: &Route, count: usize) -> usize {
        match route {
            Route::Any(Queue::Worker) => self.wake_all_of(Queue::Worker, route),
            Route::Any(Queue::Orchestrator) => {
                let idle: Vec<_> = self
                    .waiters_of(Queue::Orchestrator)
                    .into_iter()
                    .filter(|w| !w.is_woken())
                    .take(count)
                    .collect();
                for w in &idle {
                    w.wake(route.clone());
                }
                idle.len()
            }
            Route::Worker { tag, session } => {
                let candidates: Vec<_> = self
                    .waiters_of(Queue::Worker)
                    .into_iter()
                    .filter(|w| {
                        w.interest.admits_tag(tag.as_deref())
                            && (session.is_none() || w.interest.session_owner.is_some())
                    })
                    .collect();
                let chosen: Vec<_> = match session {
                    None => candidates
                        .into_iter()
                        .filter(|w| !w.is_woken())
                        .take(count)
                        .collect(),
                    Some(s) => match self.session_owner(s) {
                        // Only the owner can claim it while its lease lasts; if it is
                        // not waiting it is busy and claims when it comes back.
                        Some(owner) => candidates
                            .into_iter()
                            .filter(|w| w.interest.session_owner.as_deref() == Some(&owner))
                            .filter(|w| !w.is_woken())
                            .take(1)
                            .collect(),
                        // Owned elsewhere, expired or new: whoever may claim it.
                        None => candidates.into_iter().filter(|w| !w.is_woken()).collect(),
                    },
                };
                for w in &chosen {
                    w.wake(route.clone());
                }
                chosen.len()
            }
        }
    }

    fn wake_all_of(&self, queue: Queue, route: &Route) -> usize {
        let all = self.waiters_of(queue);
        for w in &all {
            w.wake(route.clone());
        }
        all.len()
    }

    fn wake_all(&self) {
        for q in [Queue::Orchestrator, Queue::Worker] {
            self.wake_all_of(q, &Route::Any(q));
        }
    }

    /// Delayed work on `queue` becomes visible after `delay`: every waiter of the queue
    /// looks again no later than that.
    fn delayed(&self, queue: Queue, delay: Duration) {
        let at = Instant::now() + delay;
        for w in self.waiters_of(queue) {
            w.wake_no_later_than(at);
        }
    }

    /// Applies one notification payload (see `notify_worker_items`/`notify_delayed`).
    pub(crate) fn deliver(&self, queue: Queue, payload: &str) {
        if queue == Queue::Orchestrator {
            // Before anyone is woken: a fetch that reads the epoch after this claims.
            self.orch_epoch.fetch_add(1, Ordering::SeqCst);
        }
        match parse_payload(payload) {
            Payload::Count(n) => {
                self.dispatch(&Route::Any(queue), n);
            }
            Payload::Items(items) => {
                for (tag, session, n) in items {
                    self.dispatch(&Route::Worker { tag, session }, n);
                }
            }
            Payload::At { delay } => self.delayed(queue, delay),
        }
    }

    /// Starts the listener task once. It resolves the channels and listens, retrying
    /// until it works; meanwhile waits end at the fallback interval.
    pub(crate) fn ensure_listening(self: &Arc<Self>, connect: &PgConnectOptions, schema_q: &str) {
        if self
            .listener_started
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
            || self.is_shut_down()
        {
            return;
        }
        // A dedicated single-connection pool: the listener never takes a slot of the
        // provider's pool, and the pool handles its reconnects.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(connect.clone());
        tokio::spawn(listen_loop(
            Arc::downgrade(self),
            listen_pool,
            self.credentials.clone(),
            schema_q.to_string(),
        ));
    }
}

/// A parsed notification payload.
#[derive(Debug, PartialEq, Eq)]
enum Payload {
    /// `n` items of unknown routing.
    Count(usize),
    /// Worker items: (tag, session, count).
    Items(Vec<(Option<String>, Option<String>, usize)>),
    /// Work becomes visible after `delay`.
    At { delay: Duration },
}

/// Parses a payload; anything unreadable counts as one item of unknown routing (a wake
/// too many is cheap, a missed one costs the fallback interval).
fn parse_payload(payload: &str) -> Payload {
    if let Some(json) = payload.strip_prefix("w:") {
        if let Ok(items) = serde_json::from_str::<Vec<(Option<String>, Option<String>, u64)>>(json)
        {
            return Payload::Items(
                items
                    .into_iter()
                    .map(|(t, s, n)| (t, s, usize::try_from(n.clamp(1, 64)).unwrap_or(1)))
                    .collect(),
            );
        }
    } else if let Some(rest) = payload.strip_prefix("at:") {
        if let Some((at, now)) = rest.split_once(',')
            && let (Ok(at), Ok(now)) = (at.parse::<i64>(), now.parse::<i64>())
        {
            let ms = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
            return Payload::At {
                // +1 ms: visibility is `visible_at <= now` (see poll::wake_in).
                delay: Duration::from_millis(ms.saturating_add(1)),
            };
        }
    } else if let Ok(n) = payload.trim().parse::<u64>() {
        return Payload::Count(usize::try_from(n.clamp(1, 64)).unwrap_or(1));
    }
    Payload::Count(1)
}

/// Keeps a fetch registered as a waiter; on drop it unregisters and hands a wake-up it
/// has not acted on to another waiter.
pub(crate) struct Registration {
    notifier: Arc<Notifier>,
    waiter: Arc<Waiter>,
}

impl Registration {
    pub(crate) fn waiter(&self) -> &Waiter {
        &self.waiter
    }

    /// Guards a wake-up taken for a claim: if the claim future is dropped before the
    /// claim finished, the wake-up goes to another waiter.
    pub(crate) fn hand_on_guard(&self, route: Option<Route>) -> HandOn<'_> {
        HandOn {
            notifier: &self.notifier,
            route,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.notifier.waiters).retain(|w| w.id != self.waiter.id);
        if let Some(route) = self.waiter.take_pending() {
            metrics::counter!("duroxide_pg_long_poll_handoffs_total").increment(1);
            self.notifier.dispatch(&route, 1);
        }
    }
}

/// Passes a consumed wake-up on if the waiter is dropped before its claim finished.
pub(crate) struct HandOn<'a> {
    notifier: &'a Notifier,
    route: Option<Route>,
}

impl HandOn<'_> {
    pub(crate) fn disarm(mut self) {
        self.route = None;
    }
}

impl Drop for HandOn<'_> {
    fn drop(&mut self) {
        if let Some(route) = self.route.take() {
            metrics::counter!("duroxide_pg_long_poll_handoffs_total").increment(1);
            self.notifier.dispatch(&route, 1);
        }
    }
}

/// Sleeps `backoff` (then doubles it, at most 5 s); false when the provider is gone or
/// closed.
async fn back_off(notifier: &Weak<Notifier>, backoff: &mut Duration) -> bool {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    notifier.upgrade().is_some_and(|n| !n.is_shut_down())
}

async fn resolve_channels(pool: &PgPool, schema_q: &str) -> Result<(String, String), sqlx::Error> {
    sqlx::query_as::<_, (String, String)>(&format!(
        "SELECT {schema_q}.notify_channel('orchestrator'), {schema_q}.notify_channel('worker')"
    ))
    .fetch_one(pool)
    .await
}

async fn listen_loop(
    notifier: Weak<Notifier>,
    pool: PgPool,
    credentials: Option<Arc<Credentials>>,
    schema_q: String,
) {
    let mut backoff = Duration::from_millis(100);
    let (orch_ch, work_ch) = loop {
        match resolve_channels(&pool, &schema_q).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(target: TRACING_TARGET, error = %e, "cannot resolve notification channels yet; retrying (waits end at the fallback interval meanwhile)");
                if !back_off(&notifier, &mut backoff).await {
                    return;
                }
            }
        }
    };
    backoff = Duration::from_millis(100);
    loop {
        if let Some(c) = &credentials {
            // Failure is logged there; the connect below then reports what it means.
            let _ = c.refresh(&pool).await;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(target: TRACING_TARGET, error = %e, "LISTEN connection failed; retrying");
                if !back_off(&notifier, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        // No reconnect inside try_recv: it would use the previous password and wake nobody
        // after re-LISTENing. A lost connection returns Ok(None) and we start over.
        listener.eager_reconnect(false);
        if let Err(e) = listener
            .listen_all([orch_ch.as_str(), work_ch.as_str()])
            .await
        {
            tracing::warn!(target: TRACING_TARGET, error = %e, "LISTEN failed; retrying");
            if !back_off(&notifier, &mut backoff).await {
                return;
            }
            continue;
        }
        backoff = Duration::from_millis(100);
        tracing::debug!(target: TRACING_TARGET, orchestrator = %orch_ch, worker = %work_ch, "listening for work notifications");
        // Anything sent while we were not listening is lost: let every waiter poll once.
        match notifier.upgrade() {
            Some(n) => {
                n.set_listening(true);
                n.wake_all();
            }
            None => return,
        }
        let Some(strong) = notifier.upgrade() else {
            return;
        };
        let stop = async move {
            strong.shut_down_signal.notified().await;
        };
        tokio::pin!(stop);
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                () = &mut stop => {
                    pool.close().await;
                    return;
                }
                // Re-check regularly whether the provider is gone, so the task and its
                // connection do not outlive it.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if notifier.strong_count() <= 1 { return; }
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
                    metrics::counter!("duroxide_pg_notifications_received_total", "queue" => queue.sql_name())
                        .increment(1);
                    n.deliver(queue, msg.payload());
                }
                Ok(None) => {
                    // Connection lost. Reconnect from the top (password asked again, LISTEN
                    // again, then every waiter polls once) rather than inside try_recv.
                    tracing::debug!(target: TRACING_TARGET, "LISTEN connection lost; reconnecting");
                    n.set_listening(false);
                    n.wake_all();
                    break;
                }
                Err(e) => {
                    tracing::warn!(target: TRACING_TARGET, error = %e, "LISTEN connection failed; reconnecting");
                    n.set_listening(false);
                    n.wake_all();
                    break;
                }
            }
        }
        if !back_off(&notifier, &mut backoff).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payloads() {
        assert_eq!(parse_payload("3"), Payload::Count(3));
        assert_eq!(parse_payload("0"), Payload::Count(1));
        assert_eq!(parse_payload("garbage"), Payload::Count(1));
        assert_eq!(
            parse_payload(r#"w:[[null,null,2],["gpu","s1",1]]"#),
            Payload::Items(vec![
                (None, None, 2),
                (Some("gpu".into()), Some("s1".into()), 1)
            ])
        );
        assert_eq!(
            parse_payload("at:2000,1000"),
            Payload::At {
                delay: Duration::from_millis(1001)
            }
        );
        assert_eq!(
            parse_payload("at:900,1000"),
            Payload::At {
                delay: Duration::from_millis(1)
            }
        );
    }

    fn worker(tag_mode: i32, tags: &[&str], owner: Option<&str>) -> Interest {
        Interest {
            queue: Queue::Worker,
            tag_mode,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            session_owner: owner.map(str::to_string),
            quiet_key: None,
            claim: None,
        }
    }

    #[test]
    fn items_wake_only_waiters_that_can_take_them() {
        let n = Arc::new(Notifier::new());
        let plain = n.register(worker(0, &[], Some("a")));
        let gpu = n.register(worker(1, &["gpu"], Some("b")));
        let no_sessions = n.register(worker(2, &["gpu"], None));
        let gpu_item = Route::Worker {
            tag: Some("gpu".into()),
            session: None,
        };
        assert_eq!(n.dispatch(&gpu_item, 1), 1);
        assert!(!plain.waiter().has_pending());
        assert!(gpu.waiter().has_pending() || no_sessions.waiter().has_pending());
        // A session item of a session owned here wakes its owner only.
        let _ = gpu.waiter().take_pending();
        let _ = no_sessions.waiter().take_pending();
        n.note_session_owner("s1", "a", Instant::now() + Duration::from_secs(30));
        let session_item = Route::Worker {
            tag: None,
            session: Some("s1".into()),
        };
        assert_eq!(n.dispatch(&session_item, 1), 1);
        assert!(plain.waiter().has_pending());
        assert!(!no_sessions.waiter().has_pending());
        // An unknown session wakes everyone that may claim it.
        let _ = plain.waiter().take_pending();
        let other = Route::Worker {
            tag: None,
            session: Some("s2".into()),
        };
        assert_eq!(
            n.dispatch(&other, 1),
            1,
            "only `plain` takes untagged session items"
        );
        // A bare count from an older release: everyone.
        let _ = plain.waiter().take_pending();
        assert_eq!(n.dispatch(&Route::Any(Queue::Worker), 1), 3);
    }

    #[test]
    fn a_dropped_woken_waiter_hands_its_wake_on() {
        let n = Arc::new(Notifier::new());
        let a = n.register(Interest::any(Queue::Orchestrator));
        let b = n.register(Interest::any(Queue::Orchestrator));
        assert_eq!(n.dispatch(&Route::Any(Queue::Orchestrator), 1), 1);
        let (woken, other) = if a.waiter().has_pending() {
            (a, b)
        } else {
            (b, a)
        };
        assert!(!other.waiter().has_pending());
        drop(woken);
        assert!(other.waiter().has_pending(), "the wake-up was handed on");
    }
}
