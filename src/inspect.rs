//! Read-only operational queries for tooling (the CLI's `stats`, `instances list` and
//! `instance show`).
//!
//! Every function reads only; none takes a lease, tags a message or writes anything.
//! Times are judged by the database clock (`now_ms()` of the schema), like every lease
//! and visibility decision of the provider, and all values are bound parameters.
//!
//! Each function comes in two forms:
//!
//! - `stats(&provider)`, `list_instances(&provider, ..)`, `instance_detail(&provider, ..)`
//!   for a connected [`PostgresProvider`];
//! - `stats_in(&pool, schema)`, ... for a bare pool and a schema name. Tools use these
//!   to inspect a schema that is not at this binary's migration version (a provider
//!   built with `auto_migrate: false` refuses such a schema, and one built with
//!   `auto_migrate: true` would migrate it). The queries use only the core tables of the
//!   first migration.
//!
//! ```no_run
//! # async fn demo(provider: &duroxide_pg_hybrid::PostgresProvider) -> Result<(), duroxide::providers::ProviderError> {
//! use duroxide_pg_hybrid::inspect;
//! let stats = inspect::stats(provider).await?;
//! println!("{} orchestrator messages ready", stats.orchestrator.visible);
//! for i in inspect::list_instances(provider, Some("Failed"), 20).await? {
//!     println!("{} {}", i.instance_id, i.orchestration_name);
//! }
//! # Ok(()) }
//! ```

use duroxide::providers::ProviderError;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::errors::db_error;
use crate::provider::PostgresProvider;
use crate::schema::{quote_ident, validate_schema_name};

/// Orchestrator queue depth. Timers are delayed orchestrator rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrchestratorQueueStats {
    /// Untagged rows visible now (waiting for a claim; rows of an instance whose lease is
    /// live wait for that lease to end).
    pub visible: i64,
    /// Untagged rows not visible yet (timers, delayed retries).
    pub delayed: i64,
    /// Rows tagged by a claim (part of a turn in progress, or of a turn whose lease
    /// expired and that the next claim of the instance takes over).
    pub locked: i64,
    /// Age in ms of the oldest untagged visible row (`now - visible_at_ms`), `None` when
    /// there is none.
    pub oldest_visible_age_ms: Option<i64>,
    /// Rows (of any of the counts above) waiting for an instance that does not exist yet:
    /// events raised before the start, or for a deleted or mistyped instance. They are
    /// kept until the instance starts (then delivered with its first turn) or are deleted
    /// with `instance delete`; claims do not look at them.
    pub waiting_for_instance: i64,
    /// Distinct instances those rows wait for.
    pub orphan_instances: i64,
}

/// Worker (activity) queue depth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerQueueStats {
    /// Rows a worker could claim now: visible and unleased, or with an expired lease.
    pub ready: i64,
    /// Rows not visible yet (abandoned with a delay) and not under a live lease.
    pub delayed: i64,
    /// Rows under a live lease (an activity running).
    pub leased: i64,
    /// Age in ms of the oldest ready row, `None` when there is none.
    pub oldest_ready_age_ms: Option<i64>,
}

/// Instances by the status of their current execution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceStatusCounts {
    /// Rows in `instances`.
    pub total: i64,
    /// Current execution `Running`.
    pub running: i64,
    /// Current execution `Completed`.
    pub completed: i64,
    /// Current execution `Failed`.
    pub failed: i64,
    /// Current execution `ContinuedAsNew` (normally only for an instant, between the turn
    /// that continued and the one that starts the next execution).
    pub continued_as_new: i64,
    /// Any other status, or no row for the current execution.
    pub other: i64,
}

/// Rows of `instance_locks` (orchestration turn leases).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockCounts {
    /// Leases not expired yet (turns in progress).
    pub live: i64,
    /// Leases past `locked_until_ms` (a worker died or stalled mid-turn; the next claim of
    /// the instance replaces them).
    pub expired: i64,
}

/// One snapshot of the schema's queues, instances and leases, read in one statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Database clock (`now_ms()`) at which the snapshot was taken.
    pub db_now_ms: i64,
    /// Orchestrator queue.
    pub orchestrator: OrchestratorQueueStats,
    /// Worker queue.
    pub worker: WorkerQueueStats,
    /// Instances by current-execution status.
    pub instances: InstanceStatusCounts,
    /// Orchestration turn leases.
    pub instance_locks: LockCounts,
    /// Sessions whose owner's lease is live.
    pub sessions_live: i64,
}

