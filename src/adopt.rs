//! Live adoption of a running duroxide-pg 0.1.38 deployment.
//!
//! duroxide-pg keeps its tables in the schema it was given (`public` for `new(url)`), under
//! the same names as ours, and its processes need them there until the last one is gone.
//! So when the configured schema `S` holds duroxide-pg's ledger at 0.1.38's last migration,
//! this crate keeps its own tables in a companion schema `S_hybrid` and moves instances
//! over one at a time while both kinds of processes run:
//!
//! * [`install`] (start-up with migrations on) puts routing triggers on duroxide-pg's queues
//!   and the move functions into `S_hybrid` (`migrations/adoption/install.sql`, which
//!   explains the locking);
//! * every provider of this crate runs a mover task (`spawn_mover`) that calls
//!   `adopt_batch` until nothing is left, logging each batch and counting
//!   `duroxide_pg_adopted_instances_total`;
//! * [`finalize`] (CLI `adopt finalize`), once no duroxide-pg process is left and nothing
//!   remains in `S`, drops duroxide-pg's objects and leaves a marker table
//!   `S._duroxide_pg_hybrid_adopted` naming `S_hybrid`, so processes configured with `S`
//!   keep finding their data.

use std::sync::Weak;
use std::time::Duration;

use duroxide::providers::ProviderError;
use sqlx::{Executor, PgPool};

use crate::errors::db_error;
use crate::incumbent;
use crate::provider::PostgresProvider;
use crate::schema::{quote_ident, validate_schema_name};

/// The install script; `{old}` / `{new}` are replaced by quoted schema names.
const INSTALL_SQL: &str = include_str!("../migrations/adoption/install.sql");

/// Marker table left in the duroxide-pg schema by [`finalize`].
pub const MARKER_TABLE: &str = "_duroxide_pg_hybrid_adopted";

/// Suffix of the companion schema that holds this crate's tables during and after an
/// adoption.
pub const SCHEMA_SUFFIX: &str = "_hybrid";

/// duroxide-pg 0.1.38's tables, dropped by [`finalize`].
const INCUMBENT_TABLES: &[&str] = &[
    "instances",
    "executions",
    "history",
    "orchestrator_queue",
    "worker_queue",
    "instance_locks",
    "sessions",
    "kv_store",
    "kv_delta",
    incumbent::LEDGER_TABLE,
];

/// duroxide-pg 0.1.38's functions (every overload is dropped by [`finalize`]).
const INCUMBENT_FUNCTIONS: &[&str] = &[
    "abandon_orchestration_item",
    "abandon_work_item",
    "ack_orchestration",
    "ack_orchestration_item",
    "ack_worker",
    "append_history",
    "cleanup_orphaned_sessions",
    "cleanup_schema",
    "delete_instances_atomic",
    "enqueue_completion",
    "enqueue_message",
    "enqueue_orchestration_work",
    "enqueue_orchestrator_work",
    "enqueue_worker_work",
    "fetch_history",
    "fetch_history_with_execution",
    "fetch_orchestration_item",
    "fetch_work_item",
    "get_custom_status",
    "get_execution_info",
    "get_instance_info",
    "get_instance_stats",
    "get_kv_all_values",
    "get_kv_value",
    "get_parent_id",
    "get_queue_depths",
    "get_system_metrics",
    "latest_execution_id",
    "list_children",
    "list_executions",
    "list_instances",
    "list_instances_by_status",
    "prune_executions",
    "renew_orchestration_item_lock",
    "renew_session_lock",
    "renew_work_item_lock",
];

/// Functions [`install`] creates in the companion schema (dropped by [`finalize`]: they
/// name the duroxide-pg schema).
const ADOPTION_FUNCTIONS: &[&str] = &[
    "adoption_lock_space",
    "adoption_ms",
    "adoption_item_kind",
    "adoption_lives_in_old",
    "adoption_announce",
    "adoption_route_from_old",
    "adoption_route_to_old",
    "adoption_route_worker_from_old",
    "adopt_instance",
    "adoption_move_worker_items",
    "adopt_batch",
    "adoption_progress",
    "adoption_lives_in_new",
];

