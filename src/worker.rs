//! Worker queue (activities) and sessions. Every call is one statement: the claim, the
//! session upsert that guards it, and the lease bookkeeping live in data-modifying CTEs,
//! so there is no client-side transaction and no extra round trip.

use std::time::Duration;

use duroxide::providers::{ProviderError, SessionFetchConfig, TagFilter, WorkItem};

use crate::codec::{millis, to_i64, work_item_kind};
use crate::errors::{db_error, decode_error};
use crate::notify::{Interest, Queue};
use crate::poll::{Attempt, wake_in};
use crate::provider::{PostgresProvider, TRACING_TARGET};

/// Oldest visible, unleased item (FIFO by (visible_at, id)) that the tag filter and the
/// session rules admit; leased in the same statement. A session item is only leased if
/// the session upsert wins (unowned, expired, or already ours): otherwise the whole
/// statement returns nothing and changes nothing.
///
/// $1 token, $2 lease ms, $3 has session config, $4 owner id, $5 session lease ms,
/// $6 tag mode (0 default only, 1 tags, 2 default and tags, 3 any), $7 tags.
/// Always one row: the leased item, or NULLs and the next wake-up time (see
/// `sp_fetch_and_lock`).
const FETCH: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
cand AS MATERIALIZED (
    SELECT w.id, w.session_id
    FROM {s}.worker_queue w
    WHERE w.visible_at_ms <= (SELECT now FROM clock)
      AND (w.lock_token IS NULL OR w.locked_until_ms <= (SELECT now FROM clock))
      AND ($6 = 3 OR ($6 IN (0, 2) AND w.tag IS NULL) OR ($6 IN (1, 2) AND w.tag = ANY($7)))
      AND (w.session_id IS NULL OR ($3 AND NOT EXISTS (
              SELECT 1 FROM {s}.sessions s
              WHERE s.session_id = w.session_id
                AND s.locked_until_ms > (SELECT now FROM clock)
                AND s.worker_id <> $4)))
    ORDER BY w.visible_at_ms, w.id
    LIMIT 1
    FOR UPDATE OF w SKIP LOCKED
),
sess AS (
    INSERT INTO {s}.sessions AS s (session_id, worker_id, locked_until_ms, last_activity_at_ms)
    SELECT cand.session_id, $4::TEXT, clock.now + $5::BIGINT, clock.now
    FROM cand, clock
    WHERE cand.session_id IS NOT NULL
    ON CONFLICT (session_id) DO UPDATE
        SET worker_id = EXCLUDED.worker_id,
            locked_until_ms = EXCLUDED.locked_until_ms,
            last_activity_at_ms = EXCLUDED.last_activity_at_ms
        WHERE s.locked_until_ms <= EXCLUDED.last_activity_at_ms OR s.worker_id = EXCLUDED.worker_id
    RETURNING s.session_id
),
leased AS (
    UPDATE {s}.worker_queue w
    SET lock_token = $1, locked_until_ms = clock.now + $2, attempt_count = w.attempt_count + 1
    FROM cand, clock
    WHERE w.id = cand.id AND (cand.session_id IS NULL OR EXISTS (SELECT 1 FROM sess))
    RETURNING w.work_item, w.attempt_count, w.instance_id, w.execution_id, w.activity_id,
              w.session_id, w.tag
)
SELECT l.work_item, l.attempt_count, l.instance_id, l.execution_id, l.activity_id,
       l.session_id, l.tag, clock.now AS now_ms,
       CASE
           WHEN l.work_item IS NOT NULL THEN NULL
           -- Lost a session race for a candidate: look again at once.
           WHEN EXISTS (SELECT 1 FROM cand) THEN clock.now
           ELSE least(
               (SELECT min(w.visible_at_ms) FROM {s}.worker_queue w WHERE w.visible_at_ms > clock.now),
               (SELECT min(w.locked_until_ms) FROM {s}.worker_queue w
                 WHERE w.lock_token IS NOT NULL AND w.locked_until_ms > clock.now),
               (SELECT min(s.locked_until_ms) FROM {s}.sessions s WHERE s.locked_until_ms > clock.now))
       END AS next_wake_ms
