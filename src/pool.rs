//! The provider's own connection pool for every provider call.
//!
//! Why not `sqlx::PgPool` here: sqlx 0.8 pings every connection when it goes back to the
//! pool (`SELECT`-less simple query, one round trip, on every release). It is off the
//! caller's path, but it doubles the wire traffic of each call and keeps the connection
//! busy for another round trip: at 100 ms from the database a 4-read hybrid fetch then
//! finds only 3 free connections and waits. This pool never talks to the server on
//! checkout or release. A connection whose call did not finish (future dropped mid-query,
//! I/O error) is closed instead of reused, so no half-read response can reach the next
//! caller; a server-side error (constraint, token check) leaves it usable. A call that
//! loses its connection (I/O error, FATAL such as `57P01`) also discards the idle
//! connections, which the same restart or kill has most likely closed.
//!
//! Statement-affine checkout: sqlx prepares a statement on a connection the first time
//! that connection runs it, in a round trip of its own. A call takes the most recently
//! used idle connection that has already run its statement (else the most recently used
//! one), so once a statement is prepared somewhere it rarely costs that trip again; the
//! hybrid path's concurrent reads would otherwise meet unprepared (statement,
//! connection) pairs for a long time.
//!
//! Idle connections older than `idle_timeout` (or any older than `max_lifetime`) are
//! closed at checkout instead of used: a load balancer or NAT gateway that silently
//! dropped the flow would otherwise make the call hang until TCP gives up.
//!
//! Behind a transaction-mode pooler (`PoolerMode::Transaction`) every call is wrapped in
//! `BEGIN` ... `COMMIT` ([`Conn::begin_call`] / [`Conn::end_call`]): sqlx sends Parse and
//! Bind in two separate Sync'ed batches, and only an open transaction keeps the pooler
//! from handing the second batch to another server connection. Statements are unnamed
//! there (`persistent(false)`, see [`ConnPool::persistent_statements`]).
//!
//! The `PgPool` a provider is built from stays in use for migrations and is what
//! [`PostgresProvider::pool`](crate::PostgresProvider::pool) returns to applications.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::{Connection, Executor, PgConnection};

use crate::credentials::Credentials;
use crate::permits::{Permit, Permits};

pub(crate) struct ConnPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// Asks the password source (if any) for every new connection.
    connect: Arc<Credentials>,
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<Permits>,
    acquire_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    /// Transaction pooler: the simple-query text opening each call's transaction.
    call_begin: Option<String>,
}

/// A connection with the ages the pool's limits are checked against.
struct Pooled {
    conn: PgConnection,
    opened: Instant,
    idle_since: Instant,
    /// Keys ([`statement_key`]) of the statements this connection has run.
    prepared: HashSet<u64>,
}

impl Pooled {
    fn expired(&self, inner: &PoolInner) -> bool {
        inner
            .idle_timeout
            .is_some_and(|t| self.idle_since.elapsed() >= t)
            || inner
                .max_lifetime
                .is_some_and(|t| self.opened.elapsed() >= t)
    }
}

/// Pool limits beyond the size.
#[derive(Debug, Clone)]
pub(crate) struct PoolLimits {
    pub acquire_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    /// `Some(sql)`: behind a transaction pooler, each call runs inside a transaction
    /// opened by `sql` (`BEGIN` plus any `SET LOCAL`).
    pub call_begin: Option<String>,
    /// Serve the runtime's dispatch calls before other calls when every connection is
    /// busy ([`crate::permits`]).
    pub dispatch_lane: bool,
    /// Fewer connections run statements at once while statements queue in the server
    /// ([`crate::limit`]).
    pub adaptive_limit: bool,
}

/// A checked-out connection. Call [`finish`](Conn::finish) with the query's result to
/// give it back; dropping it unfinished closes it.
pub(crate) struct Conn {
    conn: Option<PgConnection>,
    opened: Instant,
    prepared: HashSet<u64>,
    /// The statement this checkout runs, recorded as prepared when it gives the
    /// connection back.
    statement: Option<u64>,
    /// When the connection was ready for the statement: on a connection that had
    /// prepared it, the call's duration is a sample of the adaptive limit.
    ready_at: Instant,
    pool: Arc<PoolInner>,
    /// The connection's state is unknown (a failed ROLLBACK): closed, never reused.
    poisoned: bool,
    _permit: Permit,
}