/// Suffix of duroxide-pg's read functions renamed by [`install`] (their replacements find
/// moved instances; see `install.sql`).
const RENAMED_SUFFIX: &str = "_before_adoption";

/// Where a configured schema's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The schema holding this crate's tables.
    pub data_schema: String,
    /// The duroxide-pg schema being adopted (until finalized).
    pub adopting: Option<String>,
}

/// The companion schema of a duroxide-pg schema.
///
/// # Errors
/// The resulting name is not a valid schema name (too long).
pub fn companion_schema(old: &str) -> Result<String, sqlx::Error> {
    let name = format!("{old}{SCHEMA_SUFFIX}");
    validate_schema_name(&name).map_err(|e| {
        sqlx::Error::Configuration(
            format!(
                "cannot adopt duroxide-pg schema {old:?}: companion schema name {name:?} is invalid ({e})"
            )
            .into(),
        )
    })?;
    Ok(name)
}

/// Decides where the data of `schema` lives: `schema` itself; or, when it holds a
/// duroxide-pg 0.1.38 schema (adoption in progress) or an adoption marker (finalized), the
/// companion schema. A duroxide-pg schema at another version is refused with what was
/// found and what to do.
///
/// # Errors
/// The refusal, or database errors of the catalog queries.
pub async fn resolve(conn: &mut sqlx::PgConnection, schema: &str) -> Result<Resolved, sqlx::Error> {
    // The common case (neither table) in one round trip.
    let (ledger, marker): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                        WHERE n.nspname = $1 AND c.relname = $2), \
                EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $3)",
    )
    .bind(schema)
    .bind(incumbent::LEDGER_TABLE)
    .bind(MARKER_TABLE)
    .persistent(false)
    .fetch_one(&mut *conn)
    .await?;
    if !ledger && !marker {
        return Ok(Resolved {
            data_schema: schema.to_string(),
            adopting: None,
        });
    }
    if let Some(found) = incumbent::detect_on(&mut *conn, schema).await? {
        if !found.is_adoptable() {
            return Err(sqlx::Error::Configuration(found.refusal().into()));
        }
        return Ok(Resolved {
            data_schema: companion_schema(schema)?,
            adopting: Some(schema.to_string()),
        });
    }
    if let Some(data) = read_marker(&mut *conn, schema).await? {
        return Ok(Resolved {
            data_schema: data,
            adopting: None,
        });
    }
    Ok(Resolved {
        data_schema: schema.to_string(),
        adopting: None,
    })
}

/// [`resolve`] in a transaction of its own: behind a transaction pooler an unnamed
/// statement's Parse and Bind stay on one server connection only inside a transaction.
///
/// # Errors
/// As [`resolve`].
pub async fn resolve_in_transaction(pool: &PgPool, schema: &str) -> Result<Resolved, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let resolved = resolve(&mut tx, schema).await?;
    tx.commit().await?;
    Ok(resolved)
}

