#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// Runs one query on a connection of the provider's own pool (see `pool.rs`) and
/// returns the connection afterwards: `on_conn!(provider, fetch_one, query)` evaluates
/// to the query's `Result<_, sqlx::Error>`.
///
/// A failed call is sent again on a fresh connection (twice at most) only when that
/// cannot run it twice (see [`pool::Failed::may_resend`]): the checkout failed (nothing
/// was sent), or the server reported that it ended the session without running or
/// committing the statement (57P01, 57P03, 57P05). `on_conn!(idempotent: ...)` marks a
/// statement that is harmless to run twice (reads, lease renewals, enqueues carrying a
/// client id): it is also resent when the outcome is unknown (I/O error, class 08 such
/// as PgBouncer's `08P01`, `57P02`). Anything else comes back as a retryable error and
/// the caller decides.
/// The resend ledger's part of a client enqueue statement (`queue.rs`, `worker.rs`): CTEs
/// `clock` (the database's now), `fresh` (one row when the client id `$id`, a bind
/// parameter such as `"$5"`, is new: the statement queues only then) and `pruned` (ids
/// older than 15 minutes, up to 64 by about one statement in 16: a one-time filter, so
/// the others skip the scan). The worker ack does the same in `09_handover.sql`.
macro_rules! enqueue_ledger_ctes {
    ($id:literal) => {
        concat!(
            "WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
fresh AS (
    INSERT INTO {s}.enqueue_ledger (enqueue_id, created_at_ms)
    SELECT ",
            $id,
            "::TEXT, clock.now FROM clock
    ON CONFLICT (enqueue_id) DO NOTHING
    RETURNING 1
),
pruned AS (
    DELETE FROM {s}.enqueue_ledger l
    WHERE (SELECT random()) < 0.0625
      AND l.enqueue_id IN (SELECT o.enqueue_id FROM {s}.enqueue_ledger o
                           WHERE o.created_at_ms < (SELECT now FROM clock) - 900000
                           ORDER BY o.created_at_ms LIMIT 64 FOR UPDATE SKIP LOCKED)
),
"
        )
    };
}

macro_rules! on_conn {
    (@run $provider:expr, $method:ident, $query:expr, $idempotent:expr) => {{
        let mut resends = 0u64;
        loop {
            // Behind a transaction pooler: BEGIN/COMMIT around an unnamed statement.
            let persistent = $provider.conns().persistent_statements();
            // (A match keeps the query's temporaries alive for the whole call.)
            let failed = match $query {
                query => {
                    // Named statements are prepared per connection: prefer one that has it.
                    let statement = persistent
                        .then(|| $crate::pool::statement_key(sqlx::Execute::sql(&query)));
                    match $provider.conns().acquire_for(statement).await {
                        Ok(mut conn) => {
                            let result = match conn.begin_call().await {
                                Ok(()) => {
                                    let r = query.persistent(persistent).$method(&mut *conn).await;
                                    conn.end_call(r).await
                                }
                                Err(e) => Err(e),
                            };
                            match conn.finish(result) {
                                Ok(v) => break Ok(v),
                                Err(e) => $crate::pool::Failed::Statement(e),
                            }
                        }
                        Err(e) => $crate::pool::Failed::Checkout(e),
                    }
                }
            };
            if resends < failed.resend_limit() && failed.may_resend($idempotent) {
                resends += 1;
                metrics::counter!("duroxide_pg_resends_total").increment(1);
                tokio::time::sleep(std::time::Duration::from_millis(10 * resends)).await;
            } else {
                break Err(failed.into_error());
            }
        }
    }};
    (idempotent: $provider:expr, $method:ident, $query:expr) => {
        on_conn!(@run $provider, $method, $query, true)
    };
    ($provider:expr, $method:ident, $query:expr) => {
        on_conn!(@run $provider, $method, $query, false)
    };
}

mod admin;
pub mod adopt;
mod codec;
pub mod compat;
mod contract;
pub mod credentials;
#[cfg(feature = "entra")]
pub mod entra;
pub mod errors;
mod handover;
mod handover_reads;
mod history;
mod history_cache;
pub mod incumbent;
pub mod inspect;
mod kv;
mod limit;
mod notify;
pub mod options;
mod permits;
mod poll;
mod pool;
pub mod provider;
mod queue;
pub mod schema;
#[doc(hidden)]
pub mod sql_fn;
mod turn;
mod worker;

pub use compat::{ConnectionConfig, MigrationPolicy, ProviderConfig};
pub use credentials::PasswordSource;
#[cfg(feature = "entra")]
pub use entra::EntraAuthOptions;
pub use errors::ConfigError;
pub use options::{
    DEFAULT_SCHEMA, FetchPath, MAX_FAN_IN_GRACE, MAX_HANDOVER_HISTORY_WINDOW, PoolerMode,
    ProviderOptions,
};
pub use provider::{PostgresProvider, TRACING_TARGET};
pub use worker::UNDECODABLE_ACTIVITY;
