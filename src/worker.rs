//! Worker queue (activities) and sessions. Every call is one statement: the claim, the
//! session upsert that guards it, and the lease bookkeeping live in data-modifying CTEs,
//! so there is no client-side transaction and no extra round trip.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use duroxide::providers::{ProviderError, SessionFetchConfig, TagFilter, WorkItem};

use crate::codec::{decode_history, millis, to_i64, work_item_kind};
use crate::errors::{db_error, decode_error};
use crate::handover::{ClaimSpec, Handed, TurnOffer};
use crate::notify::{Interest, Queue};
use crate::options::FetchPath;
use crate::poll::{Attempt, wake_in};
use crate::provider::{PostgresProvider, TRACING_TARGET};
use crate::sql_fn::{Args, SqlFunction};
use crate::turn::{TurnData, claim_args};

/// The worker claim (`claim_worker_item`, migrations/functions/09_handover.sql: an item
/// whose lease expired, else the oldest visible, unleased item the tag filter and the
/// session rules admit, leased; the same claim an orchestration ack makes for a waiting
/// fetch) plus, when nothing was leased, the next wake-up time (`p_next_wake`).
///
/// $1 token, $2 lease ms, $3 has session config, $4 owner id, $5 session lease ms,
/// $6 tag mode (0 default only, 1 tags, 2 default and tags, 3 any), $7 tags, $8 this is
/// a resend of the call (same token) after a lost reply: the item its first attempt
/// leased comes back, if that attempt committed.
/// Always one row: the leased item, or NULLs and the next wake-up time (see
/// `sp_fetch_and_lock`).
/// The worker claim, and for a claimed activity its instance's history when that is
/// short (at most $9 events and $10 bytes of the latest execution, the one `read` picks;
/// NULL otherwise, or with $9 = 0): duroxide 0.1.32's worker reads that history before
/// every activity, for the orchestration's name and version, and the provider answers
/// that read with this one (`handover_reads.rs`) instead of a round trip of its own. A
/// longer history is read when asked, incrementally through the history cache. (In this
/// statement, not in a PL/pgSQL wrapper of the claim: such a call cost more server time
/// than the read it saved.) The history is read with the statement's snapshot, taken
/// before the claim's: the caller keeps it only if it holds the activity's scheduling
/// event.
const FETCH: &str = "\
SELECT c.o_work_item AS work_item, c.o_attempt_count AS attempt_count,
       c.o_instance_id AS instance_id, c.o_execution_id AS execution_id,
       c.o_activity_id AS activity_id, c.o_session_id AS session_id, c.o_tag AS tag,
       c.o_now_ms AS now_ms, c.o_next_wake_ms AS next_wake_ms,
       CASE WHEN $9 > 0 AND c.o_work_item IS NOT NULL THEN (
           SELECT CASE WHEN count(*) <= $9 AND coalesce(sum(octet_length(r.event_data)), 0) <= $10
                       THEN array_agg(r.event_data ORDER BY r.event_id) END
           FROM (SELECT h.event_id, h.event_data
                 FROM {s}.history h
                 WHERE h.instance_id = c.o_instance_id
                   AND h.execution_id = (SELECT coalesce(max(e.execution_id), 1)
                                         FROM {s}.executions e
                                         WHERE e.instance_id = c.o_instance_id)
                 ORDER BY h.event_id
                 LIMIT $9 + 1) r
       ) END AS history
FROM {s}.claim_worker_item(p_lock_token => $1, p_lock_timeout_ms => $2,
    p_has_session => $3, p_owner_id => $4, p_session_lock_timeout_ms => $5,
    p_tag_mode => $6, p_tags => $7, p_next_wake => TRUE, p_resend => $8) c";

/// The largest history a worker fetch brings along (see [`FETCH`]). Bytes are bounded so
/// that a growing history does not travel whole with every activity.
const FETCH_HISTORY_MAX_EVENTS: i32 = 100;
const FETCH_HISTORY_MAX_BYTES: i32 = 8 * 1024;

/// Signature of the worker claim, for `tests/sql_boundary.rs` (called inside [`FETCH`]).
pub(crate) static CLAIM_WORKER_ITEM: SqlFunction = SqlFunction {
    name: "claim_worker_item",
    args: &[
        "p_lock_token",
        "p_lock_timeout_ms",
        "p_has_session",
        "p_owner_id",
        "p_session_lock_timeout_ms",
        "p_tag_mode",
        "p_tags",
        "p_next_wake",
        "p_resend",
    ],
    columns: Some(
        "o_work_item, o_attempt_count, o_instance_id, o_execution_id, o_activity_id, \
         o_session_id, o_tag, o_now_ms, o_candidate, o_next_wake_ms",
    ),
};