/// One instance as listed by [`list_instances`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSummary {
    /// Instance id.
    pub instance_id: String,
    /// Orchestration name.
    pub orchestration_name: String,
    /// Orchestration version, if known.
    pub orchestration_version: Option<String>,
    /// Current execution id.
    pub current_execution_id: i64,
    /// Status of the current execution (`Running`, `Completed`, `Failed`,
    /// `ContinuedAsNew`), or `Unknown` when that execution has no row.
    pub status: String,
    /// Creation time (ms since the Unix epoch, database clock).
    pub created_at_ms: i64,
    /// Last update time (ms since the Unix epoch, database clock).
    pub updated_at_ms: i64,
    /// Parent instance of a sub-orchestration.
    pub parent_instance_id: Option<String>,
}

/// One stored history row, as stored (the event JSON is not decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// Position in the execution's history (from 1).
    pub event_id: i64,
    /// Event type (`OrchestrationStarted`, `ActivityScheduled`, ...).
    pub event_type: String,
    /// Insert time (database clock).
    pub created_at_ms: i64,
    /// The event's JSON exactly as stored.
    pub event_data: String,
}

/// One execution of an instance with its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionDetail {
    /// Execution id.
    pub execution_id: i64,
    /// Status, `None` when history exists for an execution without an `executions` row.
    pub status: Option<String>,
    /// Output (or error) of a finished execution.
    pub output: Option<String>,
    /// Start time, `None` without an `executions` row.
    pub started_at_ms: Option<i64>,
    /// Completion time of a finished execution.
    pub completed_at_ms: Option<i64>,
    /// Number of history rows.
    pub event_count: i64,
    /// The history, in event order.
    pub history: Vec<HistoryRow>,
}

/// A message in the orchestrator queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Queue row id (insertion order).
    pub id: i64,
    /// Work item variant (`StartOrchestration`, `ActivityCompleted`, `TimerFired`, ...).
    pub kind: String,
    /// When the row becomes (or became) visible.
    pub visible_at_ms: i64,
    /// Token of the claim that tagged the row, if any.
    pub lock_token: Option<String>,
    /// Claims that included the row.
    pub attempt_count: i32,
    /// Insert time.
    pub created_at_ms: i64,
    /// The work item JSON as stored.
    pub work_item: String,
}

/// A row of the worker queue scheduled by the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerItem {
    /// Queue row id.
    pub id: i64,
    /// Execution that scheduled the activity.
    pub execution_id: i64,
    /// Activity id (the scheduling event's id).
    pub activity_id: i64,
    /// Session the activity is bound to.
    pub session_id: Option<String>,
    /// Routing tag.
    pub tag: Option<String>,
    /// When the row becomes (or became) visible.
    pub visible_at_ms: i64,
    /// Lease token, if leased (live or expired).
    pub lock_token: Option<String>,
    /// End of the lease, if leased.
    pub locked_until_ms: Option<i64>,
    /// True when the lease is live (an activity running).
    pub leased: bool,
    /// Claims of the row.
    pub attempt_count: i32,
    /// Insert time.
    pub created_at_ms: i64,
    /// The work item JSON as stored.
    pub work_item: String,
}

/// The turn lease of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceLock {
    /// Lease token.
    pub lock_token: String,
    /// Lease end.
    pub locked_until_ms: i64,
    /// Claim time.
    pub locked_at_ms: i64,
    /// True while `locked_until_ms` is in the future (database clock).
    pub live: bool,
}

/// Everything stored about one instance, read in one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDetail {
    /// The instance id asked for.
    pub instance_id: String,
    /// Database clock when the snapshot was taken.
    pub db_now_ms: i64,
    /// The `instances` row; `None` for an instance that is only queued (its
    /// `StartOrchestration` not processed yet) or has executions without metadata.
    pub instance: Option<InstanceSummary>,
    /// Custom status, if set.
    pub custom_status: Option<String>,
    /// Custom status version (0 when never set or no instance row).
    pub custom_status_version: i64,
    /// Executions, ascending, each with its history.
    pub executions: Vec<ExecutionDetail>,
    /// Orchestrator queue rows routed to the instance, in queue order.
    pub orchestrator_messages: Vec<QueuedMessage>,
    /// Worker queue rows scheduled by the instance, in queue order.
    pub worker_items: Vec<WorkerItem>,
    /// The turn lease, if a row exists (live or expired).
    pub lock: Option<InstanceLock>,
    /// The instance's claim state (`pending_instances`): present while messages are
    /// queued for it.
    pub claim_state: Option<ClaimState>,
}

