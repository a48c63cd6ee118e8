-- Core tables of duroxide-pg-hybrid.
--
-- Every object is created in the provider's own schema: the migrator runs this file with
-- `search_path` set to that schema, and every function captures it (`SET search_path FROM
-- CURRENT`), so nothing here names a schema.
--
-- Conventions:
--   * times are BIGINT milliseconds since the Unix epoch (`*_ms` columns);
--   * leases and visibility are judged by the DATABASE clock (`now_ms()`), never by a
--     worker's clock, so a worker whose clock runs ahead cannot steal a live lease;
--   * events and work items are stored as TEXT exactly as serde_json serialized them
--     (no JSONB re-encoding, so bytes and key order round-trip, and a corrupt row can
--     still be read and reported instead of failing the whole query).

-- The one clock every lease and visibility decision uses. Floor, not round, so a
-- timestamp is never ahead of a wall clock read at the same instant.
CREATE FUNCTION now_ms() RETURNS BIGINT
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$ SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

-- LISTEN/NOTIFY channel of one queue ('orchestrator' or 'worker') of this schema.
-- Scoped to the schema, and hashed so it always fits PostgreSQL's 63-byte limit.
CREATE FUNCTION notify_channel(p_queue TEXT) RETURNS TEXT
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$ SELECT 'duroxide_' || left(p_queue, 4) || '_' || left(md5(current_schema()), 16) $$;

-- Wakes long-polling fetchers: called by the statements that make work visible now
-- (never by a per-row trigger). The payload is how many items became visible, so the
-- listener wakes that many waiters rather than all of them. PostgreSQL delivers at
-- commit and folds identical notifications of one transaction.
CREATE FUNCTION notify_work_available(p_queue TEXT, p_count BIGINT) RETURNS VOID
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$ SELECT pg_notify(notify_channel(p_queue), p_count::TEXT) WHERE p_count > 0 $$;

-- Advisory-lock key space of per-instance claims: (instance_lock_space(), hashtext(id)).
-- Scoped to the schema so tenants sharing a database never contend on equal instance ids.
-- Taken by the claim (try, skip on conflict) and by deletes (wait).
CREATE FUNCTION instance_lock_space() RETURNS INT
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$ SELECT hashtext('duroxide-pg-hybrid:' || current_schema()) $$;

CREATE TABLE instances (
    instance_id            TEXT PRIMARY KEY,
    orchestration_name     TEXT NOT NULL,
    orchestration_version  TEXT,
    current_execution_id   BIGINT NOT NULL DEFAULT 1 CHECK (current_execution_id >= 0),
    -- Fixed when the row is created; drives cascading deletes. No FK: a child may be
    -- acked before its parent row exists.
    parent_instance_id     TEXT,
    custom_status          TEXT,
    custom_status_version  BIGINT NOT NULL DEFAULT 0 CHECK (custom_status_version >= 0),
    created_at_ms          BIGINT NOT NULL,
    updated_at_ms          BIGINT NOT NULL
);
CREATE INDEX instances_parent_idx ON instances (parent_instance_id)
    WHERE parent_instance_id IS NOT NULL;
CREATE INDEX instances_created_idx ON instances (created_at_ms DESC);

-- Executions and history may exist without an `instances` row (acks with empty
-- metadata), so neither has a foreign key to it.
CREATE TABLE executions (
    instance_id      TEXT NOT NULL,
    execution_id     BIGINT NOT NULL CHECK (execution_id >= 0),
    status           TEXT NOT NULL DEFAULT 'Running',
    output           TEXT,
    -- duroxide version pinned by the execution's OrchestrationStarted; NULL = any.
    pinned_major     INT,
    pinned_minor     INT,
    pinned_patch     INT,
    started_at_ms    BIGINT NOT NULL,
    completed_at_ms  BIGINT,
    PRIMARY KEY (instance_id, execution_id)
);

CREATE TABLE history (
    instance_id    TEXT NOT NULL,
    execution_id   BIGINT NOT NULL,
    event_id       BIGINT NOT NULL CHECK (event_id > 0),
    event_type     TEXT NOT NULL,
    event_data     TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (instance_id, execution_id, event_id)
);