/// The worker ack (`ack_work_item_handover`, migrations/functions/09_handover.sql):
/// deletes the leased item if its lease is live, touches its session, enqueues the
/// completion, records the call id in the enqueue ledger (a resend of an ack that
/// committed is answered as done), holds the instance back for the fan-in grace while
/// other activities of it are outstanding, and, when a local orchestration fetch waits,
/// claims the instance's turn for it.
pub(crate) static ACK_WORK_ITEM: SqlFunction = SqlFunction {
    name: "ack_work_item_handover",
    args: claim_args!(
        [
            "p_lock_token",
            "p_instance_id",
            "p_kind",
            "p_work_item",
            "p_call_id",
            "p_turn_lock_token",
        ],
        "p_read_turn",
        "p_history_execution_id",
        "p_history_after_event_id",
        "p_history_guard",
        "p_fan_in_grace_ms",
    ),
    columns: Some(
        "o_acked, o_acked_before, o_execution_id, o_attempt_count, o_has_instance, \
         o_orchestration_name, o_orchestration_version, o_messages, o_history_incremental, \
         o_history, o_history_last_event_id, o_history_last_guard, o_kv_keys, o_kv_values, \
         o_kv_updated_ms",
    ),
};

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
const ENQUEUE: &str = concat!(
    enqueue_ledger_ctes!("$7"),
    "queued AS (
    INSERT INTO {s}.worker_queue (work_item, instance_id, execution_id, activity_id, session_id, tag,
                                  visible_at_ms, created_at_ms)
    SELECT $1::TEXT, $2::TEXT, $3::BIGINT, $4::BIGINT, $5::TEXT, $6::TEXT, clock.now, clock.now
    FROM clock WHERE EXISTS (SELECT 1 FROM fresh)
    RETURNING tag, session_id
)
SELECT (SELECT count(*) FROM queued)
FROM {s}.notify_worker_items((SELECT array_agg(q.tag) FROM queued q),
                             (SELECT array_agg(q.session_id) FROM queued q)) AS n"
);

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

const FETCH_OP: &str = "fetch_work_item";

/// A leased worker row, from a fetch or a hand-over.
pub(crate) struct Leased {
    pub json: String,
    pub instance: String,
    pub attempt_count: Option<i32>,
    pub execution_id: Option<i64>,
    pub activity_id: Option<i64>,
    pub session_id: Option<String>,
    pub tag: Option<String>,
}

/// What `fetch_work_item` returns for a leased row. A row whose JSON does not decode is
/// handed to duroxide as an unregistered activity, so it is retried with back-off and
/// poisoned after `max_attempts` (never dropped).
pub(crate) fn leased_item(row: Leased, token: String) -> (WorkItem, String, u32) {
    let Leased {
        json,
        instance,
        attempt_count,
        execution_id,
        activity_id,
        session_id,
        tag,
    } = row;
    let attempts = attempt_count.unwrap_or(1);
    let item: WorkItem = match serde_json::from_str(&json) {
        Ok(item @ WorkItem::ActivityExecute { .. }) => item,
        decoded => {
            let error = match decoded {
                Ok(other) => format!("not an ActivityExecute but {}", work_item_kind(&other)),
                Err(e) => e.to_string(),
            };
            tracing::warn!(
                target: TRACING_TARGET,
                operation = FETCH_OP,
                instance = %instance,
                attempt = attempts,
                error = %error,
                "worker item does not decode; handing it to duroxide as an unregistered \
                 activity so it is retried with back-off and poisoned after max_attempts"
            );
            // The identity columns locate the activity in its orchestration, so the
            // poison failure reaches the right instance, execution and id.
            WorkItem::ActivityExecute {
                instance: instance.clone(),
                execution_id: u64::try_from(execution_id.unwrap_or(1)).unwrap_or(1),
                id: u64::try_from(activity_id.unwrap_or(0)).unwrap_or(0),
                name: UNDECODABLE_ACTIVITY.to_string(),
                input: format!("worker item does not decode ({error}): {json}"),
                session_id,
                tag,
            }
        }
    };
    tracing::debug!(
        target: TRACING_TARGET,
        operation = FETCH_OP,
        instance = %instance,
        attempt = attempts,
        "leased work item"
    );
    (item, token, u32::try_from(attempts).unwrap_or(0))
}

