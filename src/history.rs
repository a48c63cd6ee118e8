//! History reads and the test/tooling append. Reads never return a partial history: one
//! undecodable row fails the whole read.

use duroxide::Event;
use duroxide::providers::ProviderError;

use crate::codec::{decode_history, encode_event, to_i64};
use crate::errors::{db_error, decode_error};
use crate::history_cache::{HINT_MIN_EVENTS, Held};
use crate::provider::PostgresProvider;
use crate::sql_fn::{Args, SqlFunction};
use crate::turn::HistoryRows;

/// Latest execution: the highest recorded in `executions` (1 for an unknown instance).
const READ_LATEST: &str = "\
SELECT h.event_data FROM {s}.history h
WHERE h.instance_id = $1
  AND h.execution_id = (SELECT coalesce(max(e.execution_id), 1) FROM {s}.executions e WHERE e.instance_id = $1)
ORDER BY h.event_id";

const READ_EXECUTION: &str = "SELECT o_event_data FROM {s}.read_execution_history($1, $2)";

/// `read` of an instance whose history the history cache holds: only the events after
/// the entry's last one, when the entry is of the latest execution and still matches the
/// stored rows (migrations/functions/04_turn_reads.sql).
pub(crate) static READ_LATEST_HISTORY_SINCE: SqlFunction = SqlFunction {
    name: "read_latest_history_since",
    args: &[
        "p_instance_id",
        "p_execution_id",
        "p_after_event_id",
        "p_guard",
    ],
    columns: Some("o_execution_id, o_incremental, o_events, o_last_event_id, o_last_guard"),
};

/// Histories shorter than this are read whole by `read`: describing a short cached
/// prefix and checking its guard costs the server about as much as sending it again.
const INCREMENTAL_READ_MIN_EVENTS: usize = HINT_MIN_EVENTS;

#[derive(sqlx::FromRow)]
struct LatestSinceRow {
    o_execution_id: i64,
    o_incremental: bool,
    o_events: Vec<String>,
    o_last_event_id: Option<i64>,
    o_last_guard: Option<i64>,
}

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
        // duroxide reads the whole history on every status poll and before every
        // activity: with a long history cached here (this process ran the instance, or
        // read it before), only the events after the cached ones cross the wire. A
        // process that only reads the instance (a client polling its status) keeps an
        // entry from its second read of a long history on.
        let cache = &self.inner.history_cache;
        let held = cache
            .held_any(instance)
            .filter(|h| h.events.len() >= INCREMENTAL_READ_MIN_EVENTS);
        if held.is_some() || cache.take_wanted(instance) {
            return self.read_latest_since(OP, instance, held).await;
        }
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
        if rows.len() >= INCREMENTAL_READ_MIN_EVENTS {
            cache.want(instance);
        }
        decode_history(&rows).map_err(|m| decode_error(OP, Some(instance), m))
    }

    /// `read` with the history cache's entry `held` of `instance` (`None`: a whole read
    /// that also returns what an entry needs). The answer is what a whole read returns:
    /// the database checks the entry against the stored rows and reads everything when
    /// it does not match. The entry is brought up to date.
    async fn read_latest_since(
        &self,
        op: &str,
        instance: &str,
        held: Option<Held>,
    ) -> Result<Vec<Event>, ProviderError> {
        let cache = &self.inner.history_cache;
        let args = || {
            Args::new(&READ_LATEST_HISTORY_SINCE)
                .bind("p_instance_id", instance)
                .bind("p_execution_id", held.as_ref().map(|h| h.execution_id))
                .bind("p_after_event_id", held.as_ref().map(|h| h.last_event_id))
                .bind("p_guard", held.as_ref().map(|h| h.guard))
                .finish(op)
        };
        let row = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_as_with::<_, LatestSinceRow, _>(
                &self.call_sql(&READ_LATEST_HISTORY_SINCE),
                args()?
            )
        )
        .map_err(|e| db_error(op, Some(instance), e))?;
        if !row.o_incremental && row.o_events.is_empty() {
            // The instance is gone from this schema (deleted, or not moved over from
            // duroxide-pg yet): the plain read's answer, fallback included.
            cache.forget(instance);
            let rows = self.old_history(op, instance, None).await?;
            return decode_history(&rows).map_err(|m| decode_error(op, Some(instance), m));
        }
        let rows = HistoryRows::from_read(
            row.o_incremental,
            held.as_ref(),
            row.o_events,
            row.o_last_event_id,
            row.o_last_guard,
        )
        .map_err(|m| {
            cache.forget(instance);
            decode_error(op, Some(instance), m)
        })?;
        rows.into_history(cache, instance, row.o_execution_id, None)
            .map_err(|m| decode_error(op, Some(instance), m))
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