async fn read_marker(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Option<String>, sqlx::Error> {
    let data: Option<String> = sqlx::query_scalar(&format!(
        "SELECT data_schema FROM {}.{} LIMIT 1",
        quote_ident(schema),
        quote_ident(MARKER_TABLE)
    ))
    .persistent(false)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(data)
}

/// The install script for a pair of schemas.
pub fn install_sql(old: &str, new: &str) -> String {
    INSTALL_SQL
        .replace("{old_literal_ident}", &quote_literal(&quote_ident(old)))
        .replace("{old_literal}", &quote_literal(old))
        .replace("{old}", &quote_ident(old))
        .replace("{new}", &quote_ident(new))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Revision of the install script (its `-- revision: N` header).
pub fn install_revision() -> i32 {
    INSTALL_SQL
        .lines()
        .next()
        .and_then(|l| l.trim().strip_prefix("-- revision:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// How long the install waits for one of duroxide-pg's tables before it gives up and
/// tries again. Its triggers lock those tables one after the other, while a running
/// duroxide-pg process writes them in its own order (a worker ack: worker queue, then
/// orchestrator queue); a wait between the two is a deadlock, and PostgreSQL may pick the
/// duroxide-pg process's transaction to fail (its activity then runs again). Waiting less
/// than `deadlock_timeout` (1 s by default) means the install is always the one to back
/// off, before the deadlock check runs.
const INSTALL_LOCK_TIMEOUT: &str = "100ms";
/// Attempts of the install (its lock waits time out), about half a minute in all.
const INSTALL_ATTEMPTS: u32 = 60;

/// Installs (or brings up to date) the adoption of `old` into `new`, whose migrations
/// must already be applied. One transaction under `new`'s migration lock; a no-op when
/// the installed revision is current. Running duroxide-pg processes are never made to
/// fail by it: it waits at most 100 ms for each of their tables, then rolls back and
/// tries again.
///
/// # Errors
/// Database errors; `new` already adopting another schema; duroxide-pg's tables still
/// busy after about half a minute of attempts (SQLSTATE 55P03).
pub async fn install(pool: &PgPool, old: &str, new: &str) -> Result<(), sqlx::Error> {
    let mut attempt = 1;
    loop {
        match install_once(pool, old, new).await {
            Err(e) if is_lock_timeout(&e) && attempt < INSTALL_ATTEMPTS => {
                tracing::debug!(
                    target: crate::provider::TRACING_TARGET,
                    duroxide_pg_schema = old,
                    attempt,
                    "adoption install: duroxide-pg's tables are busy; trying again"
                );
                let backoff = Duration::from_millis(u64::from(attempt.min(10)) * 50);
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "55P03")
}

async fn install_once(pool: &PgPool, old: &str, new: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("duroxide-pg-hybrid:migrate:{new}"))
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    let installed: Option<(String, i32, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT source_schema, install_revision, finalized_at_ms FROM {}.adoption_source",
        quote_ident(new)
    ))
    .persistent(false)
    .fetch_optional(&mut *tx)
    .await?;
    match &installed {
        Some((source, _, _)) if source != old => {
            return Err(sqlx::Error::Configuration(
                format!("schema {new:?} already adopts duroxide-pg schema {source:?}, not {old:?}")
                    .into(),
            ));
        }
        Some((_, revision, _)) if *revision >= install_revision() => return tx.commit().await,
        _ => {}
    }
    tx.execute(format!("SET LOCAL search_path TO {}, pg_temp", quote_ident(new)).as_str())
        .await?;
    tx.execute(format!("SET LOCAL lock_timeout = '{INSTALL_LOCK_TIMEOUT}'").as_str())
        .await?;
    tx.execute(install_sql(old, new).as_str()).await?;
    sqlx::query(&format!(
        "INSERT INTO {}.adoption_source (source_schema, install_revision, started_at_ms) \
         VALUES ($1, $2, {}.now_ms()) \
         ON CONFLICT (singleton) DO UPDATE SET install_revision = EXCLUDED.install_revision",
        quote_ident(new),
        quote_ident(new)
    ))
    .bind(old)
    .bind(install_revision())
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        target: crate::provider::TRACING_TARGET,
        duroxide_pg_schema = old,
        schema = new,
        revision = install_revision(),
        "adopting a duroxide-pg schema: routing triggers and move functions installed"
    );
    Ok(())
}

/// Checks, without DDL, that the adoption of `old` into `new` is installed at this
/// binary's revision or newer (processes that do not migrate).
///
/// # Errors
/// A configuration error saying what to run; database errors.
pub async fn verify_installed(pool: &PgPool, old: &str, new: &str) -> Result<(), sqlx::Error> {
    // In a transaction: unnamed statements through a transaction pooler (see
    // `resolve_in_transaction`); likewise below.
    let mut tx = pool.begin().await?;
    let row: Option<(String, i32)> = sqlx::query_as(&format!(
        "SELECT source_schema, install_revision FROM {}.adoption_source",
        quote_ident(new)
    ))
    .persistent(false)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    match row {
        Some((source, revision)) if source == old && revision >= install_revision() => Ok(()),
        _ => Err(sqlx::Error::Configuration(
            format!(
                "schema {old:?} holds a duroxide-pg 0.1.38 schema whose adoption into {new:?} is \
                 not installed (or is older than this binary's): start one process with \
                 migrations on (auto_migrate / MigrationPolicy::ApplyAll) or run \
                 `duroxide-pg-hybrid migrate up --schema {old}` first"
            )
            .into(),
        )),
    }
}

/// Progress of an adoption, as `adoption_progress()` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Instances still in the duroxide-pg tables.
    pub old_instances: i64,
    /// Messages still in duroxide-pg's orchestrator queue.
    pub old_messages: i64,
    /// Activities still in duroxide-pg's worker queue.
    pub old_activities: i64,
    /// Of those, held by a duroxide-pg worker right now.
    pub old_leased_activities: i64,
    /// Instances moved so far.
    pub adopted: i64,
}

impl Progress {
    /// Nothing left in the duroxide-pg tables.
    pub fn is_done(&self) -> bool {
        self.old_instances == 0 && self.old_messages == 0 && self.old_activities == 0
    }
}

/// Reads the adoption's progress (`new` = the companion schema).
///
/// # Errors
/// Database errors (e.g. no adoption installed in `new`).
pub async fn progress(pool: &PgPool, new: &str) -> Result<Progress, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (old_instances, old_messages, old_activities, old_leased_activities, adopted): (
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(&format!(
        "SELECT old_instances, old_messages, old_activities, old_leased_activities, adopted \
         FROM {}.adoption_progress()",
        quote_ident(new)
    ))
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Progress {
        old_instances,
        old_messages,
        old_activities,
        old_leased_activities,
        adopted,
    })
}

/// One batch of the move, as `adopt_batch` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Instances moved.
    pub moved: i32,
    /// Instances a duroxide-pg process held (retried later).
    pub busy: i32,
    /// Instances looked at.
    pub visited: i32,
    /// Where the next batch continues (`None`: wrap around).
    pub last_instance: Option<String>,
    /// Stray messages and released activities of moved instances moved.
    pub swept: i32,
    /// Instances that failed to move (`instance: error`), retried by the next pass.
    pub failures: Vec<String>,
}

/// Runs one batch of the move: up to `limit` instances after `after` in id order.
///
/// # Errors
/// Database errors.
pub async fn adopt_batch(
    pool: &PgPool,
    new: &str,
    after: &str,
    limit: i32,
) -> Result<Batch, sqlx::Error> {
    let mut tx = pool.begin().await?;
    #[allow(clippy::type_complexity)]
    let (moved, busy, visited, last_instance, swept, failures): (
        i32,
        i32,
        i32,
        Option<String>,
        i32,
        Vec<String>,
    ) = sqlx::query_as(&format!(
        "SELECT moved, busy, visited, last_instance, swept, failures FROM {}.adopt_batch($1, $2)",
        quote_ident(new)
    ))
    .bind(after)
    .bind(limit)
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Batch {
        moved,
        busy,
        visited,
        last_instance,
        swept,
        failures,
    })
}

