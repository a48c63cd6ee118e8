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
//! The `PgPool` a provider is built from stays in use for migrations and is what
//! [`PostgresProvider::pool`](crate::PostgresProvider::pool) returns to applications.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::credentials::Credentials;

pub(crate) struct ConnPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// Asks the password source (if any) for every new connection.
    connect: Arc<Credentials>,
    idle: Mutex<Vec<PgConnection>>,
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
}

/// A checked-out connection. Call [`finish`](Conn::finish) with the query's result to
/// give it back; dropping it unfinished closes it.
pub(crate) struct Conn {
    conn: Option<PgConnection>,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
}

impl ConnPool {
    pub(crate) fn new(
        connect: Arc<Credentials>,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                connect,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(max_connections as usize)),
                acquire_timeout,
            }),
        }
    }

    /// A connection: an idle one if any, else a new one, waiting at most the acquire
    /// timeout for a free slot (then `PoolTimedOut`, which maps to a retryable error).
    pub(crate) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        let started = Instant::now();
        let permit = tokio::time::timeout(
            self.inner.acquire_timeout,
            self.inner.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
        .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                let remaining = self.inner.acquire_timeout.saturating_sub(started.elapsed());
                tokio::time::timeout(remaining, self.inner.connect.connect())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??
            }
        };
        metrics::histogram!("duroxide_pg_pool_wait_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(Conn {
            conn: Some(conn),
            pool: self.inner.clone(),
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

    /// Closes idle connections and refuses new checkouts.
    pub(crate) async fn close(&self) {
        self.inner.permits.close();
        let idle = std::mem::take(
            &mut *self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for c in idle {
            let _ = c.close().await;
        }
    }
}

/// The server reported that the session ended before or instead of running the statement
/// (terminated by an administrator, shutting down, connection failure): nothing of it was
/// applied, so it is safe to send again on another connection.
pub(crate) fn not_run_by_server(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

impl Conn {
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
        };
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
        if reusable && let Some(c) = self.conn.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
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
