//! Orchestrator queue entry point outside a turn: the client enqueue. (A turn's lease
//! operations live in `turn/`.)

use std::time::Duration;

use duroxide::providers::{ProviderError, WorkItem};

use crate::codec::{encode_item, millis};
use crate::errors::{db_error, decode_error};
use crate::provider::PostgresProvider;

/// $4 delay ms (0 = visible now). Visibility is the database clock plus the delay; a
/// TimerFired enqueued here uses the delay, not its fire_at_ms (duroxide's contract).
/// $5 client enqueue id: the item is queued only if the id is new (see
/// `enqueue_ledger`), so a resent statement cannot deliver it twice. A delayed item
/// tells waiting fetches when it becomes visible.
const ENQUEUE: &str = concat!(
    enqueue_ledger_ctes!("$5"),
    "queued AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
    SELECT $1::TEXT, $2::TEXT, $3::TEXT, clock.now + greatest($4::BIGINT, 0), clock.now
    FROM clock WHERE EXISTS (SELECT 1 FROM fresh)
    RETURNING visible_at_ms
)
SELECT (SELECT count(*) FROM queued)
FROM {s}.notify_work_available('orchestrator',
         CASE WHEN $4::BIGINT <= 0 THEN (SELECT count(*) FROM queued) ELSE 0 END) AS n1,
     {s}.notify_delayed('orchestrator',
         CASE WHEN $4::BIGINT > 0 THEN (SELECT min(visible_at_ms) FROM queued) END) AS n2"
);

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
        on_conn!(
            idempotent: self,
            execute,
            sqlx::query(&self.sql(ENQUEUE))
                .bind(&enc.instance)
                .bind(enc.kind)
                .bind(&enc.json)
                .bind(delay.map(millis).unwrap_or(0))
                .bind(&enqueue_id)
        )
        .map_err(|e| db_error(OP, Some(&enc.instance), e))?;
        Ok(())
    }
}