/// Instances per `adopt_batch` call: one transaction holds their locks, so duroxide-pg
/// processes wait at most for one short batch.
pub const BATCH_SIZE: i32 = 25;

/// Starts the background move for a provider adopting `old` into `new`. The task ends when
/// the provider is dropped or the adoption is finalized.
pub(crate) fn spawn_mover(
    pool: PgPool,
    old: String,
    new: String,
    idle: Duration,
    alive: Weak<crate::provider::Inner>,
) {
    tokio::spawn(async move {
        let mut after = String::new();
        let mut errors = 0u32;
        loop {
            if alive.upgrade().is_none() {
                return;
            }
            let pause = match adopt_batch(&pool, &new, &after, BATCH_SIZE).await {
                Ok(batch) => {
                    errors = 0;
                    for failure in &batch.failures {
                        tracing::warn!(
                            target: crate::provider::TRACING_TARGET,
                            duroxide_pg_schema = %old,
                            failure = %failure,
                            "adoption: an instance failed to move; retried by the next pass"
                        );
                    }
                    if batch.moved > 0 || batch.swept > 0 {
                        metrics::counter!("duroxide_pg_adopted_instances_total")
                            .increment(u64::try_from(batch.moved).unwrap_or(0));
                        let left = progress(&pool, &new).await.ok();
                        tracing::info!(
                            target: crate::provider::TRACING_TARGET,
                            duroxide_pg_schema = %old,
                            schema = %new,
                            moved = batch.moved,
                            busy = batch.busy,
                            swept = batch.swept,
                            left_instances = left.map(|p| p.old_instances),
                            left_activities = left.map(|p| p.old_activities),
                            adopted_total = left.map(|p| p.adopted),
                            "adoption batch"
                        );
                    }
                    let full = batch.visited >= BATCH_SIZE;
                    after = if full {
                        batch.last_instance.unwrap_or_default()
                    } else {
                        String::new()
                    };
                    if full || batch.moved > 0 {
                        Duration::ZERO
                    } else if batch.busy > 0 {
                        // Held by a duroxide-pg turn or activity: they are short.
                        idle.min(Duration::from_millis(200))
                    } else {
                        idle
                    }
                }
                Err(e) if finalized(&e) => {
                    tracing::info!(
                        target: crate::provider::TRACING_TARGET,
                        duroxide_pg_schema = %old,
                        "adoption finalized: mover stops"
                    );
                    return;
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(
                        target: crate::provider::TRACING_TARGET,
                        duroxide_pg_schema = %old,
                        error = %e,
                        "adoption batch failed; retrying"
                    );
                    idle * errors.min(10)
                }
            };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    });
}

/// The move functions are gone (42883) or the duroxide-pg tables are (42P01): finalized.
fn finalized(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42883") | Some("42P01")))
}

/// The retryable error of a management call whose instance a duroxide-pg process holds
/// while the call would move it.
fn held_by_duroxide_pg(op: &str, instance: &str) -> ProviderError {
    ProviderError::retryable(
        op,
        format!(
            "instance {instance} is being moved from duroxide-pg's tables and a duroxide-pg \
             process holds it right now; retry shortly"
        ),
    )
}

/// Management on this crate's side during an adoption: the instance (or the tree under
/// it) is moved out of duroxide-pg's tables first, the same per-instance move the mover
/// makes, so the call that follows finds it wherever it lived. A move never waits: an
/// instance a duroxide-pg process holds right now is a retryable error naming it.
impl PostgresProvider {
    /// Moves `instance` if it still lives in duroxide-pg's tables. No-op when not
    /// adopting or after finalize.
    pub(crate) async fn adopt_for_management(
        &self,
        op: &str,
        instance: &str,
    ) -> Result<(), ProviderError> {
        if self.inner.adopting_q.is_none() {
            return Ok(());
        }
        // Idempotent: a resend of a move that committed answers 'adopted'.
        let outcome = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_scalar::<_, String>(&self.sql("SELECT {s}.adopt_instance($1)"))
                .bind(instance)
        );
        match outcome {
            Ok(o) if o == "moved" => {
                metrics::counter!("duroxide_pg_adopted_instances_total").increment(1);
                tracing::info!(
                    target: crate::TRACING_TARGET,
                    operation = op,
                    instance = %instance,
                    "moved the instance out of duroxide-pg's tables before managing it"
                );
                Ok(())
            }
            Ok(o) if o == "busy" => Err(held_by_duroxide_pg(op, instance)),
            Ok(_) => Ok(()),
            Err(e) if finalized(&e) => Ok(()),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                Err(held_by_duroxide_pg(op, instance))
            }
            Err(e) => Err(db_error(op, Some(instance), e)),
        }
    }

    /// Moves `root` and every descendant still in duroxide-pg's tables (children are
    /// listed in both homes by the listing dispatcher `install.sql` installs).
    pub(crate) async fn adopt_tree_for_management(
        &self,
        op: &str,
        root: &str,
    ) -> Result<(), ProviderError> {
        let Some(old) = self.inner.adopting_q.as_deref() else {
            return Ok(());
        };
        let mut pending = vec![root.to_string()];
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = pending.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            self.adopt_for_management(op, &id).await?;
            let children = on_conn!(
                idempotent: self,
                fetch_all,
                sqlx::query_scalar::<_, String>(&format!(
                    "SELECT child_instance_id FROM {old}.list_children($1)"
                ))
                .bind(&id)
            );
            match children {
                Ok(c) => pending.extend(c),
                Err(e) if finalized(&e) => return Ok(()),
                Err(e) => return Err(db_error(op, Some(&id), e)),
            }
        }
        Ok(())
    }

    /// One row of a count over both homes while adopting (`both`: {s} this crate's
    /// schema, {o} duroxide-pg's, one statement so an instance moving meanwhile counts
    /// once), else, or once finalize has dropped duroxide-pg's tables, of `ours`.
    pub(crate) async fn count_both_homes<T>(
        &self,
        op: &str,
        both: &str,
        ours: &str,
    ) -> Result<T, ProviderError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + 'static,
    {
        if let Some(old) = self.inner.adopting_q.as_deref() {
            let sql = self.sql(&both.replace("{o}", old));
            match on_conn!(idempotent: self, fetch_one, sqlx::query_as::<_, T>(&sql)) {
                Ok(row) => return Ok(row),
                Err(e) if finalized(&e) => {}
                Err(e) => return Err(db_error(op, None, e)),
            }
        }
        let sql = self.sql(ours);
        on_conn!(idempotent: self, fetch_one, sqlx::query_as::<_, T>(&sql))
            .map_err(|e| db_error(op, None, e))
    }

    /// Instance ids of both homes, newest first, through the listing dispatchers
    /// (`status` = None: all). `None` when not adopting or finalized.
    pub(crate) async fn list_both_homes(
        &self,
        op: &str,
        status: Option<&str>,
    ) -> Result<Option<Vec<String>>, ProviderError> {
        let Some(old) = self.inner.adopting_q.as_deref() else {
            return Ok(None);
        };
        let rows = match status {
            None => on_conn!(
                idempotent: self,
                fetch_all,
                sqlx::query_scalar::<_, String>(&format!(
                    "SELECT instance_id FROM {old}.list_instances()"
                ))
            ),
            Some(st) => on_conn!(
                idempotent: self,
                fetch_all,
                sqlx::query_scalar::<_, String>(&format!(
                    "SELECT instance_id FROM {old}.list_instances_by_status($1)"
                ))
                .bind(st)
            ),
        };
        match rows {
            Ok(ids) => Ok(Some(ids)),
            Err(e) if finalized(&e) => Ok(None),
            Err(e) => Err(db_error(op, None, e)),
        }
    }
}

