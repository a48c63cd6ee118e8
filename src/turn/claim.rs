//! The claim: one call of `sp_fetch_and_lock` (protocol: migrations/functions/03_claim.sql),
//! which returns the claimed batch and the instance's name with the keys,
//! and the release of a claim whose reads failed.

use std::sync::atomic::{AtomicBool, Ordering};

use duroxide::providers::ProviderError;

use super::{Batch, Claim, ClaimArgs, OP};
use crate::errors::db_error;
use crate::poll::{Attempt, wake_in};
use crate::provider::PostgresProvider;
use crate::sql_fn::{Args, SqlFunction};

/// The argument names of a function that takes the claim's arguments (bound by
/// `ClaimArgs::bind_to`, in this order): first in `sp_fetch_and_lock`,
/// `fetch_orchestration_turn` and `fetch_orchestration_full`, followed by `extra`; after
/// `[before]` in the hand-over functions (`TurnOffer::bind`).
macro_rules! claim_args {
    ($($extra:literal),* $(,)?) => {
        $crate::turn::claim_args!([] $(, $extra)*)
    };
    ([$($before:literal),* $(,)?] $(, $extra:literal)* $(,)?) => {
        &[
            $($before,)*
            "p_lock_timeout_ms",
            "p_filter_enabled",
            "p_min_major",
            "p_min_minor",
            "p_min_patch",
            "p_max_major",
            "p_max_minor",
            "p_max_patch",
            $($extra),*
        ]
    };
}
pub(crate) use claim_args;

/// Instances one claim examines at most (the functions' default, bound because the
/// token arguments follow it).
const MAX_CANDIDATES: i32 = 64;

pub(crate) static SP_FETCH_AND_LOCK: SqlFunction = SqlFunction {
    name: "sp_fetch_and_lock",
    args: claim_args!("p_max_candidates", "p_lock_token", "p_resend"),
    columns: Some(
        "o_instance_id, o_lock_token, o_execution_id, o_attempt_count, o_now_ms, o_next_wake_ms, \
         o_skipped, o_messages, o_has_instance, o_orchestration_name, o_orchestration_version",
    ),
};

/// The claim's one row: keys and batch when won, else the next wake-up time.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    o_instance_id: Option<String>,
    o_lock_token: Option<String>,
    o_execution_id: Option<i64>,
    o_attempt_count: Option<i32>,
    o_now_ms: i64,
    o_next_wake_ms: Option<i64>,
    o_skipped: Option<i32>,
    o_messages: Option<Vec<String>>,
    o_has_instance: Option<bool>,
    o_orchestration_name: Option<String>,
    o_orchestration_version: Option<String>,
}

impl PostgresProvider {
    pub(crate) async fn claim(&self, a: &ClaimArgs) -> Result<Attempt<Claim>, ProviderError> {
        let sql = self.call_sql(&SP_FETCH_AND_LOCK);
        let call = ClaimCall::new();
        let args = || {
            call.bind_tail(a.bind_to(Args::new(&SP_FETCH_AND_LOCK)))
                .finish(OP)
        };
        let row = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as_with::<_, ClaimRow, _>(&sql, args()?)
        )
        .map_err(|e| db_error(OP, None, e))?;
        super::record_skipped(row.o_skipped);
        Ok(match (row.o_instance_id, row.o_lock_token) {
            (Some(instance), Some(lock_token)) => Attempt::Claimed(Claim {
                instance,
                lock_token,
                execution_id: row.o_execution_id.unwrap_or(1),
                attempt_count: row.o_attempt_count.unwrap_or(1),
                batch: Batch::from_columns(
                    row.o_messages,
                    row.o_has_instance,
                    row.o_orchestration_name,
                    row.o_orchestration_version,
                ),
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

/// One claim call and its resends: the lease token is made here, once, so that a resend
/// after a lost reply gets the claim its first attempt made if that committed (else it
/// claims as usual).
pub(crate) struct ClaimCall {
    token: String,
    sent: AtomicBool,
}

impl ClaimCall {
    pub(crate) fn new() -> Self {
        Self {
            token: format!("lock_{}", uuid::Uuid::new_v4()),
            sent: AtomicBool::new(false),
        }
    }

    /// Binds the arguments that end both claiming functions (`p_max_candidates`,
    /// `p_lock_token`, `p_resend`); every bind after the first is for a resend.
    pub(crate) fn bind_tail(&self, args: Args) -> Args {
        args.bind("p_max_candidates", MAX_CANDIDATES)
            .bind("p_lock_token", self.token.as_str())
            .bind("p_resend", self.sent.swap(true, Ordering::Relaxed))
    }
}
