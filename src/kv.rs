//! Client-facing reads of per-instance state: KV values (current execution's delta over
//! the store of finished ones, tombstones honoured), custom status, and stats.

use std::collections::HashMap;

use duroxide::providers::ProviderError;
use duroxide::{EventKind, SystemStats};

use crate::errors::db_error;
use crate::provider::PostgresProvider;

/// The merged view: a delta row wins (NULL value = deleted), else the store.
const KV_MERGED: &str = "\
SELECT coalesce(d.key, s.key) AS key, CASE WHEN d.key IS NOT NULL THEN d.value ELSE s.value END AS value
FROM (SELECT key, value FROM {s}.kv_store WHERE instance_id = $1) s
FULL JOIN (SELECT key, value FROM {s}.kv_delta WHERE instance_id = $1) d ON d.key = s.key";

const KV_ONE: &str = "\
SELECT CASE WHEN d.instance_id IS NOT NULL THEN d.value ELSE s.value END
FROM (SELECT 1) one
LEFT JOIN {s}.kv_delta d ON d.instance_id = $1 AND d.key = $2
LEFT JOIN {s}.kv_store s ON s.instance_id = $1 AND s.key = $2";

const CUSTOM_STATUS: &str = "\
SELECT i.custom_status, i.custom_status_version FROM {s}.instances i
WHERE i.instance_id = $1 AND i.custom_status_version > $2";

const STATS: &str = "\
SELECT
    (SELECT count(*) FROM {s}.history h WHERE h.instance_id = i.instance_id AND h.execution_id = i.current_execution_id) AS events,
    (SELECT coalesce(sum(octet_length(h.event_data)), 0)::BIGINT FROM {s}.history h
      WHERE h.instance_id = i.instance_id AND h.execution_id = i.current_execution_id) AS history_bytes,
    (SELECT h.event_data FROM {s}.history h
      WHERE h.instance_id = i.instance_id AND h.execution_id = i.current_execution_id AND h.event_id = 1) AS first_event,
    kv.keys, kv.bytes
FROM {s}.instances i,
LATERAL (
    SELECT count(*) AS keys, coalesce(sum(octet_length(m.value)), 0)::BIGINT AS bytes
    FROM (
        SELECT CASE WHEN d.key IS NOT NULL THEN d.value ELSE s.value END AS value
        FROM (SELECT key, value FROM {s}.kv_store WHERE instance_id = i.instance_id) s
        FULL JOIN (SELECT key, value FROM {s}.kv_delta WHERE instance_id = i.instance_id) d ON d.key = s.key
    ) m
    WHERE m.value IS NOT NULL
) kv
WHERE i.instance_id = $1";

#[derive(sqlx::FromRow)]
struct StatsRow {
    events: i64,
    history_bytes: i64,
    first_event: Option<String>,
    keys: i64,
    bytes: i64,
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PostgresProvider {
    pub(crate) async fn kv_value(
        &self,
        instance: &str,
        key: &str,
    ) -> Result<Option<String>, ProviderError> {
        let v: Option<Option<String>> = on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_scalar(&self.sql(KV_ONE))
                .bind(instance)
                .bind(key)
        )
        .map_err(|e| db_error("get_kv_value", Some(instance), e))?;
        match v.flatten() {
            Some(v) => Ok(Some(v)),
            // The instance may still live in an adopted duroxide-pg schema.
            None => self.old_kv_value(instance, key).await,
        }
    }

    pub(crate) async fn kv_all(
        &self,
        instance: &str,
    ) -> Result<HashMap<String, String>, ProviderError> {
        let rows: Vec<(String, Option<String>)> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_as(&self.sql(KV_MERGED)).bind(instance)
        )
        .map_err(|e| db_error("get_kv_all_values", Some(instance), e))?;
        if rows.is_empty() {
            return Ok(self.old_kv_all(instance).await?.into_iter().collect());
        }
        Ok(rows
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    pub(crate) async fn custom_status(
        &self,
        instance: &str,
        last_seen_version: u64,
    ) -> Result<Option<(Option<String>, u64)>, ProviderError> {
        let row: Option<(Option<String>, i64)> = on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_as(&self.sql(CUSTOM_STATUS))
                .bind(instance)
                .bind(i64::try_from(last_seen_version).unwrap_or(i64::MAX))
        )
        .map_err(|e| db_error("get_custom_status", Some(instance), e))?;
        let row = match row {
            Some(row) => Some(row),
            None => {
                self.old_custom_status(
                    instance,
                    i64::try_from(last_seen_version).unwrap_or(i64::MAX),
                )
                .await?
            }
        };
        Ok(row.map(|(s, v)| (s, u(v))))
    }

    pub(crate) async fn instance_stats(
        &self,
        instance: &str,
    ) -> Result<Option<SystemStats>, ProviderError> {
        let row: Option<StatsRow> = on_conn!(
            idempotent: self,
            fetch_optional,
            sqlx::query_as(&self.sql(STATS)).bind(instance)
        )
        .map_err(|e| db_error("get_instance_stats", Some(instance), e))?;
        Ok(row.map(|r| {
            let carried = r
                .first_event
                .and_then(|json| serde_json::from_str::<duroxide::Event>(&json).ok())
                .map(|e| match e.kind {
                    EventKind::OrchestrationStarted {
                        carry_forward_events,
                        ..
                    } => carry_forward_events.map(|v| v.len()).unwrap_or(0),
                    _ => 0,
                })
                .unwrap_or(0);
            SystemStats {
                history_event_count: u(r.events),
                history_size_bytes: u(r.history_bytes),
                queue_pending_count: carried as u64,
                kv_user_key_count: u(r.keys),
                kv_total_value_bytes: u(r.bytes),
            }
        }))
    }
}