/// Client reads of instances that still live in the duroxide-pg tables. A read of this
/// crate's tables that finds nothing asks duroxide-pg's own read functions (through the
/// dispatchers `install.sql` puts in their place), so this crate's client sees an instance
/// before the mover reaches it. After finalize those functions are gone: nothing found.
impl PostgresProvider {
    async fn old_read<T, F>(
        &self,
        op: &str,
        instance: &str,
        run: F,
    ) -> Result<Option<T>, ProviderError>
    where
        F: AsyncFnOnce(&PostgresProvider, &str) -> Result<T, sqlx::Error>,
    {
        let Some(old) = self.inner.adopting_q.as_deref() else {
            return Ok(None);
        };
        match run(self, old).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if finalized(&e) => Ok(None),
            Err(e) => Err(db_error(op, Some(instance), e)),
        }
    }

    /// Serialized events of the latest (`None`) or a given execution.
    pub(crate) async fn old_history(
        &self,
        op: &str,
        instance: &str,
        execution_id: Option<i64>,
    ) -> Result<Vec<String>, ProviderError> {
        let rows = self
            .old_read(
                op,
                instance,
                async |p: &PostgresProvider, old: &str| match execution_id {
                    None => on_conn!(
                        idempotent: p,
                        fetch_all,
                        sqlx::query_scalar::<_, String>(&format!(
                            "SELECT out_event_data FROM {old}.fetch_history($1)"
                        ))
                        .bind(instance)
                    ),
                    Some(exec) => on_conn!(
                        idempotent: p,
                        fetch_all,
                        sqlx::query_scalar::<_, String>(&format!(
                            "SELECT out_event_data FROM {old}.fetch_history_with_execution($1, $2)"
                        ))
                        .bind(instance)
                        .bind(exec)
                    ),
                },
            )
            .await?;
        Ok(rows.unwrap_or_default())
    }

    pub(crate) async fn old_custom_status(
        &self,
        instance: &str,
        last_seen_version: i64,
    ) -> Result<Option<(Option<String>, i64)>, ProviderError> {
        let row = self
            .old_read("get_custom_status", instance, async |p: &PostgresProvider, old: &str| {
                on_conn!(
                    idempotent: p,
                    fetch_optional,
                    sqlx::query_as::<_, (Option<String>, i64)>(&format!(
                        "SELECT out_custom_status, out_custom_status_version FROM {old}.get_custom_status($1, $2)"
                    ))
                    .bind(instance)
                    .bind(last_seen_version)
                )
            })
            .await?;
        Ok(row.flatten())
    }

    pub(crate) async fn old_kv_value(
        &self,
        instance: &str,
        key: &str,
    ) -> Result<Option<String>, ProviderError> {
        let row = self
            .old_read(
                "get_kv_value",
                instance,
                async |p: &PostgresProvider, old: &str| {
                    on_conn!(
                        idempotent: p,
                        fetch_optional,
                        sqlx::query_as::<_, (Option<String>, bool)>(&format!(
                            "SELECT out_value, out_found FROM {old}.get_kv_value($1, $2)"
                        ))
                        .bind(instance)
                        .bind(key)
                    )
                },
            )
            .await?;
        Ok(row
            .flatten()
            .and_then(|(v, found)| if found { v } else { None }))
    }

    pub(crate) async fn old_kv_all(
        &self,
        instance: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let rows = self
            .old_read(
                "get_kv_all_values",
                instance,
                async |p: &PostgresProvider, old: &str| {
                    on_conn!(
                        idempotent: p,
                        fetch_all,
                        sqlx::query_as::<_, (String, String)>(&format!(
                            "SELECT out_key, out_value FROM {old}.get_kv_all_values($1)"
                        ))
                        .bind(instance)
                    )
                },
            )
            .await?;
        Ok(rows.unwrap_or_default())
    }
}

