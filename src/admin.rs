//! `ProviderAdmin`: listings, instance and execution info, metrics, hierarchy, deletion
//! and pruning.
//!
//! Every method costs exactly one round trip. Reads are single SQL statements kept in the
//! `const`s below. Operations with several steps (checks, counts and deletes that must be
//! all or nothing) are one call of a PL/pgSQL function from migration
//! `20261126000005_admin.sql`, which runs in that call's own transaction: no client-side
//! transaction is ever held open across round trips. That migration also documents how a
//! delete is ordered against in-flight claims and acks so a deleted instance cannot be
//! recreated by a turn that was already running.
//!
//! Exception: `delete_instance_bulk` reads the matching trees (one round trip), then
//! deletes them in transactions of at most [`DELETE_BATCH_IDS`] instances each. A delete
//! takes one advisory lock per instance until it commits, in the server's shared lock
//! table (`max_locks_per_transaction` x (`max_connections` + `max_prepared_transactions`)
//! slots, 64 x 100 at the defaults, shared by every session of the cluster); one
//! transaction for 1,000 trees of 11 would fill it (`53200 out of shared memory`) and
//! starve every other session meanwhile. A tree is never split across transactions, so a
//! single tree larger than the batch is deleted alone. `delete_instances_atomic` stays
//! one transaction (all or nothing is its contract): it takes as many locks as ids, and
//! callers should keep it to a few thousand; beyond the lock table it fails with a
//! permanent error that says so.
//!
//! The trait's default `get_instance_tree` and `delete_instance` are overridden: their
//! defaults cost one round trip per tree node (and three calls for a delete); here a
//! recursive CTE does the walk inside the database.
//!
//! Domain errors raised in SQL use SQLSTATE class `DX` (permanent); their messages carry
//! the words callers and the conformance tests look for ("running", "child", "not found",
//! "sub-orchestration ... root").

use duroxide::Event;
use duroxide::providers::{
    DeleteInstanceResult, ExecutionInfo, InstanceFilter, InstanceInfo, InstanceTree, ProviderAdmin,
    ProviderError, PruneOptions, PruneResult, QueueDepths, SystemMetrics,
};

use crate::codec::{decode_history, to_i64};
use crate::errors::{db_error, decode_error};
use crate::provider::{PostgresProvider, TRACING_TARGET};

/// `InstanceFilter::limit` when the caller gives none (the trait's documented default).
const DEFAULT_BULK_LIMIT: u32 = 1000;

/// Most instances deleted in one transaction by `delete_instance_bulk` (one advisory
/// lock each until commit; see the module docs).
pub const DELETE_BATCH_IDS: usize = 256;

/// Terminal roots matching the bulk filter, oldest first, each with its whole tree (the
/// same selection `admin_delete_instance_bulk` makes).
const BULK_DELETE_TREES: &str = "\
WITH roots AS (
    SELECT i.instance_id, i.created_at_ms
    FROM {s}.instances i
    JOIN {s}.executions e
      ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
    WHERE i.parent_instance_id IS NULL
      AND e.status IN ('Completed', 'Failed', 'ContinuedAsNew')
      AND ($1::TEXT[] IS NULL OR i.instance_id = ANY ($1))
      AND ($2::BIGINT IS NULL OR e.completed_at_ms < $2)
    ORDER BY i.created_at_ms, i.instance_id
    LIMIT $3
)
SELECT ARRAY(SELECT t.o_instance_id FROM {s}.admin_instance_tree(r.instance_id) t) AS tree
FROM roots r
ORDER BY r.created_at_ms, r.instance_id";

const LIST_INSTANCES: &str = "\
SELECT i.instance_id FROM {s}.instances i
ORDER BY i.created_at_ms DESC, i.instance_id";

const LIST_INSTANCES_BY_STATUS: &str = "\
SELECT i.instance_id
FROM {s}.instances i
JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
WHERE e.status = $1
ORDER BY i.created_at_ms DESC, i.instance_id";

