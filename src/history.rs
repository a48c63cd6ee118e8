//! History reads and the test/tooling append. Reads never return a partial history: one
//! undecodable row fails the whole read.

use duroxide::Event;
use duroxide::providers::ProviderError;

use crate::codec::{decode_history, encode_event, to_i64};
use crate::errors::{db_error, decode_error};
use crate::provider::PostgresProvider;

/// Latest execution: the highest recorded in `executions` (1 for an unknown instance).
const READ_LATEST: &str = "\
SELECT h.event_data FROM {s}.history h
WHERE h.instance_id = $1
  AND h.execution_id = (SELECT coalesce(max(e.execution_id), 1) FROM {s}.executions e WHERE e.instance_id = $1)
ORDER BY h.event_id";

const READ_EXECUTION: &str = "SELECT o_event_data FROM {s}.read_execution_history($1, $2)";

/// Inserts the events as given; a duplicate id fails the statement and nothing is kept.
const APPEND: &str = "\
WITH clock AS MATERIALIZED (SELECT {s}.now_ms() AS now),
execution AS (
    INSERT INTO {s}.executions (instance_id, execution_id, status, started_at_ms)
    SELECT $1::TEXT, $2::BIGINT, 'Running', clock.now FROM clock
    ON CONFLICT (instance_id, execution_id) DO NOTHING
)
INSERT INTO {s}.history (instance_id, execution_id, event_id, event_type, event_data, created_at_ms)
SELECT $1::TEXT, $2::BIGINT, e.event_id, e.event_type, e.event_data, clock.now
FROM clock, unnest($3::BIGINT[], $4::TEXT[], $5::TEXT[]) AS e(event_id, event_type, event_data)";

impl PostgresProvider {
    pub(crate) async fn read_latest_history(
        &self,
        instance: &str,
    ) -> Result<Vec<Event>, ProviderError> {
        const OP: &str = "read";
        let rows: Vec<String> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(READ_LATEST)).bind(instance)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        let rows = if rows.is_empty() {
            self.old_history(OP, instance, None).await?
        } else {
            rows
        };
        decode_history(&rows).map_err(|m| decode_error(OP, Some(instance), m))
    }

    pub(crate) async fn read_execution_history(
        &self,
        operation: &str,
        instance: &str,
        execution_id: u64,
    ) -> Result<Vec<Event>, ProviderError> {
        let exec = to_i64("execution_id", execution_id)
            .map_err(|m| decode_error(operation, Some(instance), m))?;
        let rows: Vec<String> = on_conn!(
            idempotent: self,
            fetch_all,
            sqlx::query_scalar(&self.sql(READ_EXECUTION))
                .bind(instance)
                .bind(exec)
        )
        .map_err(|e| db_error(operation, Some(instance), e))?;
        let rows = if rows.is_empty() {
            self.old_history(operation, instance, Some(exec)).await?
        } else {
            rows
        };
        decode_history(&rows).map_err(|m| decode_error(operation, Some(instance), m))
    }

    pub(crate) async fn append_history(
        &self,
        instance: &str,
        execution_id: u64,
        events: Vec<Event>,
    ) -> Result<(), ProviderError> {
        const OP: &str = "append_with_execution";
        let bad = |m: String| decode_error(OP, Some(instance), m);
        let exec = to_i64("execution_id", execution_id).map_err(bad)?;
        let (mut ids, mut types, mut data) = (Vec::new(), Vec::new(), Vec::new());
        for e in &events {
            let enc = encode_event(e).map_err(bad)?;
            ids.push(enc.event_id);
            types.push(enc.event_type);
            data.push(enc.json);
        }
        on_conn!(
            self,
            execute,
            sqlx::query(&self.sql(APPEND))
                .bind(instance)
                .bind(exec)
                .bind(&ids)
                .bind(&types)
                .bind(&data)
        )
        .map_err(|e| db_error(OP, Some(instance), e))?;
        Ok(())
    }
}
