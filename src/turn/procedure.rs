//! Full-procedure path: claim and reads in one call of `fetch_orchestration_full`.

use duroxide::providers::ProviderError;

use super::{Claim, ClaimArgs, OP, TurnRows};
use crate::errors::db_error;
use crate::poll::{Attempt, wake_in};
use crate::provider::PostgresProvider;
use crate::sql_fn::SqlFunction;

pub(crate) static FETCH_ORCHESTRATION_FULL: SqlFunction = SqlFunction {
    name: "fetch_orchestration_full",
    args: super::claim::CLAIM_ARGS,
    columns: Some(
        "o_instance_id, o_lock_token, o_execution_id, o_attempt_count, o_now_ms, o_next_wake_ms, \
         o_skipped, o_has_instance, o_orchestration_name, o_orchestration_version, o_messages, \
         o_history, o_kv_keys, o_kv_values, o_kv_updated_ms",
    ),
};

#[derive(sqlx::FromRow)]
struct FullRow {
    o_instance_id: Option<String>,
    o_lock_token: Option<String>,
    o_execution_id: Option<i64>,
    o_attempt_count: Option<i32>,
    o_now_ms: i64,
    o_next_wake_ms: Option<i64>,
    o_skipped: Option<i32>,
    o_has_instance: Option<bool>,
    o_orchestration_name: Option<String>,
    o_orchestration_version: Option<String>,
    o_messages: Option<Vec<String>>,
    o_history: Option<Vec<String>>,
    o_kv_keys: Option<Vec<String>>,
    o_kv_values: Option<Vec<String>>,
    o_kv_updated_ms: Option<Vec<i64>>,
}

impl PostgresProvider {
    pub(crate) async fn fetch_procedure(
        &self,
        a: &ClaimArgs,
    ) -> Result<Attempt<TurnRows>, ProviderError> {
        let sql = self.call_sql(&FETCH_ORCHESTRATION_FULL);
        let r = on_conn!(
            self,
            fetch_one,
            sqlx::query_as_with::<_, FullRow, _>(&sql, a.bind(&FETCH_ORCHESTRATION_FULL)?)
        )
        .map_err(|e| db_error(OP, None, e))?;
        super::record_skipped(r.o_skipped);
        let (Some(instance), Some(lock_token)) = (r.o_instance_id, r.o_lock_token) else {
            return Ok(Attempt::Empty {
                wake_in: wake_in(r.o_now_ms, r.o_next_wake_ms),
            });
        };
        let meta = if r.o_has_instance.unwrap_or(false) {
            r.o_orchestration_name
                .map(|n| (n, r.o_orchestration_version))
        } else {
            None
        };
        let kv = r
            .o_kv_keys
            .unwrap_or_default()
            .into_iter()
            .zip(r.o_kv_values.unwrap_or_default())
            .zip(r.o_kv_updated_ms.unwrap_or_default())
            .map(|((k, v), ts)| (k, v, ts))
            .collect();
        Ok(Attempt::Claimed(TurnRows {
            claim: Claim {
                instance,
                lock_token,
                execution_id: r.o_execution_id.unwrap_or(1),
                attempt_count: r.o_attempt_count.unwrap_or(1),
            },
            meta,
            messages: r.o_messages.unwrap_or_default(),
            history: r.o_history.unwrap_or_default(),
            kv,
        }))
    }
}
