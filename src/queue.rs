//! Orchestrator queue entry points outside fetch/ack: client enqueue, and the lease
//! operations of a claimed turn (abandon, renew).

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

/// Drops the lease and hands the batch back: only rows tagged with this token change.
/// $2 delay ms (NULL = visible as before), $3 ignore attempt.
const ABANDON: &str = "\
WITH released AS (
    DELETE FROM {s}.instance_locks l WHERE l.lock_token = $1 RETURNING l.instance_id
),
requeued AS (
    UPDATE {s}.orchestrator_queue q
    SET lock_token = NULL,
        visible_at_ms = CASE WHEN $2::BIGINT IS NULL THEN q.visible_at_ms ELSE {s}.now_ms() + $2 END,
        attempt_count = CASE WHEN $3 THEN greatest(0, q.attempt_count - 1) ELSE q.attempt_count END
    WHERE q.lock_token = $1 AND EXISTS (SELECT 1 FROM released)
)
SELECT r.instance_id
FROM released r, {s}.notify_work_available('orchestrator', CASE WHEN $2::BIGINT IS NULL THEN 1 ELSE 0 END)";

const RENEW: &str = "\
UPDATE {s}.instance_locks l SET locked_until_ms = c.now + $2
FROM (SELECT {s}.now_ms() AS now) c
WHERE l.lock_token = $1 AND l.locked_until_ms > c.now
RETURNING l.instance_id";

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

    pub(crate) async fn abandon_orchestration(
        &self,
        lock_token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        const OP: &str = "abandon_orchestration_item";
        let released: Option<String> = on_conn!(
            self,
            fetch_optional,
            sqlx::query_scalar(&self.sql(ABANDON))
                .bind(lock_token)
                .bind(delay.map(millis))
                .bind(ignore_attempt)
        )
        .map_err(|e| db_error(OP, None, e))?;
        match released {
            Some(instance) => {
                tracing::debug!(
                    target: crate::provider::TRACING_TARGET,
                    operation = OP,
                    instance = %instance,
                    delay_ms = delay.map(millis),
                    ignore_attempt,
                    "abandoned orchestration turn"
                );
                Ok(())
            }
            None => Err(ProviderError::permanent(
                OP,
                format!("Invalid lock token: {lock_token} holds no lease"),
            )),
        }
    }

    pub(crate) async fn renew_orchestration(
        &self,
        lock_token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        const OP: &str = "renew_orchestration_item_lock";
        let renewed: Option<String> = on_conn!(
            self,
            fetch_optional,
            sqlx::query_scalar(&self.sql(RENEW))
                .bind(lock_token)
                .bind(millis(extend_for))
        )
        .map_err(|e| db_error(OP, None, e))?;
        match renewed {
            Some(_) => Ok(()),
            None => Err(ProviderError::permanent(
                OP,
                format!("Invalid lock token or lease expired: {lock_token} holds no live lease"),
            )),
        }
    }
}