/// What claims know about an instance with queued messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimState {
    /// Earliest time its messages may be visible (a lower bound).
    pub visible_at_ms: i64,
    /// When a claim next looks at it (visible time, or the end of a turn's lease).
    pub claimable_at_ms: i64,
    /// `false`: the instance does not exist yet; its messages wait for its start and
    /// claims do not look at them.
    pub runnable: bool,
    /// Pinned duroxide version of the current execution, as claims filter on it.
    pub pinned_version: Option<String>,
}

/// `{s}` replaced by the quoted schema, after validating the name.
fn template(schema: &str, sql: &str) -> Result<String, ProviderError> {
    validate_schema_name(schema)?;
    Ok(sql.replace("{s}", &quote_ident(schema)))
}

const STATS: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now)
SELECT c.now AS db_now_ms,
       o.visible AS o_visible, o.delayed AS o_delayed, o.locked AS o_locked, c.now - o.oldest AS o_oldest_age,
       w.ready AS w_ready, w.delayed AS w_delayed, w.leased AS w_leased, c.now - w.oldest AS w_oldest_age,
       i.total AS i_total, i.running AS i_running, i.completed AS i_completed, i.failed AS i_failed,
       i.continued AS i_continued, i.other AS i_other,
       l.live AS l_live, l.expired AS l_expired,
       s.live AS s_live,
       orphan.instances AS orphan_instances, orphan.messages AS orphan_messages
FROM clock c
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE q.lock_token IS NULL AND q.visible_at_ms <= c.now) AS visible,
           count(*) FILTER (WHERE q.lock_token IS NULL AND q.visible_at_ms > c.now) AS delayed,
           count(*) FILTER (WHERE q.lock_token IS NOT NULL) AS locked,
           min(q.visible_at_ms) FILTER (WHERE q.lock_token IS NULL AND q.visible_at_ms <= c.now) AS oldest
    FROM {s}.orchestrator_queue q
) o
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE w.visible_at_ms <= c.now
                              AND (w.lock_token IS NULL OR w.locked_until_ms <= c.now)) AS ready,
           count(*) FILTER (WHERE w.visible_at_ms > c.now
                              AND (w.lock_token IS NULL OR w.locked_until_ms <= c.now)) AS delayed,
           count(*) FILTER (WHERE w.lock_token IS NOT NULL AND w.locked_until_ms > c.now) AS leased,
           min(w.visible_at_ms) FILTER (WHERE w.visible_at_ms <= c.now
                              AND (w.lock_token IS NULL OR w.locked_until_ms <= c.now)) AS oldest
    FROM {s}.worker_queue w
) w
CROSS JOIN LATERAL (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE e.status = 'Running') AS running,
           count(*) FILTER (WHERE e.status = 'Completed') AS completed,
           count(*) FILTER (WHERE e.status = 'Failed') AS failed,
           count(*) FILTER (WHERE e.status = 'ContinuedAsNew') AS continued,
           count(*) FILTER (WHERE e.status IS NULL
                              OR e.status NOT IN ('Running', 'Completed', 'Failed', 'ContinuedAsNew')) AS other
    FROM {s}.instances i
    LEFT JOIN {s}.executions e
      ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
) i
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE k.locked_until_ms > c.now) AS live,
           count(*) FILTER (WHERE k.locked_until_ms <= c.now) AS expired
    FROM {s}.instance_locks k
) l
CROSS JOIN LATERAL (
    SELECT count(*) AS live FROM {s}.sessions x WHERE x.locked_until_ms > c.now
) s
CROSS JOIN LATERAL (
    SELECT count(DISTINCT p.instance_id) AS instances, count(q.id) AS messages
    FROM {s}.pending_instances p
    JOIN {s}.orchestrator_queue q ON q.instance_id = p.instance_id
    WHERE NOT p.runnable
) orphan";