/// What [`finalize`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    /// The duroxide-pg schema emptied.
    pub old: String,
    /// The schema holding the data from now on.
    pub data_schema: String,
    /// Instances moved over the whole adoption.
    pub adopted: i64,
}

/// Ends the adoption of duroxide-pg schema `old`: refuses while anything is left in its
/// tables (the error says what); otherwise, in one transaction, drops the routing
/// triggers, the move functions, duroxide-pg's tables, functions and ledger, and leaves
/// `old._duroxide_pg_hybrid_adopted` naming the data schema. Run it only when no
/// duroxide-pg process is left (one that starts later finds no ledger and creates an empty
/// duroxide-pg schema beside the marker).
///
/// # Errors
/// Not an adoption in progress, work left in `old`, database errors.
pub async fn finalize(pool: &PgPool, old: &str) -> Result<Finalized, sqlx::Error> {
    validate_schema_name(old).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    let resolved = resolve_in_transaction(pool, old).await?;
    let Some(_) = resolved.adopting else {
        return Err(sqlx::Error::Configuration(
            format!(
                "schema {old:?} is not a duroxide-pg schema being adopted: nothing to finalize"
            )
            .into(),
        ));
    };
    let new = resolved.data_schema;
    // Move what is movable now (nothing may be left behind by a mover that is not running).
    let mut after = String::new();
    loop {
        let b = adopt_batch(pool, &new, &after, 500).await?;
        if b.visited < 500 {
            break;
        }
        after = b.last_instance.unwrap_or_default();
    }
    let left = progress(pool, &new).await?;
    if !left.is_done() {
        return Err(sqlx::Error::Configuration(
            format!(
                "cannot finalize the adoption of {old:?}: {} instance(s), {} message(s) and {} \
                 activit(y/ies) ({} held by a duroxide-pg worker) are still in the duroxide-pg \
                 tables. Keep this crate's processes running until they have moved (a held \
                 activity moves when its duroxide-pg worker finishes or its lease ends), then retry",
                left.old_instances, left.old_messages, left.old_activities, left.old_leased_activities
            )
            .into(),
        ));
    }
    let o = quote_ident(old);
    let n = quote_ident(&new);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("duroxide-pg-hybrid:migrate:{new}"))
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    // Re-checked under the lock and with the tables locked against writers.
    tx.execute(
        format!(
            "LOCK TABLE {o}.orchestrator_queue, {o}.worker_queue, {o}.instances IN EXCLUSIVE MODE"
        )
        .as_str(),
    )
    .await?;
    let (instances, messages, activities): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {o}.instances), (SELECT count(*) FROM {o}.orchestrator_queue), \
         (SELECT count(*) FROM {o}.worker_queue)"
    ))
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    if instances + messages + activities > 0 {
        return Err(sqlx::Error::Configuration(
            format!("cannot finalize the adoption of {old:?}: new work arrived in the duroxide-pg tables; retry").into(),
        ));
    }
    tx.execute(
        format!("DROP TRIGGER IF EXISTS adoption_route_to_old ON {n}.orchestrator_queue").as_str(),
    )
    .await?;
    for f in ADOPTION_FUNCTIONS {
        drop_functions(&mut tx, &new, f).await?;
    }
    for t in INCUMBENT_TABLES {
        tx.execute(format!("DROP TABLE IF EXISTS {o}.{} CASCADE", quote_ident(t)).as_str())
            .await?;
    }
    for f in INCUMBENT_FUNCTIONS {
        drop_functions(&mut tx, old, f).await?;
        drop_functions(&mut tx, old, &format!("{f}{RENAMED_SUFFIX}")).await?;
    }
    tx.execute(
        format!(
            "CREATE TABLE {o}.{} (data_schema TEXT NOT NULL, finalized_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            quote_ident(MARKER_TABLE)
        )
        .as_str(),
    )
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {o}.{} (data_schema) VALUES ($1)",
        quote_ident(MARKER_TABLE)
    ))
    .bind(&new)
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    tx.execute(format!("UPDATE {n}.adoption_source SET finalized_at_ms = {n}.now_ms()").as_str())
        .await?;
    tx.commit().await?;
    tracing::info!(
        target: crate::provider::TRACING_TARGET,
        duroxide_pg_schema = old,
        schema = %new,
        adopted = left.adopted,
        "adoption finalized: duroxide-pg objects dropped"
    );
    Ok(Finalized {
        old: old.to_string(),
        data_schema: new,
        adopted: left.adopted,
    })
}

