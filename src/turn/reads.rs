//! Hybrid path, second round trip: the reads of a claimed turn, issued concurrently with
//! `tokio::join!`. Each query checks out its own pooled connection, so they overlap on
//! the wire. The history read asks only for the events after those the history cache
//! holds (`read_history_since`).
//!
//! A turn of an execution whose previous turn this process ran needs two reads, not
//! four: the instance's name and version are those of the execution's
//! `OrchestrationStarted` event (what every ack of the execution writes to the instance
//! row), and the KV snapshot is the one that turn read, which stays `kv_store`'s content
//! until the execution ends (`HistoryRows::carried_kv`). When the history read shows
//! that the entry no longer describes the execution (not incremental, or an event that
//! ends it), the two reads follow, still under the claim's lease.

use std::sync::Arc;

use duroxide::providers::ProviderError;
use duroxide::{Event, EventKind};

use super::{Claim, HistoryRows, OP};
use crate::errors::db_error;
use crate::history_cache::{Held, KvRows};
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

/// `(name, version)` of the instance row, `None` when there is none yet.
type Meta = Option<(String, Option<String>)>;

/// What the hybrid path read for a claimed turn.
pub(crate) struct TurnReads {
    pub meta: Meta,
    pub messages: Vec<String>,
    pub history: HistoryRows,
    pub kv: Arc<KvRows>,
}

impl PostgresProvider {
    pub(crate) async fn read_turn(&self, claim: &Claim) -> Result<TurnReads, ProviderError> {
        let held = self
            .inner
            .history_cache
            .held(&claim.instance, claim.execution_id);
        let started = held
            .as_ref()
            .filter(|h| h.kv.is_some())
            .and_then(|h| started_meta(&h.events));
        if let Some(meta) = started {
            let (messages, history) = tokio::join!(
                self.read_messages(claim),
                self.read_history(claim, held.as_ref())
            );
            let (messages, history) = (messages?, history?);
            if let Some(kv) = history.carried_kv() {
                metrics::counter!("duroxide_pg_turn_reads_skipped_total").increment(2);
                return Ok(TurnReads {
                    meta: Some(meta),
                    messages,
                    history,
                    kv,
                });
            }
            let (meta, kv) = tokio::join!(self.read_meta(claim), self.read_kv(claim));
            return Ok(TurnReads {
                meta: meta?,
                messages,
                history,
                kv: Arc::new(kv?),
            });
        }
        let (messages, meta, history, kv) = tokio::join!(
            self.read_messages(claim),
            self.read_meta(claim),
            self.read_history(claim, held.as_ref()),
            self.read_kv(claim),
        );
        Ok(TurnReads {
            meta: meta?,
            messages: messages?,
            history: history?,
            kv: Arc::new(kv?),
        })
    }

    // Reads: safe to send again after an unknown outcome.

    async fn read_messages(&self, claim: &Claim) -> Result<Vec<String>, ProviderError> {
        let args = || {
            Args::new(&READ_BATCH_MESSAGES)
                .bind("p_lock_token", claim.lock_token.as_str())
                .finish(OP)
        };
        on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar_with::<_, String, _>(&self.call_sql(&READ_BATCH_MESSAGES), args()?)
        )
        .map_err(|e| db_error(OP, Some(&claim.instance), e))
    }

    async fn read_meta(&self, claim: &Claim) -> Result<Meta, ProviderError> {
        let args = || {
            Args::new(&READ_INSTANCE_META)
                .bind("p_instance_id", claim.instance.as_str())
                .finish(OP)
        };
        on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_as_with::<_, (String, Option<String>), _>(
                &self.call_sql(&READ_INSTANCE_META),
                args()?
            )
        )
        .map_err(|e| db_error(OP, Some(&claim.instance), e))
    }

    async fn read_history(
        &self,
        claim: &Claim,
        held: Option<&Held>,
    ) -> Result<HistoryRows, ProviderError> {
        let instance = claim.instance.as_str();
        let args = || {
            Args::new(&READ_HISTORY_SINCE)
                .bind("p_instance_id", instance)
                .bind("p_execution_id", claim.execution_id)
                .bind("p_after_event_id", held.map(|h| h.last_event_id))
                .bind("p_guard", held.map(|h| h.guard))
                .finish(OP)
        };
        let h = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as_with::<_, HistorySinceRow, _>(
                &self.call_sql(&READ_HISTORY_SINCE),
                args()?
            )
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        HistoryRows::from_read(
            h.o_incremental,
            held,
            h.o_events,
            h.o_last_event_id,
            h.o_last_guard,
        )
        .map_err(|m| crate::errors::decode_error(OP, Some(instance), m))
    }

    async fn read_kv(&self, claim: &Claim) -> Result<KvRows, ProviderError> {
        let args = || {
            Args::new(&READ_KV_SNAPSHOT)
                .bind("p_instance_id", claim.instance.as_str())
                .finish(OP)
        };
        on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_as_with::<_, (String, String, i64), _>(
                &self.call_sql(&READ_KV_SNAPSHOT),
                args()?
            )
        )
        .map_err(|e| db_error(OP, Some(&claim.instance), e))
    }
}

/// Name and version of the execution's `OrchestrationStarted` event, as the instance row
/// holds them once the execution's first turn is acked.
fn started_meta(events: &[Event]) -> Meta {
    events.iter().find_map(|e| match &e.kind {
        EventKind::OrchestrationStarted { name, version, .. } => {
            Some((name.clone(), Some(version.clone())))
        }
        _ => None,
    })
}