impl ConnPool {
    pub(crate) fn new(connect: Arc<Credentials>, max_connections: u32, limits: PoolLimits) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                connect,
                idle: Mutex::new(Vec::new()),
                permits: Permits::new(
                    max_connections as usize,
                    limits.dispatch_lane,
                    limits.adaptive_limit,
                ),
                acquire_timeout: limits.acquire_timeout,
                idle_timeout: limits.idle_timeout,
                max_lifetime: limits.max_lifetime,
                call_begin: limits.call_begin,
            }),
        }
    }

    /// Whether statements may be named and cached per connection (`false` behind a
    /// transaction pooler, where the next call may get another server connection).
    pub(crate) fn persistent_statements(&self) -> bool {
        self.inner.call_begin.is_none()
    }

    /// A connection: an idle one if any, else a new one, waiting at most the acquire
    /// timeout for a free slot (then `PoolTimedOut`, which maps to a retryable error).
    pub(crate) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        self.acquire_for(None).await
    }

    /// Like [`acquire`](Self::acquire), preferring an idle connection that has already
    /// run `statement` (a [`statement_key`]).
    pub(crate) async fn acquire_for(&self, statement: Option<u64>) -> Result<Conn, sqlx::Error> {
        let started = Instant::now();
        let permit = self
            .inner
            .permits
            .acquire(self.inner.acquire_timeout)
            .await?;
        let (idle, expired) = {
            let mut idle = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let expired: Vec<Pooled> = {
                let (keep, gone): (Vec<Pooled>, Vec<Pooled>) = std::mem::take(&mut *idle)
                    .into_iter()
                    .partition(|c| !c.expired(&self.inner));
                *idle = keep;
                gone
            };
            let warm = statement.and_then(|k| idle.iter().rposition(|c| c.prepared.contains(&k)));
            let chosen = match warm {
                Some(at) => Some(idle.remove(at)),
                None => idle.pop(),
            };
            (chosen, expired)
        };
        if !expired.is_empty() {
            metrics::counter!("duroxide_pg_pool_expired_connections_total")
                .increment(expired.len() as u64);
            close_in_background(expired.into_iter().map(|c| c.conn).collect());
        }
        let (conn, opened, prepared) = match idle {
            Some(c) => (c.conn, c.opened, c.prepared),
            None => {
                let remaining = self.inner.acquire_timeout.saturating_sub(started.elapsed());
                let conn = tokio::time::timeout(remaining, self.inner.connect.connect())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                (conn, Instant::now(), HashSet::new())
            }
        };
        metrics::histogram!("duroxide_pg_pool_wait_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(Conn {
            conn: Some(conn),
            opened,
            prepared,
            statement,
            ready_at: Instant::now(),
            pool: self.inner.clone(),
            poisoned: false,
            _permit: permit,
        })
    }

    /// Opens connections until `n` are idle (start-up warm-up for `min_connections`).
    pub(crate) async fn warm_up(&self, n: u32) -> Result<(), sqlx::Error> {
        let mut opened = Vec::new();
        for _ in 0..n {
            opened.push(self.acquire().await?);
        }
        for c in opened {
            c.finish(Ok(()))?;
        }
        Ok(())
    }

    /// Refuses new checkouts (they fail with `PoolClosed`) and hands back the idle
    /// connections for the caller to close; connections in use are closed when they
    /// come back.
    pub(crate) fn shut(&self) -> Vec<PgConnection> {
        self.inner.permits.close();
        std::mem::take(
            &mut *self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
        .into_iter()
        .map(|c| c.conn)
        .collect()
    }
}

/// The key [`ConnPool::acquire_for`] matches a statement's text by.
pub(crate) fn statement_key(sql: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut h);
    h.finish()
}

/// Closes connections politely (Terminate message) without making the caller wait.
fn close_in_background(conns: Vec<PgConnection>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            for c in conns {
                let _ = c.close().await;
            }
        });
    }
}

/// A failed call, by how far it got.
pub(crate) enum Failed {
    /// No connection: nothing was sent.
    Checkout(sqlx::Error),
    /// The statement was (or may have been) sent.
    Statement(sqlx::Error),
}

impl Failed {
    /// Whether sending the statement again on a fresh connection cannot run it twice.
    ///
    /// * Checkout failures: nothing was sent. Resent when retryable, except a pool
    ///   timeout (the caller already waited `acquire_timeout`).
    /// * `57P01` (terminated by an administrator or a fast shutdown), `57P03` (cannot
    ///   connect now), `57P05` (idle-session timeout): PostgreSQL ended the session before
    ///   the statement ran or rolled it back. (A termination while a commit waits for a
    ///   synchronous standby is reported as a WARNING and a closed socket, not 57P01, so
    ///   it lands below.)
    /// * Anything else is an unknown outcome (I/O error, class 08 such as PgBouncer's
    ///   `08P01 server conn crashed?` which can follow the commit, `08007`, `57P02`
    ///   crash): resent only for `idempotent` statements.
    pub(crate) fn may_resend(&self, idempotent: bool) -> bool {
        match self {
            Failed::Checkout(e) => {
                !matches!(e, sqlx::Error::PoolTimedOut) && crate::errors::is_retryable(e)
            }
            Failed::Statement(e) => ended_before_commit(e) || (idempotent && outcome_unknown(e)),
        }
    }

