//! Hybrid path, second round trip: the four reads of a claimed turn, issued concurrently
//! with `tokio::join!`. Each query checks out its own pooled connection, so they
//! overlap on the wire.

use duroxide::providers::ProviderError;

use super::{Claim, OP};
use crate::errors::db_error;
use crate::provider::PostgresProvider;
use crate::sql_fn::{Args, SqlFunction};

pub(crate) static READ_BATCH_MESSAGES: SqlFunction = SqlFunction {
    name: "read_batch_messages",
    args: &["p_lock_token"],
    columns: Some("o_work_item"),
};
pub(crate) static READ_INSTANCE_META: SqlFunction = SqlFunction {
    name: "read_instance_meta",
    args: &["p_instance_id"],
    columns: Some("o_orchestration_name, o_orchestration_version"),
};
pub(crate) static READ_EXECUTION_HISTORY: SqlFunction = SqlFunction {
    name: "read_execution_history",
    args: &["p_instance_id", "p_execution_id"],
    columns: Some("o_event_data"),
};
pub(crate) static READ_KV_SNAPSHOT: SqlFunction = SqlFunction {
    name: "read_kv_snapshot",
    args: &["p_instance_id"],
    columns: Some("o_key, o_value, o_last_updated_at_ms"),
};

type Meta = Option<(String, Option<String>)>;
type KvRows = Vec<(String, String, i64)>;

impl PostgresProvider {
    pub(crate) async fn read_turn(
        &self,
        claim: &Claim,
    ) -> Result<(Meta, Vec<String>, Vec<String>, KvRows), ProviderError> {
        let instance = claim.instance.as_str();
        let (messages_sql, meta_sql, history_sql, kv_sql) = (
            self.call_sql(&READ_BATCH_MESSAGES),
            self.call_sql(&READ_INSTANCE_META),
            self.call_sql(&READ_EXECUTION_HISTORY),
            self.call_sql(&READ_KV_SNAPSHOT),
        );
        let by_token = || {
            Args::new(&READ_BATCH_MESSAGES)
                .bind("p_lock_token", claim.lock_token.as_str())
                .finish(OP)
        };
        let by_instance =
            |f: &'static SqlFunction| Args::new(f).bind("p_instance_id", instance).finish(OP);
        let history_args = || {
            Args::new(&READ_EXECUTION_HISTORY)
                .bind("p_instance_id", instance)
                .bind("p_execution_id", claim.execution_id)
                .finish(OP)
        };
        // Reads: safe to send again after an unknown outcome.
        let (messages, meta, history, kv) = tokio::join!(
            async {
                on_conn!(
                    idempotent: self,
                    fetch_all,
                    sqlx::query_scalar_with::<_, String, _>(&messages_sql, by_token()?)
                )
                .map_err(|e| db_error(OP, Some(instance), e))
            },
            async {
                on_conn!(
                    idempotent: self,
                    fetch_optional,
                    sqlx::query_as_with::<_, (String, Option<String>), _>(
                        &meta_sql,
                        by_instance(&READ_INSTANCE_META)?
                    )
                )
                .map_err(|e| db_error(OP, Some(instance), e))
            },
            async {
                on_conn!(
                    idempotent: self,
                    fetch_all,
                    sqlx::query_scalar_with::<_, String, _>(&history_sql, history_args()?)
                )
                .map_err(|e| db_error(OP, Some(instance), e))
            },
            async {
                on_conn!(
                    idempotent: self,
                    fetch_all,
                    sqlx::query_as_with::<_, (String, String, i64), _>(
                        &kv_sql,
                        by_instance(&READ_KV_SNAPSHOT)?
                    )
                )
                .map_err(|e| db_error(OP, Some(instance), e))
            },
        );
        Ok((meta?, messages?, history?, kv?))
    }
}
