//! Orchestrator queue entry points outside fetch/ack: client enqueue, and the lease
//! operations of a claimed turn (abandon, renew).

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
const ENQUEUE: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
fresh AS (
    INSERT INTO {s}.enqueue_ledger (enqueue_id, created_at_ms)
    SELECT $5::TEXT, clock.now FROM clock
    ON CONFLICT (enqueue_id) DO NOTHING
    RETURNING 1
),
pruned AS (
    DELETE FROM {s}.enqueue_ledger l
    WHERE l.enqueue_id IN (SELECT o.enqueue_id FROM {s}.enqueue_ledger o
                           WHERE o.created_at_ms < (SELECT now FROM clock) - 900000
                           ORDER BY o.created_at_ms LIMIT 16 FOR UPDATE SKIP LOCKED)
),
queued AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
    SELECT $1::TEXT, $2::TEXT, $3::TEXT, clock.now + greatest($4::BIGINT, 0), clock.now
    FROM clock WHERE EXISTS (SELECT 1 FROM fresh)
    RETURNING visible_at_ms
)
SELECT (SELECT count(*) FROM queued)
FROM {s}.notify_work_available('orchestrator',
         CASE WHEN $4::BIGINT <= 0 THEN (SELECT count(*) FROM queued) ELSE 0 END) AS n1,
     {s}.notify_delayed('orchestrator',
         CASE WHEN $4::BIGINT > 0 THEN (SELECT min(visible_at_ms) FROM queued) END) AS n2";

/// Drops the lease and hands the batch back: only rows tagged with this token change.
/// $2 delay ms (NULL = visible as before), $3 ignore attempt. Wakes a waiter now, or
/// tells waiters when the delayed batch becomes visible.
const ABANDON: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
released AS (
    DELETE FROM {s}.instance_locks l WHERE l.lock_token = $1 RETURNING l.instance_id
),
requeued AS (
    UPDATE {s}.orchestrator_queue q
    SET lock_token = NULL,
        visible_at_ms = CASE WHEN $2::BIGINT IS NULL THEN q.visible_at_ms ELSE clock.now + $2 END,
        attempt_count = CASE WHEN $3 THEN greatest(0, q.attempt_count - 1) ELSE q.attempt_count END
    FROM clock
    WHERE q.lock_token = $1 AND EXISTS (SELECT 1 FROM released)
    RETURNING q.visible_at_ms
)
SELECT (SELECT r.instance_id FROM released r)
FROM clock,
     {s}.notify_work_available('orchestrator',
         CASE WHEN EXISTS (SELECT 1 FROM released) AND $2::BIGINT IS NULL THEN 1 ELSE 0 END) AS n1,
     {s}.notify_delayed('orchestrator',
         CASE WHEN $2::BIGINT IS NOT NULL
              THEN (SELECT min(r.visible_at_ms) FROM requeued r) END) AS n2";

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

    pub(crate) async fn abandon_orchestration(
        &self,
        lock_token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        const OP: &str = "abandon_orchestration_item";
        let released: Option<String> = on_conn!(
            self,
            fetch_one,
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
        // Idempotent (extends to now + extend_for): resent also after a lost reply.
        let renewed: Option<String> = on_conn!(
            idempotent: self,
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
