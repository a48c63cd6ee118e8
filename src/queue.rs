//! Orchestrator queue entry point outside a turn: the client enqueue. (A turn's lease
//! operations live in `turn/`.)

use std::time::Duration;

use duroxide::providers::{ProviderError, WorkItem};

use crate::codec::{encode_item, millis};
use crate::errors::{db_error, decode_error};
use crate::provider::PostgresProvider;

/// $4 delay ms (0 = visible now). Visibility is the database clock plus the delay; a
/// TimerFired enqueued here uses the delay, not its fire_at_ms (duroxide's contract).
const ENQUEUE: &str = "\
WITH queued AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
    SELECT $1::TEXT, $2::TEXT, $3::TEXT, c.now + $4::BIGINT, c.now FROM (SELECT {s}.now_ms() AS now) c
    RETURNING 1
)
SELECT count(*) FROM queued, {s}.notify_work_available('orchestrator', CASE WHEN $4::BIGINT <= 0 THEN 1 ELSE 0 END)";

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
        on_conn!(
            self,
            execute,
            sqlx::query(&self.sql(ENQUEUE))
                .bind(&enc.instance)
                .bind(enc.kind)
                .bind(&enc.json)
                .bind(delay.map(millis).unwrap_or(0))
        )
        .map_err(|e| db_error(OP, Some(&enc.instance), e))?;
        Ok(())
    }
}
