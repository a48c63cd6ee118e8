//! Full-procedure path: claim and reads in one call of `fetch_orchestration_full`.

use duroxide::providers::ProviderError;

use super::{Claim, ClaimArgs, TurnRows, OP};
use crate::errors::db_error;
use crate::provider::PostgresProvider;

const FETCH_FULL: &str = "SELECT o_instance_id, o_lock_token, o_execution_id, o_attempt_count, \
     o_has_instance, o_orchestration_name, o_orchestration_version, \
     o_messages, o_history, o_kv_keys, o_kv_values, o_kv_updated_ms \
     FROM {s}.fetch_orchestration_full($1, $2, $3, $4, $5, $6, $7, $8)";

#[derive(sqlx::FromRow)]
struct FullRow {
    o_instance_id: String,
    o_lock_token: String,
    o_execution_id: i64,
    o_attempt_count: i32,
    o_has_instance: bool,
    o_orchestration_name: Option<String>,
    o_orchestration_version: Option<String>,
    o_messages: Vec<String>,
    o_history: Vec<String>,
    o_kv_keys: Vec<String>,
    o_kv_values: Vec<String>,
    o_kv_updated_ms: Vec<i64>,
}

impl PostgresProvider {
    pub(crate) async fn fetch_procedure(&self, a: &ClaimArgs) -> Result<Option<TurnRows>, ProviderError> {
        let row = sqlx::query_as::<_, FullRow>(&self.sql(FETCH_FULL))
            .bind(a.lock_timeout_ms)
            .bind(a.filter_enabled)
            .bind(a.min.0)
            .bind(a.min.1)
            .bind(a.min.2)
            .bind(a.max.0)
            .bind(a.max.1)
            .bind(a.max.2)
            .fetch_optional(self.pool_ref())
            .await
            .map_err(|e| db_error(OP, None, e))?;
        Ok(row.map(|r| {
            let meta = if r.o_has_instance {
                r.o_orchestration_name.map(|n| (n, r.o_orchestration_version))
            } else {
                None
            };
            let kv = r
                .o_kv_keys
                .into_iter()
                .zip(r.o_kv_values)
                .zip(r.o_kv_updated_ms)
                .map(|((k, v), ts)| (k, v, ts))
                .collect();
            TurnRows {
                claim: Claim {
                    o_instance_id: r.o_instance_id,
                    o_lock_token: r.o_lock_token,
                    o_execution_id: r.o_execution_id,
                    o_attempt_count: r.o_attempt_count,
                },
                meta,
                messages: r.o_messages,
                history: r.o_history,
                kv,
            }
        }))
    }
}