/// Queue depths, instance counts and leases of the provider's schema (one statement).
///
/// The counts read every row of the queues, `instances` and `instance_locks`: cheap for
/// an operator's tool, but not meant to be polled at high frequency on very large
/// tables.
///
/// # Errors
/// Database errors, mapped with [`crate::errors::db_error`].
pub async fn stats(provider: &PostgresProvider) -> Result<QueueStats, ProviderError> {
    stats_in(provider.pool(), provider.schema()).await
}

/// [`stats`] for a bare pool and schema.
///
/// # Errors
/// An invalid schema name; database errors (e.g. the schema has no tables yet).
pub async fn stats_in(pool: &PgPool, schema: &str) -> Result<QueueStats, ProviderError> {
    const OP: &str = "inspect_stats";
    let row = sqlx::query(&template(schema, STATS)?)
        .fetch_one(pool)
        .await
        .map_err(|e| db_error(OP, None, e))?;
    decode_stats(&row).map_err(|e| db_error(OP, None, e))
}

fn decode_stats(r: &PgRow) -> Result<QueueStats, sqlx::Error> {
    Ok(QueueStats {
        db_now_ms: r.try_get("db_now_ms")?,
        orchestrator: OrchestratorQueueStats {
            visible: r.try_get("o_visible")?,
            delayed: r.try_get("o_delayed")?,
            locked: r.try_get("o_locked")?,
            oldest_visible_age_ms: r.try_get("o_oldest_age")?,
            waiting_for_instance: r.try_get("orphan_messages")?,
            orphan_instances: r.try_get("orphan_instances")?,
        },
        worker: WorkerQueueStats {
            ready: r.try_get("w_ready")?,
            delayed: r.try_get("w_delayed")?,
            leased: r.try_get("w_leased")?,
            oldest_ready_age_ms: r.try_get("w_oldest_age")?,
        },
        instances: InstanceStatusCounts {
            total: r.try_get("i_total")?,
            running: r.try_get("i_running")?,
            completed: r.try_get("i_completed")?,
            failed: r.try_get("i_failed")?,
            continued_as_new: r.try_get("i_continued")?,
            other: r.try_get("i_other")?,
        },
        instance_locks: LockCounts {
            live: r.try_get("l_live")?,
            expired: r.try_get("l_expired")?,
        },
        sessions_live: r.try_get("s_live")?,
    })
}

/// Status `Unknown` when the current execution has no row (LEFT JOIN).
const LIST_INSTANCES: &str = "\
SELECT i.instance_id, i.orchestration_name, i.orchestration_version, i.current_execution_id,
       coalesce(e.status, 'Unknown') AS status, i.created_at_ms, i.updated_at_ms, i.parent_instance_id
FROM {s}.instances i
LEFT JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
WHERE $1::TEXT IS NULL OR coalesce(e.status, 'Unknown') = $1
ORDER BY i.created_at_ms DESC, i.instance_id
LIMIT $2";

