-- revision: 6
-- The four reads of an orchestration fetch, defined ONCE and used by both fetch paths:
-- the hybrid path calls them from Rust concurrently on separate connections, the
-- full-procedure path calls them inside fetch_orchestration_turn (this release) or
-- fetch_orchestration_full (kept for the previous release). The history read of a turn is
-- read_history_since (only events the caller's history cache lacks); read_execution_history
-- serves management reads and the previous release; read_latest_history_since serves
-- read(instance) when the history cache holds a long history of the instance. Payloads
-- come back as TEXT exactly as stored; decoding (and history_error) happens in Rust.

-- The batch a claim tagged, in queue order.
CREATE OR REPLACE FUNCTION read_batch_messages(p_lock_token TEXT)
RETURNS TABLE (o_work_item TEXT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    SELECT q.work_item FROM orchestrator_queue q
    WHERE q.lock_token = p_lock_token
    ORDER BY q.id;
END;
$fn$;

-- Instance metadata (no row: the fetch falls back to history or the start message).
CREATE OR REPLACE FUNCTION read_instance_meta(p_instance_id TEXT)
RETURNS TABLE (o_orchestration_name TEXT, o_orchestration_version TEXT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    SELECT i.orchestration_name, i.orchestration_version FROM instances i
    WHERE i.instance_id = p_instance_id;
END;
$fn$;

-- One execution's history, in event order.
CREATE OR REPLACE FUNCTION read_execution_history(p_instance_id TEXT, p_execution_id BIGINT)
RETURNS TABLE (o_event_data TEXT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    SELECT h.event_data FROM history h
    WHERE h.instance_id = p_instance_id AND h.execution_id = p_execution_id
    ORDER BY h.event_id;
END;
$fn$;

-- Incremental history (the provider's history cache). A process that ran an instance
-- keeps its decoded history and, on the next turn of the same execution, asks only for
-- the events after the last one it has. What it has is named by that event's id and its
-- guard: a hash of the row's stored text seeded with the row's creation time (database
-- clock). History rows are append-only within an execution and are only ever deleted
-- with the whole execution, so "row k exists with the same guard" means the rows the
-- caller holds are still the rows stored: an instance deleted and re-created under the
-- same id has different rows (different text or creation time) or no row k at all.
-- Turns another process ran meanwhile wrote rows after k, which the read returns.
CREATE OR REPLACE FUNCTION history_row_guard(p_created_at_ms BIGINT, p_event_data TEXT)
RETURNS BIGINT
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$
    SELECT hashtextextended(p_event_data, p_created_at_ms)
$fn$;

-- The events of one execution after p_after_event_id when row p_after_event_id still
-- carries p_guard and the events after it follow on without a gap; otherwise (no cache
-- entry: p_after_event_id 0 or NULL, guard mismatch, missing row, gap) the whole
-- execution, in the same call. o_incremental says which one the caller got;
-- o_last_event_id/o_last_guard name the last event of the execution for the next call
-- (NULL for an empty history).
CREATE OR REPLACE FUNCTION read_history_since(
    p_instance_id     TEXT,
    p_execution_id    BIGINT,
    p_after_event_id  BIGINT,
    p_guard           BIGINT
)
RETURNS TABLE (
    o_incremental    BOOLEAN,
    o_events         TEXT[],
    o_last_event_id  BIGINT,
    o_last_guard     BIGINT
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_first BIGINT;
    v_count BIGINT;
BEGIN
    o_incremental := coalesce(p_after_event_id, 0) > 0 AND p_guard IS NOT NULL AND EXISTS (
        SELECT 1 FROM history h
        WHERE h.instance_id = p_instance_id AND h.execution_id = p_execution_id
          AND h.event_id = p_after_event_id
          AND history_row_guard(h.created_at_ms, h.event_data) = p_guard);
    LOOP
        SELECT coalesce(array_agg(h.event_data ORDER BY h.event_id), '{}'),
               min(h.event_id), max(h.event_id), count(*)
        INTO o_events, v_first, o_last_event_id, v_count
        FROM history h
        WHERE h.instance_id = p_instance_id AND h.execution_id = p_execution_id
          AND h.event_id > CASE WHEN o_incremental THEN p_after_event_id ELSE 0 END;
        EXIT WHEN NOT o_incremental OR v_count = 0
            OR (v_first = p_after_event_id + 1 AND o_last_event_id - p_after_event_id = v_count);
        -- A gap after the cached events: not what an append-only history looks like, so
        -- the cache is not trusted; read everything.
        o_incremental := FALSE;
    END LOOP;
    IF o_incremental AND v_count = 0 THEN
        o_last_event_id := p_after_event_id;
        o_last_guard := p_guard;
    ELSIF o_last_event_id IS NOT NULL THEN
        SELECT history_row_guard(h.created_at_ms, h.event_data) INTO o_last_guard
        FROM history h
        WHERE h.instance_id = p_instance_id AND h.execution_id = p_execution_id
          AND h.event_id = o_last_event_id;
    END IF;
    RETURN NEXT;
END;
$fn$;

-- read(instance) (duroxide's status polls, and its worker before every activity): the
-- latest execution's history, the execution read_latest in src/history.rs picks (the
-- highest recorded, 1 for an unknown instance), incrementally when the caller's history
-- cache holds the start of that execution (p_execution_id, p_after_event_id, p_guard as
-- for read_history_since; an entry of another execution is read in full). STABLE: both
-- steps see one snapshot, so the execution and its events agree.
CREATE OR REPLACE FUNCTION read_latest_history_since(
    p_instance_id     TEXT,
    p_execution_id    BIGINT,
    p_after_event_id  BIGINT,
    p_guard           BIGINT
)
RETURNS TABLE (
    o_execution_id   BIGINT,
    o_incremental    BOOLEAN,
    o_events         TEXT[],
    o_last_event_id  BIGINT,
    o_last_guard     BIGINT
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    o_execution_id := (SELECT coalesce(max(e.execution_id), 1) FROM executions e
                       WHERE e.instance_id = p_instance_id);
    SELECT r.o_incremental, r.o_events, r.o_last_event_id, r.o_last_guard
    INTO o_incremental, o_events, o_last_event_id, o_last_guard
    FROM read_history_since(
        p_instance_id, o_execution_id,
        CASE WHEN p_execution_id = o_execution_id THEN p_after_event_id END,
        CASE WHEN p_execution_id = o_execution_id THEN p_guard END) r;
    RETURN NEXT;
END;
$fn$;

-- KV snapshot for a turn: kv_store only (values of finished executions). The current
-- execution's kv_delta is rebuilt by replay, so it is deliberately not read here.
CREATE OR REPLACE FUNCTION read_kv_snapshot(p_instance_id TEXT)
RETURNS TABLE (o_key TEXT, o_value TEXT, o_last_updated_at_ms BIGINT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    SELECT k.key, k.value, k.last_updated_at_ms FROM kv_store k
    WHERE k.instance_id = p_instance_id;
END;
$fn$;

-- Everything a claimed turn needs, read in the claiming call (the procedure path's
-- fetch_orchestration_turn, and a worker ack that hands the instance's next turn to a
-- waiting fetch, 09_handover.sql): the same four reads the hybrid path issues from Rust.
-- p_after_event_id / p_guard: the caller's history cache entry of this execution (NULL =
-- none; read_history_since then returns the whole execution). p_messages: the batch the
-- claim returned (claim_instance tags and returns it; NULL = read it by p_lock_token).
-- Revision 6 added it; the signature without it is dropped (its callers are in this file
-- and 09_handover.sql).
DROP FUNCTION IF EXISTS read_claimed_turn(TEXT, TEXT, BIGINT, BIGINT, BIGINT);
CREATE OR REPLACE FUNCTION read_claimed_turn(
    p_instance_id     TEXT,
    p_lock_token      TEXT,
    p_execution_id    BIGINT,
    p_after_event_id  BIGINT,
    p_guard           BIGINT,
    p_messages        TEXT[] DEFAULT NULL,
    OUT o_has_instance            BOOLEAN,
    OUT o_orchestration_name      TEXT,
    OUT o_orchestration_version   TEXT,
    OUT o_messages                TEXT[],
    OUT o_history_incremental     BOOLEAN,
    OUT o_history                 TEXT[],
    OUT o_history_last_event_id   BIGINT,
    OUT o_history_last_guard      BIGINT,
    OUT o_kv_keys                 TEXT[],
    OUT o_kv_values               TEXT[],
    OUT o_kv_updated_ms           BIGINT[]
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    SELECT m.o_orchestration_name, m.o_orchestration_version
    INTO o_orchestration_name, o_orchestration_version
    FROM read_instance_meta(p_instance_id) m;
    o_has_instance := FOUND;

    IF p_messages IS NOT NULL THEN
        o_messages := p_messages;
    ELSE
        SELECT coalesce(array_agg(b.item ORDER BY b.n), '{}') INTO o_messages
        FROM read_batch_messages(p_lock_token) WITH ORDINALITY b(item, n);
    END IF;

    SELECT r.o_incremental, r.o_events, r.o_last_event_id, r.o_last_guard
    INTO o_history_incremental, o_history, o_history_last_event_id, o_history_last_guard
    FROM read_history_since(p_instance_id, p_execution_id, p_after_event_id, p_guard) r;

    SELECT coalesce(array_agg(k.o_key), '{}'), coalesce(array_agg(k.o_value), '{}'),
           coalesce(array_agg(k.o_last_updated_at_ms), '{}')
    INTO o_kv_keys, o_kv_values, o_kv_updated_ms
    FROM read_kv_snapshot(p_instance_id) k;
END;
$fn$;

-- Full-procedure path as releases before the history cache call it: claim (the same
-- sp_fetch_and_lock) plus the four reads in ONE round trip. One row with OUT columns of TEXT arrays was chosen over one JSONB value:
-- arrays of TEXT keep each payload byte-for-byte (no TEXT->JSONB parse and re-encode on
-- the server, no JSON-in-JSON unescaping on the client), and a corrupt history row
-- still arrives, so the caller can report history_error instead of the whole call
-- failing on a cast.
CREATE OR REPLACE FUNCTION fetch_orchestration_full(
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_max_candidates   INT DEFAULT 64
)
RETURNS TABLE (
    o_instance_id            TEXT,
    o_lock_token             TEXT,
    o_execution_id           BIGINT,
    o_attempt_count          INT,
    o_now_ms                 BIGINT,
    o_next_wake_ms           BIGINT,
    o_skipped                INT,
    o_has_instance           BOOLEAN,
    o_orchestration_name     TEXT,
    o_orchestration_version  TEXT,
    o_messages               TEXT[],
    o_history                TEXT[],
    o_kv_keys                TEXT[],
    o_kv_values              TEXT[],
    o_kv_updated_ms          BIGINT[]
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    -- The same turn as fetch_orchestration_turn with no cache entries (the whole history).
    RETURN QUERY
    SELECT t.o_instance_id, t.o_lock_token, t.o_execution_id, t.o_attempt_count,
           t.o_now_ms, t.o_next_wake_ms, t.o_skipped, t.o_has_instance,
           t.o_orchestration_name, t.o_orchestration_version, t.o_messages, t.o_history,
           t.o_kv_keys, t.o_kv_values, t.o_kv_updated_ms
    FROM fetch_orchestration_turn(p_lock_timeout_ms, p_filter_enabled,
                                  p_min_major, p_min_minor, p_min_patch,
                                  p_max_major, p_max_minor, p_max_patch,
                                  '{}', '{}', '{}', '{}', p_max_candidates) t;
END;
$fn$;

-- Full-procedure path with the history cache: fetch_orchestration_full plus what the
-- caller already holds. The caller cannot know which instance the claim will pick, so it
-- passes its cache entries as parallel arrays (instance, execution, last event id,
-- guard); when the claimed instance's current execution is among them, its history is
-- read with read_history_since (only the new events, or everything if the guard fails).
-- fetch_orchestration_full stays as it was for releases that call it. p_lock_token and
-- p_resend are sp_fetch_and_lock's (a resend after a lost reply returns the claim its
-- first attempt made, with the turn read again); revision 5 added them and dropped the
-- signature without them.
DROP FUNCTION IF EXISTS fetch_orchestration_turn(BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT,
    TEXT[], BIGINT[], BIGINT[], BIGINT[], INT);
CREATE OR REPLACE FUNCTION fetch_orchestration_turn(
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_history_instance_ids    TEXT[],
    p_history_execution_ids   BIGINT[],
    p_history_after_event_ids BIGINT[],
    p_history_guards          BIGINT[],
    p_max_candidates   INT DEFAULT 64,
    p_lock_token       TEXT DEFAULT NULL,
    p_resend           BOOLEAN DEFAULT FALSE
)
RETURNS TABLE (
    o_instance_id            TEXT,
    o_lock_token             TEXT,
    o_execution_id           BIGINT,
    o_attempt_count          INT,
    o_now_ms                 BIGINT,
    o_next_wake_ms           BIGINT,
    o_skipped                INT,
    o_has_instance           BOOLEAN,
    o_orchestration_name     TEXT,
    o_orchestration_version  TEXT,
    o_messages               TEXT[],
    o_history_incremental    BOOLEAN,
    o_history                TEXT[],
    o_history_last_event_id  BIGINT,
    o_history_last_guard     BIGINT,
    o_kv_keys                TEXT[],
    o_kv_values              TEXT[],
    o_kv_updated_ms          BIGINT[]
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_claim RECORD;
    v_at    INT;
    v_after BIGINT;
    v_guard BIGINT;
BEGIN
    SELECT c.o_instance_id, c.o_lock_token, c.o_execution_id, c.o_attempt_count,
           c.o_now_ms, c.o_next_wake_ms, c.o_skipped, c.o_messages
    INTO v_claim
    FROM sp_fetch_and_lock(p_lock_timeout_ms, p_filter_enabled,
                           p_min_major, p_min_minor, p_min_patch,
                           p_max_major, p_max_minor, p_max_patch,
                           p_max_candidates, p_lock_token, p_resend) c;

    o_instance_id := v_claim.o_instance_id;
    o_lock_token := v_claim.o_lock_token;
    o_execution_id := v_claim.o_execution_id;
    o_attempt_count := v_claim.o_attempt_count;
    o_now_ms := v_claim.o_now_ms;
    o_next_wake_ms := v_claim.o_next_wake_ms;
    o_skipped := v_claim.o_skipped;
    IF o_instance_id IS NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- The caller's entry for this instance, if it holds its current execution.
    SELECT c.n INTO v_at
    FROM unnest(p_history_instance_ids, p_history_execution_ids) WITH ORDINALITY c(i, e, n)
    WHERE c.i = o_instance_id AND c.e = o_execution_id
    LIMIT 1;
    IF v_at IS NOT NULL THEN
        v_after := p_history_after_event_ids[v_at];
        v_guard := p_history_guards[v_at];
    END IF;
    SELECT r.o_has_instance, r.o_orchestration_name, r.o_orchestration_version, r.o_messages,
           r.o_history_incremental, r.o_history, r.o_history_last_event_id,
           r.o_history_last_guard, r.o_kv_keys, r.o_kv_values, r.o_kv_updated_ms
    INTO o_has_instance, o_orchestration_name, o_orchestration_version, o_messages,
         o_history_incremental, o_history, o_history_last_event_id, o_history_last_guard,
         o_kv_keys, o_kv_values, o_kv_updated_ms
    FROM read_claimed_turn(o_instance_id, o_lock_token, o_execution_id, v_after, v_guard,
                           v_claim.o_messages) r;

    RETURN NEXT;
END;
$fn$;