    /// How many times one call may be resent after this failure. A session the server
    /// ended before running the statement (`57P01`: every pooled connection of a killed
    /// batch fails this way once, on its next use) is safe to resend as often as the pool
    /// may hold dead connections; anything else at most twice.
    pub(crate) fn resend_limit(&self) -> u64 {
        match self {
            Failed::Statement(e) if ended_before_commit(e) => 10,
            _ => 2,
        }
    }

    pub(crate) fn into_error(self) -> sqlx::Error {
        match self {
            Failed::Checkout(e) | Failed::Statement(e) => e,
        }
    }
}

/// The server ended the session without running or committing the statement.
fn ended_before_commit(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| matches!(&*c, "57P01" | "57P03" | "57P05")))
}

/// The connection failed while the statement was in flight: it may or may not have run.
fn outcome_unknown(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

impl Conn {
    /// Behind a transaction pooler: opens the call's transaction (one round trip, with
    /// the `SET LOCAL` timeouts). No-op otherwise.
    ///
    /// (Boxed, like `end_call`: awaited inside the provider's `async_trait` methods, an
    /// unboxed future over sqlx's generic executor fails the `Send` proof.)
    pub(crate) fn begin_call(&mut self) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let Some(begin) = self.pool.call_begin.clone() else {
                return Ok(());
            };
            let conn: &mut PgConnection = self
                .conn
                .as_mut()
                .expect("connection present until finished");
            conn.execute(begin.as_str()).await.map(|_| ())
        })
    }

    /// Behind a transaction pooler: commits the call's transaction when the statement
    /// succeeded (a failed COMMIT becomes the call's error), rolls it back when the
    /// server reported an error. Other failures (I/O) close the connection in `finish`,
    /// which ends the transaction server-side. No-op otherwise.
    pub(crate) fn end_call<T: Send + 'static>(
        &mut self,
        result: Result<T, sqlx::Error>,
    ) -> BoxFuture<'_, Result<T, sqlx::Error>> {
        Box::pin(async move {
            if self.pool.call_begin.is_none() {
                return result;
            }
            let conn: &mut PgConnection = self
                .conn
                .as_mut()
                .expect("connection present until finished");
            match result {
                Ok(v) => conn.execute("COMMIT").await.map(|_| v),
                Err(e @ sqlx::Error::RowNotFound) => conn.execute("COMMIT").await.and(Err(e)),
                Err(e @ sqlx::Error::Database(_)) => {
                    if conn.execute("ROLLBACK").await.is_err() {
                        self.poisoned = true;
                    }
                    Err(e)
                }
                Err(e) => Err(e),
            }
        })
    }

    /// Returns the connection to the pool unless `result` shows it may be in an unknown
    /// state (anything but a server-reported error), then passes `result` through.
    pub(crate) fn finish<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let reusable = match &result {
            Ok(_) | Err(sqlx::Error::RowNotFound) => true,
            // A FATAL server error (terminated by an administrator, shutting down,
            // connection failure) comes as a database error but ends the session.
            Err(sqlx::Error::Database(db)) => !db
                .code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
            Err(_) => false,
        } && !self.poisoned;
        if !reusable {
            // Whatever killed this connection (a restart, a terminate-all, a network
            // cut) most likely killed the idle ones too: drop them rather than hand them
            // out one failed call at a time.
            drop(std::mem::take(
                &mut *self
                    .pool
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ));
        }
        // Every checkout runs exactly one statement: this counts the provider's round trips.
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("duroxide_pg_round_trips_total", "outcome" => outcome).increment(1);
        // (`prepared` is still the set from before this call.)
        if let Some(key) = self
            .statement
            .filter(|k| result.is_ok() && self.prepared.contains(k))
        {
            self.pool.permits.record(key, self.ready_at.elapsed());
        }
        let too_old = self
            .pool
            .max_lifetime
            .is_some_and(|t| self.opened.elapsed() >= t);
        if let Some(c) = self.conn.take() {
            if reusable && !too_old && !self.pool.permits.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Pooled {
                        conn: c,
                        opened: self.opened,
                        idle_since: Instant::now(),
                        prepared: {
                            let mut p = std::mem::take(&mut self.prepared);
                            p.extend(self.statement);
                            p
                        },
                    });
            } else if reusable {
                close_in_background(vec![c]);
            }
        }
        result
    }
}

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("connection present until finished")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("connection present until finished")
    }
}