FROM clock LEFT JOIN leased l ON true";

/// Deletes the leased item if its lease is live, touches its session, and enqueues the
/// completion for the orchestration, atomically. Records `ack:<call id>` ($5, one per
/// call, reused by its resends) in the enqueue ledger, so a resend of an ack that
/// committed (its reply was lost) is recognised and answered as done instead of "lock
/// not held"; a second, separate ack of the token still fails. Returns (rows acked
/// now, this call acked before).
const ACK: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
done AS (
    DELETE FROM {s}.worker_queue w
    WHERE w.lock_token = $1 AND w.locked_until_ms > (SELECT now FROM clock)
    RETURNING w.session_id
),
touched AS (
    UPDATE {s}.sessions s SET last_activity_at_ms = clock.now
    FROM done, clock
    WHERE s.session_id = done.session_id AND s.locked_until_ms > clock.now
),
completion AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
    SELECT $2::TEXT, $3::TEXT, $4::TEXT, clock.now, clock.now FROM clock
    WHERE $4::TEXT IS NOT NULL AND EXISTS (SELECT 1 FROM done)
    RETURNING 1
),
recorded AS (
    INSERT INTO {s}.enqueue_ledger (enqueue_id, created_at_ms)
    SELECT 'ack:' || $5::TEXT, clock.now FROM clock WHERE EXISTS (SELECT 1 FROM done)
    ON CONFLICT (enqueue_id) DO NOTHING
),
pruned AS (
    DELETE FROM {s}.enqueue_ledger l
    WHERE l.enqueue_id IN (SELECT o.enqueue_id FROM {s}.enqueue_ledger o
                           WHERE o.created_at_ms < (SELECT now FROM clock) - 900000
                           ORDER BY o.created_at_ms LIMIT 16 FOR UPDATE SKIP LOCKED)
)
SELECT (SELECT count(*) FROM done) AS acked,
       EXISTS (SELECT 1 FROM {s}.enqueue_ledger l WHERE l.enqueue_id = 'ack:' || $5::TEXT) AS acked_before
FROM {s}.notify_work_available('orchestrator', (SELECT count(*) FROM completion)) AS n";

const RENEW: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
renewed AS (
    UPDATE {s}.worker_queue w SET locked_until_ms = clock.now + $2
    FROM clock
    WHERE w.lock_token = $1 AND w.locked_until_ms > clock.now
    RETURNING w.session_id
),
touched AS (
    UPDATE {s}.sessions s SET last_activity_at_ms = clock.now
    FROM renewed, clock
    WHERE s.session_id = renewed.session_id AND s.locked_until_ms > clock.now
)
SELECT count(*) FROM renewed";

/// $2 delay ms (NULL = visible now), $3 ignore attempt. Wakes a waiter that can take
/// the item now, or tells waiters when it becomes visible.
const ABANDON: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
released AS (
    UPDATE {s}.worker_queue w
    SET lock_token = NULL, locked_until_ms = NULL,
        visible_at_ms = CASE WHEN $2::BIGINT IS NULL THEN w.visible_at_ms ELSE clock.now + $2 END,
        attempt_count = CASE WHEN $3 THEN greatest(0, w.attempt_count - 1) ELSE w.attempt_count END
    FROM clock
    WHERE w.lock_token = $1
    RETURNING w.instance_id, w.tag, w.session_id, w.visible_at_ms, clock.now
)
SELECT (SELECT r.instance_id FROM released r)
FROM {s}.notify_worker_items(
         (SELECT array_agg(r.tag) FROM released r WHERE r.visible_at_ms <= r.now),
         (SELECT array_agg(r.session_id) FROM released r WHERE r.visible_at_ms <= r.now)) AS n1,
     {s}.notify_delayed('worker',
         (SELECT min(r.visible_at_ms) FROM released r WHERE r.visible_at_ms > r.now)) AS n2";