/// Newest instances first, optionally only those whose current execution has `status`
/// (`Running`, `Completed`, `Failed`, `ContinuedAsNew`, or `Unknown` for a missing
/// execution row). At most `limit` rows.
///
/// # Errors
/// A negative `limit`; database errors.
pub async fn list_instances(
    provider: &PostgresProvider,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<InstanceSummary>, ProviderError> {
    list_instances_in(provider.pool(), provider.schema(), status, limit).await
}

/// [`list_instances`] for a bare pool and schema.
///
/// # Errors
/// An invalid schema name or a negative `limit`; database errors.
pub async fn list_instances_in(
    pool: &PgPool,
    schema: &str,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<InstanceSummary>, ProviderError> {
    const OP: &str = "inspect_list_instances";
    if limit < 0 {
        return Err(ProviderError::permanent(
            OP,
            format!("limit must not be negative (got {limit})"),
        ));
    }
    let rows = sqlx::query(&template(schema, LIST_INSTANCES)?)
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(|e| db_error(OP, None, e))?;
    rows.iter()
        .map(|r| decode_summary(r).map_err(|e| db_error(OP, None, e)))
        .collect()
}

fn decode_summary(r: &PgRow) -> Result<InstanceSummary, sqlx::Error> {
    Ok(InstanceSummary {
        instance_id: r.try_get("instance_id")?,
        orchestration_name: r.try_get("orchestration_name")?,
        orchestration_version: r.try_get("orchestration_version")?,
        current_execution_id: r.try_get("current_execution_id")?,
        status: r.try_get("status")?,
        created_at_ms: r.try_get("created_at_ms")?,
        updated_at_ms: r.try_get("updated_at_ms")?,
        parent_instance_id: r.try_get("parent_instance_id")?,
    })
}

const DETAIL_INSTANCE: &str = "\
SELECT i.instance_id, i.orchestration_name, i.orchestration_version, i.current_execution_id,
       coalesce(e.status, 'Unknown') AS status, i.created_at_ms, i.updated_at_ms, i.parent_instance_id,
       i.custom_status, i.custom_status_version
FROM {s}.instances i
LEFT JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
WHERE i.instance_id = $1";

/// Executions from both tables: history may exist for an execution without a row.
const DETAIL_EXECUTIONS: &str = "\
SELECT x.execution_id, e.status, e.output, e.started_at_ms, e.completed_at_ms
FROM (
    SELECT e.execution_id FROM {s}.executions e WHERE e.instance_id = $1
    UNION
    SELECT DISTINCT h.execution_id FROM {s}.history h WHERE h.instance_id = $1
) x
LEFT JOIN {s}.executions e ON e.instance_id = $1 AND e.execution_id = x.execution_id
ORDER BY x.execution_id";

const DETAIL_HISTORY: &str = "\
SELECT h.execution_id, h.event_id, h.event_type, h.created_at_ms, h.event_data
FROM {s}.history h
WHERE h.instance_id = $1
ORDER BY h.execution_id, h.event_id";

const DETAIL_MESSAGES: &str = "\
SELECT q.id, q.kind, q.visible_at_ms, q.lock_token, q.attempt_count, q.created_at_ms, q.work_item
FROM {s}.orchestrator_queue q
WHERE q.instance_id = $1
ORDER BY q.id";

const DETAIL_WORKER: &str = "\
SELECT w.id, w.execution_id, w.activity_id, w.session_id, w.tag, w.visible_at_ms, w.lock_token,
       w.locked_until_ms, coalesce(w.locked_until_ms > $2, FALSE) AS leased, w.attempt_count,
       w.created_at_ms, w.work_item
FROM {s}.worker_queue w
WHERE w.instance_id = $1
ORDER BY w.id";

const DETAIL_CLAIM_STATE: &str = "\
SELECT p.visible_at_ms, p.claimable_at_ms, p.runnable,
       p.pinned_major::TEXT || '.' || p.pinned_minor::TEXT || '.' || p.pinned_patch::TEXT AS pinned_version
FROM {s}.pending_instances p
WHERE p.instance_id = $1";

const DETAIL_LOCK: &str = "\
SELECT l.lock_token, l.locked_until_ms, l.locked_at_ms, l.locked_until_ms > $2 AS live
FROM {s}.instance_locks l
WHERE l.instance_id = $1";

/// Everything stored about `instance_id`: instance row, executions with their raw
/// history, queued orchestrator messages, worker items and the turn lease, read in one
/// `REPEATABLE READ READ ONLY` transaction so the parts agree with each other.
///
/// Returns `None` when nothing at all is stored under the id. An instance that is only
/// queued (not started yet) is returned with `instance: None` and its messages.
///
/// # Errors
/// Database errors, naming the instance.
pub async fn instance_detail(
    provider: &PostgresProvider,
    instance_id: &str,
) -> Result<Option<InstanceDetail>, ProviderError> {
    instance_detail_in(provider.pool(), provider.schema(), instance_id).await
}

/// [`instance_detail`] for a bare pool and schema.
///
/// # Errors
/// An invalid schema name; database errors, naming the instance.
pub async fn instance_detail_in(
    pool: &PgPool,
    schema: &str,
    instance_id: &str,
) -> Result<Option<InstanceDetail>, ProviderError> {
    const OP: &str = "inspect_instance_detail";
    let q = |sql: &str| template(schema, sql);
    let claim_state_sql = q(DETAIL_CLAIM_STATE)?;
    let (now_sql, instance_sql, executions_sql, history_sql, messages_sql, worker_sql, lock_sql) = (
        q("SELECT {s}.now_ms()")?,
        q(DETAIL_INSTANCE)?,
        q(DETAIL_EXECUTIONS)?,
        q(DETAIL_HISTORY)?,
        q(DETAIL_MESSAGES)?,
        q(DETAIL_WORKER)?,
        q(DETAIL_LOCK)?,
    );
    let err = |e: sqlx::Error| db_error(OP, Some(instance_id), e);

    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(err)?;

    let db_now_ms: i64 = sqlx::query_scalar(&now_sql)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;

    let instance_row = sqlx::query(&instance_sql)
        .bind(instance_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
    let (instance, custom_status, custom_status_version) = match &instance_row {
        Some(r) => (
            Some(decode_summary(r).map_err(err)?),
            r.try_get("custom_status").map_err(err)?,
            r.try_get("custom_status_version").map_err(err)?,
        ),
        None => (None, None, 0),
    };

    let mut executions = sqlx::query(&executions_sql)
        .bind(instance_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?
        .iter()
        .map(|r| {
            Ok(ExecutionDetail {
                execution_id: r.try_get("execution_id")?,
                status: r.try_get("status")?,
                output: r.try_get("output")?,
                started_at_ms: r.try_get("started_at_ms")?,
                completed_at_ms: r.try_get("completed_at_ms")?,
                event_count: 0,
                history: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(err)?;

    for r in sqlx::query(&history_sql)
        .bind(instance_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?
    {
        let execution_id: i64 = r.try_get("execution_id").map_err(err)?;
        let row = HistoryRow {
            event_id: r.try_get("event_id").map_err(err)?,
            event_type: r.try_get("event_type").map_err(err)?,
            created_at_ms: r.try_get("created_at_ms").map_err(err)?,
            event_data: r.try_get("event_data").map_err(err)?,
        };
        // Both lists are sorted by execution id and every history execution is listed.
        if let Some(x) = executions
            .iter_mut()
            .find(|x| x.execution_id == execution_id)
        {
            x.event_count += 1;
            x.history.push(row);
        }
    }

    let orchestrator_messages = sqlx::query(&messages_sql)
        .bind(instance_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?
        .iter()
        .map(|r| {
            Ok(QueuedMessage {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                visible_at_ms: r.try_get("visible_at_ms")?,
                lock_token: r.try_get("lock_token")?,
                attempt_count: r.try_get("attempt_count")?,
                created_at_ms: r.try_get("created_at_ms")?,
                work_item: r.try_get("work_item")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(err)?;

    let worker_items = sqlx::query(&worker_sql)
        .bind(instance_id)
        .bind(db_now_ms)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?
        .iter()
        .map(|r| {
            Ok(WorkerItem {
                id: r.try_get("id")?,
                execution_id: r.try_get("execution_id")?,
                activity_id: r.try_get("activity_id")?,
                session_id: r.try_get("session_id")?,
                tag: r.try_get("tag")?,
                visible_at_ms: r.try_get("visible_at_ms")?,
                lock_token: r.try_get("lock_token")?,
                locked_until_ms: r.try_get("locked_until_ms")?,
                leased: r.try_get("leased")?,
                attempt_count: r.try_get("attempt_count")?,
                created_at_ms: r.try_get("created_at_ms")?,
                work_item: r.try_get("work_item")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(err)?;

    let lock = sqlx::query(&lock_sql)
        .bind(instance_id)
        .bind(db_now_ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?
        .map(|r| {
            Ok::<_, sqlx::Error>(InstanceLock {
                lock_token: r.try_get("lock_token")?,
                locked_until_ms: r.try_get("locked_until_ms")?,
                locked_at_ms: r.try_get("locked_at_ms")?,
                live: r.try_get("live")?,
            })
        })
        .transpose()
        .map_err(err)?;

    let claim_state = sqlx::query(&claim_state_sql)
        .bind(instance_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?
        .map(|r| {
            Ok::<_, sqlx::Error>(ClaimState {
                visible_at_ms: r.try_get("visible_at_ms")?,
                claimable_at_ms: r.try_get("claimable_at_ms")?,
                runnable: r.try_get("runnable")?,
                pinned_version: r.try_get("pinned_version")?,
            })
        })
        .transpose()
        .map_err(err)?;

    // Read-only: nothing to commit.
    tx.rollback().await.map_err(err)?;

    if instance.is_none()
        && executions.is_empty()
        && orchestrator_messages.is_empty()
        && worker_items.is_empty()
        && lock.is_none()
    {
        return Ok(None);
    }
    Ok(Some(InstanceDetail {
        instance_id: instance_id.to_string(),
        db_now_ms,
        instance,
        custom_status,
        custom_status_version,
        executions,
        orchestrator_messages,
        worker_items,
        lock,
        claim_state,
    }))
}