/// Drops every overload of `schema.name`.
async fn drop_functions(
    tx: &mut sqlx::PgConnection,
    schema: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    let signatures: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = $2",
    )
    .bind(schema)
    .bind(name)
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    for sig in signatures {
        // regprocedure text is already schema-qualified and quoted where needed.
        tx.execute(format!("DROP FUNCTION IF EXISTS {sig} CASCADE").as_str())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_script_names_both_schemas_quoted() {
        let sql = install_sql("public", "public_hybrid");
        assert!(!sql.contains("{old}") && !sql.contains("{new}"));
        assert!(sql.contains("\"public\".orchestrator_queue"));
        assert!(sql.contains("\"public_hybrid\".adoption_route_from_old()"));
        assert!(install_revision() >= 1);
    }

    #[test]
    fn every_install_function_is_dropped_by_finalize() {
        for line in INSTALL_SQL.lines() {
            if let Some(rest) = line.strip_prefix("CREATE OR REPLACE FUNCTION ") {
                let name = rest.split('(').next().unwrap();
                match name.strip_prefix("{old}.") {
                    Some(replaced) => assert!(
                        INCUMBENT_FUNCTIONS.contains(&replaced),
                        "{replaced} not dropped by finalize"
                    ),
                    None => assert!(
                        ADOPTION_FUNCTIONS.contains(&name),
                        "{name} not dropped by finalize"
                    ),
                }
            }
        }
    }

    #[test]
    fn companion_schema_names() {
        assert_eq!(companion_schema("public").unwrap(), "public_hybrid");
        assert!(companion_schema(&"x".repeat(60)).is_err());
    }
}