/// From `executions` alone: executions may exist without an instance row.
const LIST_EXECUTIONS: &str = "\
SELECT e.execution_id FROM {s}.executions e
WHERE e.instance_id = $1
ORDER BY e.execution_id";

const READ_LATEST_HISTORY: &str = "\
SELECT h.event_data FROM {s}.history h
WHERE h.instance_id = $1
  AND h.execution_id = (SELECT coalesce(max(e.execution_id), 1) FROM {s}.executions e WHERE e.instance_id = $1)
ORDER BY h.event_id";

/// 1 for an unknown instance, like the reference provider.
const LATEST_EXECUTION_ID: &str = "\
SELECT coalesce(max(e.execution_id), 1) FROM {s}.executions e WHERE e.instance_id = $1";

/// LEFT JOIN: an instance whose current execution row is missing still has info
/// (status "Unknown").
const INSTANCE_INFO: &str = "\
SELECT i.instance_id, i.orchestration_name, i.orchestration_version, i.current_execution_id,
       e.status, e.output, i.created_at_ms, i.updated_at_ms, i.parent_instance_id
FROM {s}.instances i
LEFT JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
WHERE i.instance_id = $1";

const EXECUTION_INFO: &str = "\
SELECT e.execution_id, e.status, e.output, e.started_at_ms, e.completed_at_ms,
       (SELECT count(*) FROM {s}.history h
         WHERE h.instance_id = e.instance_id AND h.execution_id = e.execution_id) AS event_count
FROM {s}.executions e
WHERE e.instance_id = $1 AND e.execution_id = $2";

const SYSTEM_METRICS: &str = "\
SELECT
    (SELECT count(*) FROM {s}.instances) AS total_instances,
    (SELECT count(*) FROM {s}.executions) AS total_executions,
    c.running, c.completed, c.failed,
    (SELECT count(*) FROM {s}.history) AS total_events
FROM (
    SELECT count(*) FILTER (WHERE e.status = 'Running') AS running,
           count(*) FILTER (WHERE e.status = 'Completed') AS completed,
           count(*) FILTER (WHERE e.status = 'Failed') AS failed
    FROM {s}.instances i
    JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
) c";

/// While adopting: the same counts summed over both homes (`{o}`: duroxide-pg's tables,
/// same table and column names), in one statement so an instance moving meanwhile
/// counts once.
fn system_metrics_both_homes() -> String {
    format!(
        "SELECT a.total_instances + b.total_instances AS total_instances,
       a.total_executions + b.total_executions AS total_executions,
       a.running + b.running AS running, a.completed + b.completed AS completed,
       a.failed + b.failed AS failed, a.total_events + b.total_events AS total_events
FROM ({SYSTEM_METRICS}) a, ({}) b",
        SYSTEM_METRICS.replace("{s}", "{o}")
    )
}

/// Unlocked rows. Timers are delayed orchestrator rows, so there is no timer queue.
const QUEUE_DEPTHS: &str = "\
SELECT (SELECT count(*) FROM {s}.orchestrator_queue q WHERE q.lock_token IS NULL),
       (SELECT count(*) FROM {s}.worker_queue w WHERE w.lock_token IS NULL)";

/// While adopting: plus duroxide-pg's unlocked rows ({o}; it leaves the token of an
/// expired lease in place, so an expired lease counts as unlocked).
const QUEUE_DEPTHS_BOTH_HOMES: &str = "\
SELECT (SELECT count(*) FROM {s}.orchestrator_queue q WHERE q.lock_token IS NULL)
     + (SELECT count(*) FROM {o}.orchestrator_queue q
        WHERE q.lock_token IS NULL OR q.locked_until <= {s}.now_ms()),
       (SELECT count(*) FROM {s}.worker_queue w WHERE w.lock_token IS NULL)
     + (SELECT count(*) FROM {o}.worker_queue w
        WHERE w.lock_token IS NULL OR w.locked_until <= {s}.now_ms())";

