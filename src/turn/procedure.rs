//! Full-procedure path: claim and reads in one call of `fetch_orchestration_turn`, which
//! is told what the history cache holds (the claimed instance is not known in advance,
//! so the call carries the cache's long entries; see `crate::history_cache`).

use std::sync::Arc;

use duroxide::providers::ProviderError;

use super::claim::{ClaimCall, claim_args};
use super::{Claim, ClaimArgs, HistoryRows, OP, TurnRows};
use crate::errors::{db_error, decode_error};
use crate::history_cache::Held;
use crate::poll::{Attempt, wake_in};
use crate::provider::PostgresProvider;
use crate::sql_fn::{Args, SqlFunction};

/// The previous release's one-call fetch (whole history every turn). Kept in the schema
/// for processes of that release; this release calls [`FETCH_ORCHESTRATION_TURN`].
pub(crate) static FETCH_ORCHESTRATION_FULL: SqlFunction = SqlFunction {
    name: "fetch_orchestration_full",
    args: claim_args!(),
    columns: Some(
        "o_instance_id, o_lock_token, o_execution_id, o_attempt_count, o_now_ms, o_next_wake_ms, \
         o_skipped, o_has_instance, o_orchestration_name, o_orchestration_version, o_messages, \
         o_history, o_kv_keys, o_kv_values, o_kv_updated_ms",
    ),
};

pub(crate) static FETCH_ORCHESTRATION_TURN: SqlFunction = SqlFunction {
    name: "fetch_orchestration_turn",
    args: claim_args!(
        "p_history_instance_ids",
        "p_history_execution_ids",
        "p_history_after_event_ids",
        "p_history_guards",
        "p_max_candidates",
        "p_lock_token",
        "p_resend",
    ),
    columns: Some(
        "o_instance_id, o_lock_token, o_execution_id, o_attempt_count, o_now_ms, o_next_wake_ms, \
         o_skipped, o_has_instance, o_orchestration_name, o_orchestration_version, o_messages, \
         o_history_incremental, o_history, o_history_last_event_id, o_history_last_guard, \
         o_kv_keys, o_kv_values, o_kv_updated_ms",
    ),
};

/// The turn's data as `read_claimed_turn` returns it (procedure path: in the claiming
/// call, or in the worker ack that handed the turn over).
#[derive(sqlx::FromRow)]
pub(crate) struct TurnData {
    o_has_instance: Option<bool>,
    o_orchestration_name: Option<String>,
    o_orchestration_version: Option<String>,
    o_messages: Option<Vec<String>>,
    o_history_incremental: Option<bool>,
    o_history: Option<Vec<String>>,
    o_history_last_event_id: Option<i64>,
    o_history_last_guard: Option<i64>,
    o_kv_keys: Option<Vec<String>>,
    o_kv_values: Option<Vec<String>>,
    o_kv_updated_ms: Option<Vec<i64>>,
}

impl TurnData {
    /// The batch and name a hand-over's claim returned without the turn's reads (the
    /// hybrid path's hand-over).
    pub(crate) fn claimed_batch(self) -> Option<Box<super::Batch>> {
        super::Batch::from_columns(
            self.o_messages,
            self.o_has_instance,
            self.o_orchestration_name,
            self.o_orchestration_version,
        )
    }

    /// The rows of `claim`'s turn; `held` is the history cache entry sent with the call.
    /// On an inconsistent answer the claim comes back with the reason (to be released).
    pub(crate) fn into_turn_rows(
        self,
        claim: Claim,
        held: Option<&Held>,
    ) -> Result<TurnRows, (Claim, String)> {
        let history = match HistoryRows::from_read(
            self.o_history_incremental.unwrap_or(false),
            held,
            self.o_history.unwrap_or_default(),
            self.o_history_last_event_id,
            self.o_history_last_guard,
        ) {
            Ok(h) => h,
            Err(m) => return Err((claim, m)),
        };
        let meta = if self.o_has_instance.unwrap_or(false) {
            self.o_orchestration_name
                .map(|n| (n, self.o_orchestration_version))
        } else {
            None
        };
        let kv = self
            .o_kv_keys
            .unwrap_or_default()
            .into_iter()
            .zip(self.o_kv_values.unwrap_or_default())
            .zip(self.o_kv_updated_ms.unwrap_or_default())
            .map(|((k, v), ts)| (k, v, ts))
            .collect();
        Ok(TurnRows {
            claim,
            meta,
            messages: self.o_messages.unwrap_or_default(),
            history,
            kv: Arc::new(kv),
        })
    }
}

#[derive(sqlx::FromRow)]
struct TurnRow {
    o_instance_id: Option<String>,
    o_lock_token: Option<String>,
    o_execution_id: Option<i64>,
    o_attempt_count: Option<i32>,
    o_now_ms: i64,
    o_next_wake_ms: Option<i64>,
    o_skipped: Option<i32>,
    #[sqlx(flatten)]
    data: TurnData,
}

impl PostgresProvider {
    pub(crate) async fn fetch_procedure(
        &self,
        a: &ClaimArgs,
    ) -> Result<Attempt<TurnRows>, ProviderError> {
        let hints = self.inner.history_cache.hints();
        let mut ids = Vec::with_capacity(hints.len());
        let mut executions = Vec::with_capacity(hints.len());
        let mut after = Vec::with_capacity(hints.len());
        let mut guards = Vec::with_capacity(hints.len());
        for (instance, held) in &hints {
            ids.push(instance.as_str());
            executions.push(held.execution_id);
            after.push(held.last_event_id);
            guards.push(held.guard);
        }
        let sql = self.call_sql(&FETCH_ORCHESTRATION_TURN);
        // A resend gets what the first attempt claimed, with the turn read again.
        let call = ClaimCall::new();
        let args = || {
            let args = a
                .bind_to(Args::new(&FETCH_ORCHESTRATION_TURN))
                .bind("p_history_instance_ids", &ids)
                .bind("p_history_execution_ids", &executions)
                .bind("p_history_after_event_ids", &after)
                .bind("p_history_guards", &guards);
            call.bind_tail(args).finish(OP)
        };
        let r = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as_with::<_, TurnRow, _>(&sql, args()?)
        )
        .map_err(|e| db_error(OP, None, e))?;
        super::record_skipped(r.o_skipped);
        let (Some(instance), Some(lock_token)) = (r.o_instance_id, r.o_lock_token) else {
            return Ok(Attempt::Empty {
                wake_in: wake_in(r.o_now_ms, r.o_next_wake_ms),
            });
        };
        let execution_id = r.o_execution_id.unwrap_or(1);
        // The entry the function matched, found the same way: instance and execution.
        let held = hints
            .iter()
            .find(|(i, h)| *i == instance && h.execution_id == execution_id)
            .map(|(_, h)| h);
        let claim = Claim {
            instance,
            lock_token,
            execution_id,
            attempt_count: r.o_attempt_count.unwrap_or(1),
            batch: None,
        };
        match r.data.into_turn_rows(claim, held) {
            Ok(rows) => Ok(Attempt::Claimed(rows)),
            Err((claim, m)) => {
                self.release_claim(&claim.lock_token, &claim.instance).await;
                Err(decode_error(OP, Some(&claim.instance), m))
            }
        }
    }
}
