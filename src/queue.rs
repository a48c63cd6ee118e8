//! Orchestrator queue entry point outside a turn: the client enqueue. (A turn's lease
//! operations live in `turn/`.)

use std::time::Duration;

use duroxide::providers::{ProviderError, WorkItem};

use crate::codec::{encode_item, millis};
use crate::errors::{db_error, decode_error};
use crate::handover::TurnOffer;
use crate::options::FetchPath;
use crate::provider::PostgresProvider;
use crate::sql_fn::{Args, SqlFunction};
use crate::turn::{TurnData, claim_args};

/// The client enqueue (`enqueue_orchestrator_item`, migrations/functions/
/// 10_client_enqueue.sql). Visibility is the database clock plus the delay (0 = visible
/// now); a TimerFired enqueued here uses the delay, not its fire_at_ms (duroxide's
/// contract). The enqueue id makes it idempotent: the item is queued only if the id is
/// new (see `enqueue_ledger`), so a resent statement cannot deliver it twice. A delayed
/// item tells waiting fetches when it becomes visible.
pub(crate) static ENQUEUE_ORCHESTRATOR_ITEM: SqlFunction = SqlFunction {
    name: "enqueue_orchestrator_item",
    args: &[
        "p_instance_id",
        "p_kind",
        "p_work_item",
        "p_delay_ms",
        "p_enqueue_id",
    ],
    columns: None,
};

/// The client enqueue while a local orchestration fetch waits
/// (`enqueue_orchestrator_handover`, migrations/functions/09_handover.sql): the enqueue
/// above, then the claim of the instance's turn for that fetch (handover.rs).
pub(crate) static ENQUEUE_ORCHESTRATOR_HANDOVER: SqlFunction = SqlFunction {
    name: "enqueue_orchestrator_handover",
    args: claim_args!(
        [
            "p_instance_id",
            "p_kind",
            "p_work_item",
            "p_enqueue_id",
            "p_turn_lock_token",
        ],
        "p_read_turn",
        "p_history_execution_id",
        "p_history_after_event_id",
        "p_history_guard",
    ),
    columns: Some(
        "o_queued, o_execution_id, o_attempt_count, o_has_instance, o_orchestration_name, \
         o_orchestration_version, o_messages, o_history_incremental, o_history, \
         o_history_last_event_id, o_history_last_guard, o_kv_keys, o_kv_values, \
         o_kv_updated_ms",
    ),
};

#[derive(sqlx::FromRow)]
struct HandoverEnqueueRow {
    o_execution_id: Option<i64>,
    o_attempt_count: Option<i32>,
    #[sqlx(flatten)]
    turn: TurnData,
}

impl PostgresProvider {
    pub(crate) async fn enqueue_orchestrator(
        &self,
        item: WorkItem,
        delay: Option<Duration>,
    ) -> Result<(), ProviderError> {
        const OP: &str = "enqueue_for_orchestrator";
        if matches!(item, WorkItem::ActivityExecute { .. }) {
            return Err(ProviderError::permanent(
                OP,
                "Invalid work item type: ActivityExecute belongs to the worker queue",
            ));
        }
        let enc = encode_item(&item).map_err(|m| decode_error(OP, None, m))?;
        // One id per call, reused by resends: the statement is idempotent.
        let enqueue_id = uuid::Uuid::new_v4().to_string();
        let delay_ms = delay.map(millis).unwrap_or(0);
        // An item visible now, while a local orchestration fetch waits: the enqueue
        // claims the instance's turn for it (handover.rs). A start's turn is read in the
        // same call on the hybrid path too: it is small (a new instance has no history
        // and no KV), and its reads would be a round trip before the first turn.
        let read_turn = self.fetch_path() == FetchPath::Procedure
            || matches!(item, WorkItem::StartOrchestration { .. });
        if delay_ms <= 0
            && let Some(offer) = self.offer_turn(&enc.instance, None, read_turn)
        {
            let sql = self.call_sql(&ENQUEUE_ORCHESTRATOR_HANDOVER);
            let args = || {
                let a = Args::new(&ENQUEUE_ORCHESTRATOR_HANDOVER)
                    .bind("p_instance_id", enc.instance.as_str())
                    .bind("p_kind", enc.kind)
                    .bind("p_work_item", enc.json.as_str())
                    .bind("p_enqueue_id", enqueue_id.as_str());
                TurnOffer::bind(Some(&offer), a).finish(OP)
            };
            let row = on_conn!(
                idempotent: self,
                fetch_one,
                sqlx::query_as_with::<_, HandoverEnqueueRow, _>(&sql, args()?)
            )
            .map_err(|e| db_error(OP, Some(&enc.instance), e))?;
            self.settle_turn_offer(
                offer,
                &enc.instance,
                row.o_execution_id,
                row.o_attempt_count,
                row.turn,
                OP,
            )
            .await;
            return Ok(());
        }
        let sql = self.call_sql(&ENQUEUE_ORCHESTRATOR_ITEM);
        let args = || {
            Args::new(&ENQUEUE_ORCHESTRATOR_ITEM)
                .bind("p_instance_id", enc.instance.as_str())
                .bind("p_kind", enc.kind)
                .bind("p_work_item", enc.json.as_str())
                .bind("p_delay_ms", delay_ms)
                .bind("p_enqueue_id", enqueue_id.as_str())
                .finish(OP)
        };
        on_conn!(
            idempotent: self,
            execute,
            sqlx::query_with(&sql, args()?)
        )
        .map_err(|e| db_error(OP, Some(&enc.instance), e))?;
        Ok(())
    }
}