const LIST_CHILDREN: &str = "\
SELECT i.instance_id FROM {s}.instances i
WHERE i.parent_instance_id = $1
ORDER BY i.created_at_ms, i.instance_id";

const PARENT_ID: &str = "\
SELECT i.parent_instance_id FROM {s}.instances i WHERE i.instance_id = $1";

const INSTANCE_TREE: &str = "SELECT t.o_instance_id FROM {s}.admin_instance_tree($1) t";

const DELETE_INSTANCES: &str = "\
SELECT d.o_instances_deleted, d.o_executions_deleted, d.o_events_deleted, d.o_queue_messages_deleted
FROM {s}.admin_delete_instances($1, $2) d";

const DELETE_INSTANCE: &str = "\
SELECT d.o_instances_deleted, d.o_executions_deleted, d.o_events_deleted, d.o_queue_messages_deleted
FROM {s}.admin_delete_instance($1, $2) d";

const PRUNE_EXECUTIONS: &str = "\
SELECT p.o_instances_processed, p.o_executions_deleted, p.o_events_deleted
FROM {s}.admin_prune_executions($1, $2, $3) p";

const PRUNE_EXECUTIONS_BULK: &str = "\
SELECT p.o_instances_processed, p.o_executions_deleted, p.o_events_deleted
FROM {s}.admin_prune_executions_bulk($1, $2, $3, $4, $5) p";

type DeleteRow = (i64, i64, i64, i64);
type PruneRow = (i64, i64, i64);

#[derive(sqlx::FromRow)]
struct InstanceInfoRow {
    instance_id: String,
    orchestration_name: String,
    orchestration_version: Option<String>,
    current_execution_id: i64,
    status: Option<String>,
    output: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
    parent_instance_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ExecutionInfoRow {
    execution_id: i64,
    status: String,
    output: Option<String>,
    started_at_ms: i64,
    completed_at_ms: Option<i64>,
    event_count: i64,
}

#[derive(sqlx::FromRow)]
struct MetricsRow {
    total_instances: i64,
    total_executions: i64,
    running: i64,
    completed: i64,
    failed: i64,
    total_events: i64,
}

/// BIGINT -> u64 for ids, counts and timestamps; a negative value means a corrupt row,
/// not something to wrap around silently.
fn to_u64(op: &str, instance: Option<&str>, what: &str, v: i64) -> Result<u64, ProviderError> {
    u64::try_from(v).map_err(|_| decode_error(op, instance, format!("{what} {v} is negative")))
}

fn to_usize(op: &str, what: &str, v: i64) -> Result<usize, ProviderError> {
    usize::try_from(v)
        .map_err(|_| decode_error(op, None, format!("{what} {v} does not fit in usize")))
}

fn bound_i64(op: &str, instance: Option<&str>, what: &str, v: u64) -> Result<i64, ProviderError> {
    to_i64(what, v).map_err(|m| decode_error(op, instance, m))
}

fn delete_result(
    op: &str,
    instance: Option<&str>,
    row: DeleteRow,
) -> Result<DeleteInstanceResult, ProviderError> {
    Ok(DeleteInstanceResult {
        instances_deleted: to_u64(op, instance, "instances_deleted", row.0)?,
        executions_deleted: to_u64(op, instance, "executions_deleted", row.1)?,
        events_deleted: to_u64(op, instance, "events_deleted", row.2)?,
        queue_messages_deleted: to_u64(op, instance, "queue_messages_deleted", row.3)?,
    })
}

fn prune_result(
    op: &str,
    instance: Option<&str>,
    row: PruneRow,
) -> Result<PruneResult, ProviderError> {
    Ok(PruneResult {
        instances_processed: to_u64(op, instance, "instances_processed", row.0)?,
        executions_deleted: to_u64(op, instance, "executions_deleted", row.1)?,
        events_deleted: to_u64(op, instance, "events_deleted", row.2)?,
    })
}

/// Groups whole trees into batches of at most `max_ids` distinct ids (a larger tree is
/// a batch of its own), keeping their order.
fn delete_batches(trees: Vec<Vec<String>>, max_ids: usize) -> Vec<Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut batches: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for tree in trees {
        let tree: Vec<String> = tree
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        if tree.is_empty() {
            continue;
        }
        if !current.is_empty() && current.len() + tree.len() > max_ids {
            batches.push(std::mem::take(&mut current));
        }
        current.extend(tree);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// `Some(ids)` filters by ids (an empty list selects nothing and is answered without a
/// query); `None` means no id filter, which the SQL functions take as a NULL array.
fn filter_ids(filter: &InstanceFilter) -> Option<&[String]> {
    filter.instance_ids.as_deref()
}

#[async_trait::async_trait]
impl ProviderAdmin for PostgresProvider {
    async fn list_instances(&self) -> Result<Vec<String>, ProviderError> {
        const OP: &str = "list_instances";
        if let Some(ids) = self.list_both_homes(OP, None).await? {
            return Ok(ids);
        }
        on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(LIST_INSTANCES))
        )
        .map_err(|e| db_error(OP, None, e))
    }