CREATE TABLE orchestrator_queue (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Routing instance (the parent for SubOrchCompleted/SubOrchFailed).
    instance_id    TEXT NOT NULL,
    -- WorkItem variant name, written by the provider; lets the claim decide whether an
    -- instance without metadata is runnable without parsing JSON.
    kind           TEXT NOT NULL,
    work_item      TEXT NOT NULL,
    visible_at_ms  BIGINT NOT NULL,
    -- Batch tag of the fetch that claimed the row; only tagged rows are acked.
    lock_token     TEXT,
    attempt_count  INT NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    created_at_ms  BIGINT NOT NULL
);
-- Claim order is (visible_at, id): future timers sort after everything runnable, so the
-- candidate scan never walks them, whatever plan (custom or generic) is chosen. Only
-- untagged rows are candidates; rows of a turn in progress stay out of the index.
CREATE INDEX orchestrator_queue_ready_idx ON orchestrator_queue (visible_at_ms, id) INCLUDE (instance_id)
    WHERE lock_token IS NULL;
-- Earliest future visible_at = when an idle long-poller must look again.
CREATE INDEX orchestrator_queue_visible_idx ON orchestrator_queue (visible_at_ms);
CREATE INDEX orchestrator_queue_instance_idx ON orchestrator_queue (instance_id, id);
CREATE INDEX orchestrator_queue_lock_idx ON orchestrator_queue (lock_token)
    WHERE lock_token IS NOT NULL;

-- One row per locked instance: the only exclusion mechanism for orchestration turns.
CREATE TABLE instance_locks (
    instance_id      TEXT PRIMARY KEY,
    lock_token       TEXT NOT NULL UNIQUE,
    locked_until_ms  BIGINT NOT NULL,
    locked_at_ms     BIGINT NOT NULL
);
-- Earliest lease expiry = when an idle long-poller must look again.
CREATE INDEX instance_locks_until_idx ON instance_locks (locked_until_ms);

CREATE TABLE worker_queue (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_item        TEXT NOT NULL,
    -- Identity of the scheduled activity (for cancellation and instance deletion).
    instance_id      TEXT NOT NULL,
    execution_id     BIGINT NOT NULL,
    activity_id      BIGINT NOT NULL,
    session_id       TEXT,
    tag              TEXT,
    visible_at_ms    BIGINT NOT NULL,
    lock_token       TEXT,
    locked_until_ms  BIGINT,
    attempt_count    INT NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    created_at_ms    BIGINT NOT NULL,
    CHECK ((lock_token IS NULL) = (locked_until_ms IS NULL))
);
-- FIFO by (visible_at, id); delayed rows sort last (see orchestrator_queue_ready_idx).
CREATE INDEX worker_queue_ready_idx ON worker_queue (visible_at_ms, id);
CREATE INDEX worker_queue_activity_idx ON worker_queue (instance_id, execution_id, activity_id);
CREATE INDEX worker_queue_session_idx ON worker_queue (session_id) WHERE session_id IS NOT NULL;
CREATE UNIQUE INDEX worker_queue_lock_idx ON worker_queue (lock_token) WHERE lock_token IS NOT NULL;
CREATE INDEX worker_queue_lease_idx ON worker_queue (locked_until_ms) WHERE lock_token IS NOT NULL;

CREATE TABLE sessions (
    session_id           TEXT PRIMARY KEY,
    worker_id            TEXT NOT NULL,
    locked_until_ms      BIGINT NOT NULL,
    last_activity_at_ms  BIGINT NOT NULL
);
CREATE INDEX sessions_worker_idx ON sessions (worker_id);
CREATE INDEX sessions_until_idx ON sessions (locked_until_ms);

-- KV state of finished executions (merged on Completed / ContinuedAsNew / Failed).
CREATE TABLE kv_store (
    instance_id         TEXT NOT NULL,
    key                 TEXT NOT NULL,
    value               TEXT NOT NULL,
    last_updated_at_ms  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, key)
);

-- KV mutations of the current execution; value NULL is a tombstone.
CREATE TABLE kv_delta (
    instance_id         TEXT NOT NULL,
    key                 TEXT NOT NULL,
    value               TEXT,
    last_updated_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (instance_id, key)
);
