//! Hybrid path, second round trip: the reads of a claimed turn, issued concurrently with
//! `tokio::join!`. Each query checks out its own pooled connection, so they overlap on
//! the wire. The history read asks only for the events after those the history cache
//! holds (`read_history_since`).
//!
//! The claim returns the batch and the instance row's name and version with its keys
//! (`sp_fetch_and_lock` tags those rows and reads that row anyway), so a turn reads its
//! history and KV snapshot. A turn of an execution whose previous turn this process ran
//! reads only its history: the KV snapshot that turn read stays `kv_store`'s content
//! until the execution ends (`HistoryRows::carried_kv`). When the history read shows that
//! the entry no longer describes the execution (not incremental, or an event that ends
//! it), the KV read follows, still under the claim's lease. A claim without its batch
//! (none is made today; kept so a claim from any caller is served) reads the messages and
//! the instance row too.

use std::sync::Arc;

use duroxide::providers::ProviderError;
use futures::future::OptionFuture;

use super::{Batch, Claim, HistoryRows, OP};
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
    /// `batch`: what the claim returned of the turn (`None`: read it here).
    pub(crate) async fn read_turn(
        &self,
        claim: &Claim,
        batch: Option<Box<Batch>>,
    ) -> Result<TurnReads, ProviderError> {
        let held = self
            .inner
            .history_cache
            .held(&claim.instance, claim.execution_id);
        let kv_held = held.as_ref().is_some_and(|h| h.kv.is_some());
        let unread = batch.is_none();
        let (messages, meta, history, kv) = tokio::join!(
            OptionFuture::from(unread.then(|| self.read_messages(claim))),
            OptionFuture::from(unread.then(|| self.read_meta(claim))),
            self.read_history(claim, held.as_ref()),
            OptionFuture::from((!kv_held).then(|| self.read_kv(claim))),
        );
        let history = history?;
        let (messages, meta) = match batch {
            Some(b) => {
                let Batch { messages, meta } = *b;
                (messages, meta)
            }
            None => (
                messages.transpose()?.unwrap_or_default(),
                meta.transpose()?.flatten(),
            ),
        };
        let mut issued = 1 + if unread { 2 } else { 0 } + u64::from(!kv_held);
        let kv = match (kv.transpose()?, history.carried_kv()) {
            (Some(rows), _) => Arc::new(rows),
            (None, Some(kv)) => kv,
            (None, None) => {
                issued += 1;
                Arc::new(self.read_kv(claim).await?)
            }
        };
        if issued < 4 {
            metrics::counter!("duroxide_pg_turn_reads_skipped_total").increment(4 - issued);
        }
        Ok(TurnReads {
            meta,
            messages,
            history,
            kv,
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
