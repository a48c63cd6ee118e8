//! The claim: one call of `sp_fetch_and_lock` (see its migration for the protocol).

use duroxide::providers::ProviderError;

use super::{Claim, ClaimArgs, OP};
use crate::errors::db_error;
use crate::poll::{Attempt, wake_in};
use crate::provider::PostgresProvider;

const CLAIM: &str = "SELECT o_instance_id, o_lock_token, o_execution_id, o_attempt_count, \
     o_now_ms, o_next_wake_ms, o_skipped FROM {s}.sp_fetch_and_lock($1, $2, $3, $4, $5, $6, $7, $8)";

/// The claim's one row: keys when won, else the next wake-up time.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    o_instance_id: Option<String>,
    o_lock_token: Option<String>,
    o_execution_id: Option<i64>,
    o_attempt_count: Option<i32>,
    o_now_ms: i64,
    o_next_wake_ms: Option<i64>,
    o_skipped: Option<i32>,
}

/// Gives a claimed instance back after its reads failed: the lease is dropped and the
/// attempt is not counted, so a transient read error cannot push a turn towards poison.
const RELEASE: &str = "WITH released AS (DELETE FROM {s}.instance_locks WHERE lock_token = $1 RETURNING 1) \
     UPDATE {s}.orchestrator_queue q \
     SET lock_token = NULL, attempt_count = greatest(0, q.attempt_count - 1) \
     WHERE q.lock_token = $1 AND EXISTS (SELECT 1 FROM released)";

impl PostgresProvider {
    pub(crate) async fn claim(&self, a: &ClaimArgs) -> Result<Attempt<Claim>, ProviderError> {
        let row = on_conn!(
            self,
            fetch_one,
            a.bind(sqlx::query_as::<_, ClaimRow>(&self.sql(CLAIM)))
        )
        .map_err(|e| db_error(OP, None, e))?;
        super::record_skipped(row.o_skipped);
        Ok(match (row.o_instance_id, row.o_lock_token) {
            (Some(instance), Some(lock_token)) => Attempt::Claimed(Claim {
                instance,
                lock_token,
                execution_id: row.o_execution_id.unwrap_or(1),
                attempt_count: row.o_attempt_count.unwrap_or(1),
            }),
            _ => Attempt::Empty {
                wake_in: wake_in(row.o_now_ms, row.o_next_wake_ms),
            },
        })
    }

    pub(crate) async fn release_claim(&self, lock_token: &str, instance: &str) {
        if let Err(e) = on_conn!(
            self,
            execute,
            sqlx::query(&self.sql(RELEASE)).bind(lock_token)
        ) {
            // The lease expires on its own; nothing is lost, the turn is only delayed.
            tracing::warn!(
                target: crate::provider::TRACING_TARGET,
                operation = OP,
                instance = %instance,
                error = %e,
                "could not release a claim after a failed read; it will expire"
            );
        }
    }
}