/// $7 client enqueue id: the item is queued only if the id is new (see
/// `enqueue_ledger`), so a resent statement cannot queue it twice.
const ENQUEUE: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
fresh AS (
    INSERT INTO {s}.enqueue_ledger (enqueue_id, created_at_ms)
    SELECT $7::TEXT, clock.now FROM clock
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
    INSERT INTO {s}.worker_queue (work_item, instance_id, execution_id, activity_id, session_id, tag,
                                  visible_at_ms, created_at_ms)
    SELECT $1::TEXT, $2::TEXT, $3::BIGINT, $4::BIGINT, $5::TEXT, $6::TEXT, clock.now, clock.now
    FROM clock WHERE EXISTS (SELECT 1 FROM fresh)
    RETURNING tag, session_id
)
SELECT (SELECT count(*) FROM queued)
FROM {s}.notify_worker_items((SELECT array_agg(q.tag) FROM queued q),
                             (SELECT array_agg(q.session_id) FROM queued q)) AS n";

const RENEW_SESSIONS: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
renewed AS (
    UPDATE {s}.sessions s SET locked_until_ms = clock.now + $2
    FROM clock
    WHERE s.worker_id = ANY($1) AND s.locked_until_ms > clock.now
      AND s.last_activity_at_ms > clock.now - $3
    RETURNING 1
)
SELECT count(*) FROM renewed";

const CLEANUP_SESSIONS: &str = "\
WITH removed AS (
    DELETE FROM {s}.sessions s
    WHERE s.locked_until_ms < {s}.now_ms()
      AND NOT EXISTS (SELECT 1 FROM {s}.worker_queue w WHERE w.session_id = s.session_id)
    RETURNING 1
)
SELECT count(*) FROM removed";

fn tag_args(filter: &TagFilter) -> Option<(i32, Vec<String>)> {
    let sorted = |s: &std::collections::HashSet<String>| {
        let mut v: Vec<String> = s.iter().cloned().collect();
        v.sort();
        v
    };
    match filter {
        TagFilter::DefaultOnly => Some((0, Vec::new())),
        TagFilter::Tags(s) => Some((1, sorted(s))),
        TagFilter::DefaultAnd(s) => Some((2, sorted(s))),
        TagFilter::Any => Some((3, Vec::new())),
        TagFilter::None => None,
    }
}

#[derive(sqlx::FromRow)]
struct LeaseRow {
    work_item: Option<String>,
    attempt_count: Option<i32>,
    instance_id: Option<String>,
    execution_id: Option<i64>,
    activity_id: Option<i64>,
    session_id: Option<String>,
    tag: Option<String>,
    now_ms: i64,
    next_wake_ms: Option<i64>,
}

/// Activity name of a worker row whose JSON does not decode. No worker registers it, so
/// duroxide treats the item as an unregistered activity: abandoned with back-off (a node
/// running a newer release may decode it meanwhile) and poisoned after `max_attempts`,
/// which fails the activity in its orchestration. Never executed.
pub const UNDECODABLE_ACTIVITY: &str = "duroxide-pg-hybrid: undecodable work item";

impl PostgresProvider {
    pub(crate) async fn fetch_work(
        &self,
        lock_timeout: Duration,
        poll_timeout: Duration,
        session: Option<&SessionFetchConfig>,
        tag_filter: &TagFilter,
    ) -> Result<Option<(WorkItem, String, u32)>, ProviderError> {
        let Some((tag_mode, tags)) = tag_args(tag_filter) else {
            return Ok(None);
        };
        let interest = Interest {
            queue: Queue::Worker,
            tag_mode,
            tags: tags.clone(),
            session_owner: session.map(|s| s.owner_id.clone()),
        };
        let claimed = self
            .poll_for(interest, poll_timeout, || {
                self.lease_work(lock_timeout, session, tag_mode, &tags)
            })
            .await?;
        if let (
            Some((
                WorkItem::ActivityExecute {
                    session_id: Some(sid),
                    ..
                },
                _,
                _,
            )),
            Some(cfg),
        ) = (&claimed, session)
        {
            // This owner's waiter is the one to wake for the session's next item.
            self.inner.notifier.note_session_owner(
                sid,
                &cfg.owner_id,
                tokio::time::Instant::now() + cfg.lock_timeout,
            );
        }
        Ok(claimed)
    }

