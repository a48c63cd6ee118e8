//! A hand-made duroxide-pg 0.1.38 schema skeleton for detection tests that do not build
//! duroxide-pg itself: its migration ledger `_duroxide_migrations` (same columns as
//! duroxide-pg creates) filled with the 24 migration file names 0.1.38 ships, plus an
//! tables of 0.1.38's shape (columns and keys; no functions, no indexes), enough for the
//! adoption to install on and move hand-written rows.

#![allow(dead_code)] // each test binary uses a different subset

use sqlx::PgConnection;

/// duroxide-pg 0.1.38's migrations (0022 and 0024 were never released).
pub const MIGRATIONS_0_1_38: [(i64, &str); 24] = [
    (1, "0001_initial_schema.sql"),
    (2, "0002_create_stored_procedures.sql"),
    (3, "0003_add_attempt_count.sql"),
    (4, "0004_update_stored_procedures_for_attempt_count.sql"),
    (5, "0005_add_visible_at_to_worker_queue.sql"),
    (6, "0006_use_rust_timestamps.sql"),
    (7, "0007_add_execution_state_support.sql"),
    (8, "0008_remove_execution_state.sql"),
    (9, "0009_add_activity_cancellation_support.sql"),
    (10, "0010_add_deletion_and_pruning_support.sql"),
    (11, "0011_fix_cancellation_ordering.sql"),
    (12, "0012_require_timestamps.sql"),
    (13, "0013_add_capability_filtering.sql"),
    (14, "0014_add_session_support.sql"),
    (15, "0015_add_custom_status.sql"),
    (16, "0016_add_activity_tags.sql"),
    (17, "0017_retry_orchestration_fetch_on_contention.sql"),
    (18, "0018_add_kv_store.sql"),
    (19, "0019_add_kv_last_updated.sql"),
    (20, "0020_add_kv_delta.sql"),
    (21, "0021_add_get_instance_stats.sql"),
    (23, "0023_partial_secondary_indexes.sql"),
    (25, "0025_fetch_orchestration_lease_at_claim.sql"),
    (26, "0026_serialize_orchestration_lock_mutations.sql"),
];

/// Creates `schema` (quoted name, must not exist) with the ledger at migration `up_to`
/// and duroxide-pg 0.1.38-shaped tables.
pub async fn create_duroxide_pg_skeleton(conn: &mut PgConnection, schema: &str, up_to: i64) {
    let q = format!("\"{}\"", schema.replace('"', "\"\""));
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {q};
         CREATE TABLE {q}._duroxide_migrations (
             version BIGINT PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP);
         CREATE TABLE {q}.instances (
             instance_id TEXT PRIMARY KEY,
             orchestration_name TEXT NOT NULL,
             orchestration_version TEXT,
             current_execution_id BIGINT NOT NULL DEFAULT 1,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             parent_instance_id TEXT,
             custom_status TEXT,
             custom_status_version INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE {q}.executions (
             instance_id TEXT NOT NULL, execution_id BIGINT NOT NULL,
             status TEXT NOT NULL DEFAULT 'Running', output TEXT,
             started_at TIMESTAMPTZ NOT NULL DEFAULT now(), completed_at TIMESTAMPTZ,
             duroxide_version_major INTEGER, duroxide_version_minor INTEGER,
             duroxide_version_patch INTEGER,
             PRIMARY KEY (instance_id, execution_id));
         CREATE TABLE {q}.history (
             instance_id TEXT NOT NULL, execution_id BIGINT NOT NULL, event_id BIGINT NOT NULL,
             event_type TEXT NOT NULL, event_data TEXT NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (instance_id, execution_id, event_id));
         CREATE TABLE {q}.orchestrator_queue (
             id BIGSERIAL PRIMARY KEY, instance_id TEXT NOT NULL, work_item TEXT NOT NULL,
             visible_at TIMESTAMPTZ NOT NULL DEFAULT now(), lock_token TEXT, locked_until BIGINT,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(), attempt_count INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE {q}.worker_queue (
             id BIGSERIAL PRIMARY KEY, work_item TEXT NOT NULL,
             visible_at TIMESTAMPTZ NOT NULL DEFAULT now(), lock_token TEXT, locked_until BIGINT,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(), attempt_count INTEGER NOT NULL DEFAULT 0,
             instance_id TEXT, execution_id BIGINT, activity_id BIGINT, session_id TEXT, tag TEXT);
         CREATE TABLE {q}.instance_locks (
             instance_id TEXT PRIMARY KEY, lock_token TEXT NOT NULL UNIQUE,
             locked_until BIGINT NOT NULL, locked_at BIGINT NOT NULL);
         CREATE TABLE {q}.sessions (
             session_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL,
             locked_until BIGINT NOT NULL, last_activity_at BIGINT NOT NULL);
         CREATE TABLE {q}.kv_store (
             instance_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
             execution_id BIGINT NOT NULL, last_updated_at_ms BIGINT NOT NULL DEFAULT 0,
             PRIMARY KEY (instance_id, key));
         CREATE TABLE {q}.kv_delta (
             instance_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT,
             last_updated_at_ms BIGINT NOT NULL, PRIMARY KEY (instance_id, key));"
    ))
    .execute(&mut *conn)
    .await
    .unwrap_or_else(|e| panic!("create the duroxide-pg skeleton in {schema}: {e}"));
    for (version, name) in MIGRATIONS_0_1_38.iter().filter(|(v, _)| *v <= up_to) {
        sqlx::query(&format!(
            "INSERT INTO {q}._duroxide_migrations (version, name) VALUES ($1, $2)"
        ))
        .bind(version)
        .bind(name)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("ledger row {version}: {e}"));
    }
}