#[derive(sqlx::FromRow)]
struct WorkAckRow {
    o_acked: i64,
    o_acked_before: bool,
    o_execution_id: Option<i64>,
    o_attempt_count: Option<i32>,
    #[sqlx(flatten)]
    turn: TurnData,
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
    history: Option<Vec<String>>,
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
            claim: self.handover_enabled().then(|| ClaimSpec::Work {
                lock_timeout_ms: millis(lock_timeout),
                session_lock_timeout_ms: session.map(|s| millis(s.lock_timeout)).unwrap_or(0),
            }),
            // Worker notifications are routed by tag and session; no quiet hint.
            quiet_key: None,
        };
        let tags = &tags;
        let claimed = self
            .poll_for(interest, poll_timeout, |handed| async move {
                match handed {
                    None => self.lease_work(lock_timeout, session, tag_mode, tags).await,
                    Some(Handed::Work(w)) => Ok(Attempt::Claimed(*w)),
                    Some(other) => {
                        // Never happens (orchestration turns go to orchestration fetches);
                        // give it back rather than lose it.
                        self.release_handed(other).await;
                        Ok(Attempt::Empty { wake_in: None })
                    }
                }
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
        let token = format!("work_{}", uuid::Uuid::new_v4());
        // One token per call, reused by resends: a resend gets what the first attempt
        // leased, so the call may be sent again after a lost reply.
        let sent = AtomicBool::new(false);
        let row = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as::<_, LeaseRow>(&self.sql(FETCH))
                .bind(&token)
                .bind(millis(lock_timeout))
                .bind(session.is_some())
                .bind(session.map(|s| s.owner_id.as_str()).unwrap_or(""))
                .bind(session.map(|s| millis(s.lock_timeout)).unwrap_or(0))
                .bind(tag_mode)
                .bind(tags)
                .bind(sent.swap(true, Ordering::Relaxed))
                .bind(if self.inner.handover_reads.enabled() {
                    FETCH_HISTORY_MAX_EVENTS
                } else {
                    0
                })
                .bind(FETCH_HISTORY_MAX_BYTES)
        )
        .map_err(|e| db_error(FETCH_OP, None, e))?;
        let (Some(json), Some(instance)) = (row.work_item, row.instance_id) else {
            return Ok(Attempt::Empty {
                wake_in: wake_in(row.now_ms, row.next_wake_ms),
            });
        };
        // The instance's history answers duroxide's read before the activity
        // (handover_reads.rs) when it holds the activity's scheduling event: read with a
        // snapshot from just before the claim, it could predate the turn that scheduled
        // the activity. A row that does not decode is left to that read, which reports it.
        if let (Some(Ok(history)), Some(execution), Some(activity)) = (
            row.history.as_deref().map(decode_history),
            row.execution_id.and_then(|e| u64::try_from(e).ok()),
            row.activity_id.and_then(|a| u64::try_from(a).ok()),
        ) {
            if history
                .iter()
                .any(|e| e.event_id() == activity && e.execution_id == execution)
            {
                self.inner.handover_reads.keep(&instance, None, history, 1);
            }
        }
        Ok(Attempt::Claimed(leased_item(
            Leased {
                json,
                instance,
                attempt_count: row.attempt_count,
                execution_id: row.execution_id,
                activity_id: row.activity_id,
                session_id: row.session_id,
                tag: row.tag,
            },
            token,
        )))
    }

    pub(crate) async fn ack_work(
        &self,
        token: &str,
        completion: Option<WorkItem>,
    ) -> Result<(), ProviderError> {
        const OP: &str = "ack_work_item";
        let (instance, kind, json, execution_id) = match &completion {
            None => (None, None, None, 0),
            Some(
                item @ (WorkItem::ActivityCompleted {
                    instance,
                    execution_id,
                    ..
                }
                | WorkItem::ActivityFailed {
                    instance,
                    execution_id,
                    ..
                }),
            ) => {
                let json =
                    serde_json::to_string(item).map_err(|e| decode_error(OP, Some(instance), e))?;
                (
                    Some(instance.as_str()),
                    Some(work_item_kind(item)),
                    Some(json),
                    i64::try_from(*execution_id).unwrap_or(i64::MAX),
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
        // A local orchestration fetch waiting for work: the ack claims the instance's
        // next turn for it (handover.rs).
        let read_turn = self.fetch_path() == FetchPath::Procedure;
        let offer = instance.and_then(|i| self.offer_turn(i, Some(execution_id), read_turn));
        // Idempotent through the ledger: resent also when the outcome is unknown, so a
        // lost reply never makes duroxide abandon (and re-run) a completed activity.
        let call_id = uuid::Uuid::new_v4().to_string();
        let sql = self.call_sql(&ACK_WORK_ITEM);
        let args = || {
            let a = Args::new(&ACK_WORK_ITEM)
                .bind("p_lock_token", token)
                .bind("p_instance_id", instance)
                .bind("p_kind", kind)
                .bind("p_work_item", json.as_deref())
                .bind("p_call_id", call_id.as_str());
            TurnOffer::bind(offer.as_ref(), a)
                .bind("p_fan_in_grace_ms", self.inner.fan_in_grace_ms)
                .finish(OP)
        };
        let row = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as_with::<_, WorkAckRow, _>(&sql, args()?)
        )
        .map_err(|e| db_error(OP, instance, e))?;
        if row.o_acked == 0 && !row.o_acked_before {
            return Err(ProviderError::permanent(
                OP,
                format!(
                    "Invalid lock token or lease expired: work item lock {token} is not held \
                     (already acked, expired, cancelled, or its instance was deleted)"
                ),
            ));
        }
        if let (Some(offer), Some(instance)) = (offer, instance) {
            self.settle_turn_offer(
                offer,
                instance,
                row.o_execution_id,
                row.o_attempt_count,
                row.turn,
                OP,
            )
            .await;
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