    async fn list_instances_by_status(&self, status: &str) -> Result<Vec<String>, ProviderError> {
        const OP: &str = "list_instances_by_status";
        if let Some(ids) = self.list_both_homes(OP, Some(status)).await? {
            return Ok(ids);
        }
        on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(LIST_INSTANCES_BY_STATUS)).bind(status)
        )
        .map_err(|e| db_error(OP, None, e))
    }

    async fn list_executions(&self, instance: &str) -> Result<Vec<u64>, ProviderError> {
        const OP: &str = "list_executions";
        self.adopt_for_management(OP, instance).await?;
        let ids: Vec<i64> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(LIST_EXECUTIONS)).bind(instance)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        ids.into_iter()
            .map(|id| to_u64(OP, Some(instance), "execution_id", id))
            .collect()
    }

    async fn read_history_with_execution_id(
        &self,
        instance: &str,
        execution_id: u64,
    ) -> Result<Vec<Event>, ProviderError> {
        self.read_execution_history("read_history_with_execution_id", instance, execution_id)
            .await
    }

    // One statement instead of the documented latest_execution_id + read pair: two
    // round trips, and an execution could be added between them.
    async fn read_history(&self, instance: &str) -> Result<Vec<Event>, ProviderError> {
        const OP: &str = "read_history";
        let rows: Vec<String> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(READ_LATEST_HISTORY)).bind(instance)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        decode_history(&rows).map_err(|m| decode_error(OP, Some(instance), m))
    }

    async fn latest_execution_id(&self, instance: &str) -> Result<u64, ProviderError> {
        const OP: &str = "latest_execution_id";
        self.adopt_for_management(OP, instance).await?;
        let id: i64 = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_scalar(&self.sql(LATEST_EXECUTION_ID)).bind(instance)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        to_u64(OP, Some(instance), "execution_id", id)
    }

    async fn get_instance_info(&self, instance: &str) -> Result<InstanceInfo, ProviderError> {
        const OP: &str = "get_instance_info";
        self.adopt_for_management(OP, instance).await?;
        let row: Option<InstanceInfoRow> = on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_as(&self.sql(INSTANCE_INFO)).bind(instance)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        // Callers (and the tests) read an error here as "deleted / never existed".
        let row = row.ok_or_else(|| {
            ProviderError::permanent(OP, format!("Instance {instance} not found"))
        })?;
        Ok(InstanceInfo {
            current_execution_id: to_u64(
                OP,
                Some(instance),
                "current_execution_id",
                row.current_execution_id,
            )?,
            created_at: to_u64(OP, Some(instance), "created_at_ms", row.created_at_ms)?,
            updated_at: to_u64(OP, Some(instance), "updated_at_ms", row.updated_at_ms)?,
            instance_id: row.instance_id,
            orchestration_name: row.orchestration_name,
            orchestration_version: row
                .orchestration_version
                .unwrap_or_else(|| "unknown".to_string()),
            status: row.status.unwrap_or_else(|| "Unknown".to_string()),
            output: row.output,
            parent_instance_id: row.parent_instance_id,
        })
    }

    async fn get_execution_info(
        &self,
        instance: &str,
        execution_id: u64,
    ) -> Result<ExecutionInfo, ProviderError> {
        const OP: &str = "get_execution_info";
        self.adopt_for_management(OP, instance).await?;
        let exec = bound_i64(OP, Some(instance), "execution_id", execution_id)?;
        let row: Option<ExecutionInfoRow> = on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_as(&self.sql(EXECUTION_INFO))
                .bind(instance)
                .bind(exec)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        let row = row.ok_or_else(|| {
            ProviderError::permanent(
                OP,
                format!("Execution {execution_id} of instance {instance} not found"),
            )
        })?;
        Ok(ExecutionInfo {
            execution_id: to_u64(OP, Some(instance), "execution_id", row.execution_id)?,
            status: row.status,
            output: row.output,
            started_at: to_u64(OP, Some(instance), "started_at_ms", row.started_at_ms)?,
            completed_at: row
                .completed_at_ms
                .map(|t| to_u64(OP, Some(instance), "completed_at_ms", t))
                .transpose()?,
            event_count: to_usize(OP, "event_count", row.event_count)?,
        })
    }

    async fn get_system_metrics(&self) -> Result<SystemMetrics, ProviderError> {
        const OP: &str = "get_system_metrics";
        let row: MetricsRow = self
            .count_both_homes(OP, &system_metrics_both_homes(), SYSTEM_METRICS)
            .await?;
        Ok(SystemMetrics {
            total_instances: to_u64(OP, None, "total_instances", row.total_instances)?,
            total_executions: to_u64(OP, None, "total_executions", row.total_executions)?,
            running_instances: to_u64(OP, None, "running_instances", row.running)?,
            completed_instances: to_u64(OP, None, "completed_instances", row.completed)?,
            failed_instances: to_u64(OP, None, "failed_instances", row.failed)?,
            total_events: to_u64(OP, None, "total_events", row.total_events)?,
        })
    }

    async fn get_queue_depths(&self) -> Result<QueueDepths, ProviderError> {
        const OP: &str = "get_queue_depths";
        let (orch, worker): (i64, i64) = self
            .count_both_homes(OP, QUEUE_DEPTHS_BOTH_HOMES, QUEUE_DEPTHS)
            .await?;
        Ok(QueueDepths {
            orchestrator_queue: to_usize(OP, "orchestrator_queue", orch)?,
            worker_queue: to_usize(OP, "worker_queue", worker)?,
            timer_queue: 0,
        })
    }

    async fn list_children(&self, instance_id: &str) -> Result<Vec<String>, ProviderError> {
        const OP: &str = "list_children";
        self.adopt_tree_for_management(OP, instance_id).await?;
        on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(LIST_CHILDREN)).bind(instance_id)
        )
        .map_err(|e| db_error(OP, Some(instance_id), e))
    }

    async fn get_parent_id(&self, instance_id: &str) -> Result<Option<String>, ProviderError> {
        const OP: &str = "get_parent_id";
        self.adopt_for_management(OP, instance_id).await?;
        let row: Option<Option<String>> = on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_scalar(&self.sql(PARENT_ID)).bind(instance_id)
        )
        .map_err(|e| db_error(OP, Some(instance_id), e))?;
        row.ok_or_else(|| ProviderError::permanent(OP, format!("Instance {instance_id} not found")))
    }

    async fn get_instance_tree(&self, instance_id: &str) -> Result<InstanceTree, ProviderError> {
        const OP: &str = "get_instance_tree";
        self.adopt_tree_for_management(OP, instance_id).await?;
        // Root first, then descendants by depth. Like the default method, an unknown id
        // yields a tree of just that id.
        let all_ids: Vec<String> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(INSTANCE_TREE)).bind(instance_id)
        )
        .map_err(|e| db_error(OP, Some(instance_id), e))?;
        Ok(InstanceTree {
            root_id: instance_id.to_string(),
            all_ids,
        })
    }

    async fn delete_instances_atomic(
        &self,
        ids: &[String],
        force: bool,
    ) -> Result<DeleteInstanceResult, ProviderError> {
        const OP: &str = "delete_instances_atomic";
        if ids.is_empty() {
            return Ok(DeleteInstanceResult::default());
        }
        for id in ids {
            self.adopt_for_management(OP, id).await?;
        }
        // Name the instance in errors when there is exactly one; the SQL messages name
        // the offending instance themselves.
        let named = (ids.len() == 1).then(|| ids[0].as_str());
        let row: DeleteRow = on_conn!(
            self,
            fetch_one,
            sqlx::query_as(&self.sql(DELETE_INSTANCES))
                .bind(ids)
                .bind(force)
        )
        .map_err(|e| db_error(OP, named, e))?;
        let result = delete_result(OP, named, row)?;
        // A history kept for a handed-over activity's read is gone with it.
        self.inner.handover_reads.clear();
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            // The first id is the root when the ids come from get_instance_tree.
            instance = %ids[0],
            instances = ids.len(),
            force,
            executions_deleted = result.executions_deleted,
            events_deleted = result.events_deleted,
            queue_messages_deleted = result.queue_messages_deleted,
            "deleted instances"
        );
        Ok(result)
    }

    async fn delete_instance(
        &self,
        instance_id: &str,
        force: bool,
    ) -> Result<DeleteInstanceResult, ProviderError> {
        const OP: &str = "delete_instance";
        self.adopt_tree_for_management(OP, instance_id).await?;
        let row: DeleteRow = on_conn!(
            self,
            fetch_one,
            sqlx::query_as(&self.sql(DELETE_INSTANCE))
                .bind(instance_id)
                .bind(force)
        )
        .map_err(|e| db_error(OP, Some(instance_id), e))?;
        let result = delete_result(OP, Some(instance_id), row)?;
        // A history kept for a handed-over activity's read is gone with it.
        self.inner.handover_reads.clear();
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            instance = %instance_id,
            force,
            instances_deleted = result.instances_deleted,
            executions_deleted = result.executions_deleted,
            events_deleted = result.events_deleted,
            queue_messages_deleted = result.queue_messages_deleted,
            "deleted instance tree"
        );
        Ok(result)
    }

    async fn delete_instance_bulk(
        &self,
        filter: InstanceFilter,
    ) -> Result<DeleteInstanceResult, ProviderError> {
        const OP: &str = "delete_instance_bulk";
        let ids = filter_ids(&filter);
        if ids.is_some_and(<[String]>::is_empty) {
            return Ok(DeleteInstanceResult::default());
        }
        let completed_before = filter
            .completed_before
            .map(|t| bound_i64(OP, None, "completed_before", t))
            .transpose()?;
        let limit = i64::from(filter.limit.unwrap_or(DEFAULT_BULK_LIMIT));
        let trees: Vec<Vec<String>> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(BULK_DELETE_TREES))
                .bind(ids)
                .bind(completed_before)
                .bind(limit)
        )
        .map_err(|e| db_error(OP, None, e))?;
        let mut row: DeleteRow = (0, 0, 0, 0);
        for batch in delete_batches(trees, DELETE_BATCH_IDS) {
            // force: the roots are terminal, and descendants go whatever their status.
            let done: DeleteRow = on_conn!(
                self,
                fetch_one,
                sqlx::query_as(&self.sql(DELETE_INSTANCES))
                    .bind(&batch)
                    .bind(true)
            )
            .map_err(|e| db_error(OP, batch.first().map(String::as_str), e))?;
            row = (
                row.0 + done.0,
                row.1 + done.1,
                row.2 + done.2,
                row.3 + done.3,
            );
        }
        let result = delete_result(OP, None, row)?;
        // A history kept for a handed-over activity's read is gone with it.
        self.inner.handover_reads.clear();
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            limit,
            instances_deleted = result.instances_deleted,
            executions_deleted = result.executions_deleted,
            events_deleted = result.events_deleted,
            queue_messages_deleted = result.queue_messages_deleted,
            "bulk-deleted terminal instance trees"
        );
        Ok(result)
    }

    async fn prune_executions(
        &self,
        instance_id: &str,
        options: PruneOptions,
    ) -> Result<PruneResult, ProviderError> {
        const OP: &str = "prune_executions";
        self.adopt_for_management(OP, instance_id).await?;
        let completed_before = options
            .completed_before
            .map(|t| bound_i64(OP, Some(instance_id), "completed_before", t))
            .transpose()?;
        let row: PruneRow = on_conn!(
            self,
            fetch_one,
            sqlx::query_as(&self.sql(PRUNE_EXECUTIONS))
                .bind(instance_id)
                .bind(options.keep_last.map(i64::from))
                .bind(completed_before)
        )
        .map_err(|e| db_error(OP, Some(instance_id), e))?;
        let result = prune_result(OP, Some(instance_id), row)?;
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            instance = %instance_id,
            executions_deleted = result.executions_deleted,
            events_deleted = result.events_deleted,
            "pruned executions"
        );
        Ok(result)
    }

    async fn prune_executions_bulk(
        &self,
        filter: InstanceFilter,
        options: PruneOptions,
    ) -> Result<PruneResult, ProviderError> {
        const OP: &str = "prune_executions_bulk";
        let ids = filter_ids(&filter);
        if ids.is_some_and(<[String]>::is_empty) {
            return Ok(PruneResult::default());
        }
        let instance_completed_before = filter
            .completed_before
            .map(|t| bound_i64(OP, None, "completed_before", t))
            .transpose()?;
        let exec_completed_before = options
            .completed_before
            .map(|t| bound_i64(OP, None, "completed_before", t))
            .transpose()?;
        let limit = i64::from(filter.limit.unwrap_or(DEFAULT_BULK_LIMIT));
        let row: PruneRow = on_conn!(
            self,
            fetch_one,
            sqlx::query_as(&self.sql(PRUNE_EXECUTIONS_BULK))
                .bind(ids)
                .bind(instance_completed_before)
                .bind(limit)
                .bind(options.keep_last.map(i64::from))
                .bind(exec_completed_before)
        )
        .map_err(|e| db_error(OP, None, e))?;
        let result = prune_result(OP, None, row)?;
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            limit,
            instances_processed = result.instances_processed,
            executions_deleted = result.executions_deleted,
            events_deleted = result.events_deleted,
            "bulk-pruned executions"
        );
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &str, children: usize) -> Vec<String> {
        std::iter::once(root.to_string())
            .chain((0..children).map(|i| format!("{root}-c{i}")))
            .collect()
    }

    #[test]
    fn delete_batches_keep_trees_whole_and_bounded() {
        let trees: Vec<Vec<String>> = (0..100).map(|i| tree(&format!("r{i}"), 10)).collect();
        let batches = delete_batches(trees, 256);
        assert!(batches.iter().all(|b| b.len() <= 256));
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 1100);
        // 23 trees of 11 fit in 256.
        assert_eq!(batches[0].len(), 253);
        assert_eq!(batches[0][0], "r0");
        assert_eq!(batches[0][11], "r1");
        // A tree larger than the batch goes alone; duplicates are dropped.
        let batches = delete_batches(vec![tree("a", 1), tree("big", 300), tree("a", 1)], 256);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0], tree("a", 1));
        assert_eq!(batches[1].len(), 301);
    }
}
