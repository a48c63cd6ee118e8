//! The claim: one call of `sp_fetch_and_lock` (protocol: migrations/functions/03_claim.sql),
//! and the release of a claim whose reads failed.

use duroxide::providers::ProviderError;

use super::{Claim, ClaimArgs, OP};
use crate::errors::db_error;
use crate::poll::{Attempt, wake_in};
use crate::provider::PostgresProvider;
use crate::sql_fn::SqlFunction;

/// Arguments of the claim, shared by `sp_fetch_and_lock` and `fetch_orchestration_full`
/// (bound by `ClaimArgs::bind`). `p_max_candidates` keeps its default.
pub(crate) const CLAIM_ARGS: &[&str] = &[
    "p_lock_timeout_ms",
    "p_filter_enabled",
    "p_min_major",
    "p_min_minor",
    "p_min_patch",
    "p_max_major",
    "p_max_minor",
    "p_max_patch",
];

pub(crate) static SP_FETCH_AND_LOCK: SqlFunction = SqlFunction {
    name: "sp_fetch_and_lock",
    args: CLAIM_ARGS,
    columns: Some(
        "o_instance_id, o_lock_token, o_execution_id, o_attempt_count, o_now_ms, o_next_wake_ms, o_skipped",
    ),
};

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

impl PostgresProvider {
    pub(crate) async fn claim(&self, a: &ClaimArgs) -> Result<Attempt<Claim>, ProviderError> {
        let sql = self.call_sql(&SP_FETCH_AND_LOCK);
        let row = on_conn!(
            self,
            fetch_one,
            sqlx::query_as_with::<_, ClaimRow, _>(&sql, a.bind(&SP_FETCH_AND_LOCK)?)
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

    /// Gives a claimed instance back after its reads failed: the lease is dropped and the
    /// attempt is not counted, so a transient read error cannot push a turn towards poison.
    pub(crate) async fn release_claim(&self, lock_token: &str, instance: &str) {
        if let Err(e) = self.abandon_turn(OP, lock_token, None, true).await {
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