    async fn lease_work(
        &self,
        lock_timeout: Duration,
        session: Option<&SessionFetchConfig>,
        tag_mode: i32,
        tags: &[String],
    ) -> Result<Attempt<(WorkItem, String, u32)>, ProviderError> {
        const OP: &str = "fetch_work_item";
        let token = format!("work_{}", uuid::Uuid::new_v4());
        let row = on_conn!(
            self,
            fetch_one,
            sqlx::query_as::<_, LeaseRow>(&self.sql(FETCH))
                .bind(&token)
                .bind(millis(lock_timeout))
                .bind(session.is_some())
                .bind(session.map(|s| s.owner_id.as_str()).unwrap_or(""))
                .bind(session.map(|s| millis(s.lock_timeout)).unwrap_or(0))
                .bind(tag_mode)
                .bind(tags)
        )
        .map_err(|e| db_error(OP, None, e))?;
        let (Some(json), Some(instance)) = (row.work_item, row.instance_id) else {
            return Ok(Attempt::Empty {
                wake_in: wake_in(row.now_ms, row.next_wake_ms),
            });
        };
        let attempts = row.attempt_count.unwrap_or(1);
        let item: WorkItem = match serde_json::from_str(&json) {
            Ok(item @ WorkItem::ActivityExecute { .. }) => item,
            decoded => {
                let error = match decoded {
                    Ok(other) => format!("not an ActivityExecute but {}", work_item_kind(&other)),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    target: TRACING_TARGET,
                    operation = OP,
                    instance = %instance,
                    attempt = attempts,
                    error = %error,
                    "worker item does not decode; handing it to duroxide as an unregistered \
                     activity so it is retried with back-off and poisoned after max_attempts"
                );
                // The identity columns locate the activity in its orchestration, so
                // the poison failure reaches the right instance, execution and id.
                WorkItem::ActivityExecute {
                    instance: instance.clone(),
                    execution_id: u64::try_from(row.execution_id.unwrap_or(1)).unwrap_or(1),
                    id: u64::try_from(row.activity_id.unwrap_or(0)).unwrap_or(0),
                    name: UNDECODABLE_ACTIVITY.to_string(),
                    input: format!("worker item does not decode ({error}): {json}"),
                    session_id: row.session_id,
                    tag: row.tag,
                }
            }
        };
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            instance = %instance,
            attempt = attempts,
            "leased work item"
        );
        Ok(Attempt::Claimed((
            item,
            token,
            u32::try_from(attempts).unwrap_or(0),
        )))
    }

    pub(crate) async fn ack_work(
        &self,
        token: &str,
        completion: Option<WorkItem>,
    ) -> Result<(), ProviderError> {
        const OP: &str = "ack_work_item";
        let (instance, kind, json) = match &completion {
            None => (None, None, None),
            Some(
                item @ (WorkItem::ActivityCompleted { instance, .. }
                | WorkItem::ActivityFailed { instance, .. }),
            ) => {
                let json =
                    serde_json::to_string(item).map_err(|e| decode_error(OP, Some(instance), e))?;
                (
                    Some(instance.as_str()),
                    Some(work_item_kind(item)),
                    Some(json),
                )
            }
            Some(other) => {
                return Err(ProviderError::permanent(
                    OP,
                    format!(
                        "a worker completion must be ActivityCompleted or ActivityFailed, got {}",
                        work_item_kind(other)
                    ),
                ));
            }
        };
        // Idempotent through the ledger: resent also when the outcome is unknown, so a
        // lost reply never makes duroxide abandon (and re-run) a completed activity.
        let call_id = uuid::Uuid::new_v4().to_string();
        let (acked, acked_before): (i64, bool) = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as(&self.sql(ACK))
                .bind(token)
                .bind(instance)
                .bind(kind)
                .bind(&json)
                .bind(&call_id)
        )
        .map_err(|e| db_error(OP, instance, e))?;
        if acked == 0 && !acked_before {
            return Err(ProviderError::permanent(
                OP,
                format!(
                    "Invalid lock token or lease expired: work item lock {token} is not held \
                     (already acked, expired, cancelled, or its instance was deleted)"
                ),
            ));
        }
        Ok(())
    }

    pub(crate) async fn renew_work(
        &self,
        token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        const OP: &str = "renew_work_item_lock";
        // Idempotent (extends to now + extend_for): resent also after a lost reply.
        let renewed: i64 = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_scalar(&self.sql(RENEW))
                .bind(token)
                .bind(millis(extend_for))
        )
        .map_err(|e| db_error(OP, None, e))?;
        if renewed == 0 {
            return Err(ProviderError::permanent(
                OP,
                format!("work item lock {token} is not held (expired, acked, or cancelled)"),
            ));
        }
        Ok(())
    }

    pub(crate) async fn abandon_work(
        &self,
        token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        const OP: &str = "abandon_work_item";
        let row: Option<String> = on_conn!(
            self,
            fetch_one,
            sqlx::query_scalar(&self.sql(ABANDON))
                .bind(token)
                .bind(delay.map(millis))
                .bind(ignore_attempt)
        )
        .map_err(|e| db_error(OP, None, e))?;
        match row {
            Some(_) => Ok(()),
            None => Err(ProviderError::permanent(
                OP,
                format!("Invalid lock token or already acked: work item lock {token} is not held"),
            )),
        }
    }

    pub(crate) async fn enqueue_worker(&self, item: WorkItem) -> Result<(), ProviderError> {
        const OP: &str = "enqueue_for_worker";
        let WorkItem::ActivityExecute {
            instance,
            execution_id,
            id,
            session_id,
            tag,
            ..
        } = &item
        else {
            return Err(ProviderError::permanent(
                OP,
                format!(
                    "only ActivityExecute goes to the worker queue, got {}",
                    work_item_kind(&item)
                ),
            ));
        };
        let bad = |m: String| decode_error(OP, Some(instance), m);
        let json = serde_json::to_string(&item).map_err(|e| bad(e.to_string()))?;
        // One id per call, reused by resends: the statement is idempotent.
        let enqueue_id = uuid::Uuid::new_v4().to_string();
        on_conn!(
            idempotent: self,
            execute,
            sqlx::query(&self.sql(ENQUEUE))
                .bind(&json)
                .bind(instance)
                .bind(to_i64("execution_id", *execution_id).map_err(bad)?)
                .bind(to_i64("activity id", *id).map_err(bad)?)
                .bind(session_id)
                .bind(tag)
                .bind(&enqueue_id)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        Ok(())
    }

    pub(crate) async fn renew_sessions(
        &self,
        owner_ids: &[&str],
        extend_for: Duration,
        idle_timeout: Duration,
    ) -> Result<usize, ProviderError> {
        if owner_ids.is_empty() {
            return Ok(0);
        }
        let n: i64 = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_scalar(&self.sql(RENEW_SESSIONS))
                .bind(owner_ids)
                .bind(millis(extend_for))
                .bind(millis(idle_timeout))
        )
        .map_err(|e| db_error("renew_session_lock", None, e))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub(crate) async fn cleanup_sessions(&self) -> Result<usize, ProviderError> {
        let n: i64 = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_scalar(&self.sql(CLEANUP_SESSIONS))
        )
        .map_err(|e| db_error("cleanup_orphaned_sessions", None, e))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}
