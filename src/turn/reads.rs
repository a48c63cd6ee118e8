//! Hybrid path, second round trip: the four reads of a claimed turn, issued concurrently
//! with `tokio::join!`. Each query checks out its own pooled connection, so they
//! overlap on the wire. The history read asks only for the events after those the
//! history cache holds (`read_history_since`).

use duroxide::providers::ProviderError;

use super::{Claim, HistoryRows, OP};
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
/// The history read of a turn, given what the history cache holds.
pub(crate) static READ_HISTORY_SINCE: SqlFunction = SqlFunction {
    name: "read_history_since",
    args: &[
        "p_instance_id",
        "p_execution_id",
        "p_after_event_id",
        "p_guard",
    ],
    columns: Some("o_incremental, o_events, o_last_event_id, o_last_guard"),
};
pub(crate) static READ_KV_SNAPSHOT: SqlFunction = SqlFunction {
    name: "read_kv_snapshot",
    args: &["p_instance_id"],
    columns: Some("o_key, o_value, o_last_updated_at_ms"),
};

#[derive(sqlx::FromRow)]
struct HistorySinceRow {
    o_incremental: bool,
    o_events: Vec<String>,
    o_last_event_id: Option<i64>,
    o_last_guard: Option<i64>,
}

type Meta = Option<(String, Option<String>)>;
type KvRows = Vec<(String, String, i64)>;

impl PostgresProvider {
    pub(crate) async fn read_turn(
        &self,
        claim: &Claim,
    ) -> Result<(Meta, Vec<String>, HistoryRows, KvRows), ProviderError> {
        let instance = claim.instance.as_str();
        let (messages_sql, meta_sql, history_sql, kv_sql) = (
            self.call_sql(&READ_BATCH_MESSAGES),
            self.call_sql(&READ_INSTANCE_META),
            self.call_sql(&READ_HISTORY_SINCE),
            self.call_sql(&READ_KV_SNAPSHOT),
        );
        let held = self.inner.history_cache.held(instance, claim.execution_id);
        let by_token = || {
            Args::new(&READ_BATCH_MESSAGES)
                .bind("p_lock_token", claim.lock_token.as_str())
                .finish(OP)
        };
        let by_instance =
            |f: &'static SqlFunction| Args::new(f).bind("p_instance_id", instance).finish(OP);
        let history_args = || {
            Args::new(&READ_HISTORY_SINCE)
                .bind("p_instance_id", instance)
                .bind("p_execution_id", claim.execution_id)
                .bind("p_after_event_id", held.as_ref().map(|h| h.last_event_id))
                .bind("p_guard", held.as_ref().map(|h| h.guard))
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
                    fetch_one,
                    sqlx::query_as_with::<_, HistorySinceRow, _>(&history_sql, history_args()?)
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
        let h = history?;
        let history = HistoryRows::from_read(
            h.o_incremental,
            held.as_ref(),
            h.o_events,
            h.o_last_event_id,
            h.o_last_guard,
        )
        .map_err(|m| crate::errors::decode_error(OP, Some(instance), m))?;
        Ok((meta?, messages?, history, kv?))
    }
}
