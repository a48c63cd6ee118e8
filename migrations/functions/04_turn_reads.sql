-- revision: 1
-- The four reads of an orchestration fetch, defined ONCE and used by both fetch paths:
-- the hybrid path calls them from Rust concurrently on separate connections, the
-- full-procedure path calls them inside fetch_orchestration_full. Payloads come back as
-- TEXT exactly as stored; decoding (and history_error) happens in Rust.

-- The batch a claim tagged, in queue order.
CREATE OR REPLACE FUNCTION read_batch_messages(p_lock_token TEXT)
RETURNS TABLE (o_work_item TEXT)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $fn$
    SELECT q.work_item FROM orchestrator_queue q
    WHERE q.lock_token = p_lock_token
    ORDER BY q.id
$fn$;

-- Instance metadata (no row: the fetch falls back to history or the start message).
CREATE OR REPLACE FUNCTION read_instance_meta(p_instance_id TEXT)
RETURNS TABLE (o_orchestration_name TEXT, o_orchestration_version TEXT)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $fn$
    SELECT i.orchestration_name, i.orchestration_version FROM instances i
    WHERE i.instance_id = p_instance_id
$fn$;

-- One execution's history, in event order.
CREATE OR REPLACE FUNCTION read_execution_history(p_instance_id TEXT, p_execution_id BIGINT)
RETURNS TABLE (o_event_data TEXT)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $fn$
    SELECT h.event_data FROM history h
    WHERE h.instance_id = p_instance_id AND h.execution_id = p_execution_id
    ORDER BY h.event_id
$fn$;

-- KV snapshot for a turn: kv_store only (values of finished executions). The current
-- execution's kv_delta is rebuilt by replay, so it is deliberately not read here.
CREATE OR REPLACE FUNCTION read_kv_snapshot(p_instance_id TEXT)
RETURNS TABLE (o_key TEXT, o_value TEXT, o_last_updated_at_ms BIGINT)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $fn$
    SELECT k.key, k.value, k.last_updated_at_ms FROM kv_store k
    WHERE k.instance_id = p_instance_id
$fn$;

-- Full-procedure path: claim (the same sp_fetch_and_lock) plus the four reads in ONE
-- round trip. One row with OUT columns of TEXT arrays was chosen over one JSONB value:
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
AS $fn$
DECLARE
    v_claim RECORD;
BEGIN
    SELECT c.o_instance_id, c.o_lock_token, c.o_execution_id, c.o_attempt_count,
           c.o_now_ms, c.o_next_wake_ms, c.o_skipped
    INTO v_claim
    FROM sp_fetch_and_lock(p_lock_timeout_ms, p_filter_enabled,
                           p_min_major, p_min_minor, p_min_patch,
                           p_max_major, p_max_minor, p_max_patch,
                           p_max_candidates) c;

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

    SELECT m.o_orchestration_name, m.o_orchestration_version
    INTO o_orchestration_name, o_orchestration_version
    FROM read_instance_meta(o_instance_id) m;
    o_has_instance := FOUND;

    SELECT coalesce(array_agg(b.item ORDER BY b.n), '{}') INTO o_messages
    FROM read_batch_messages(o_lock_token) WITH ORDINALITY b(item, n);

    SELECT coalesce(array_agg(h.event ORDER BY h.n), '{}') INTO o_history
    FROM read_execution_history(o_instance_id, o_execution_id) WITH ORDINALITY h(event, n);

    SELECT coalesce(array_agg(k.o_key), '{}'), coalesce(array_agg(k.o_value), '{}'),
           coalesce(array_agg(k.o_last_updated_at_ms), '{}')
    INTO o_kv_keys, o_kv_values, o_kv_updated_ms
    FROM read_kv_snapshot(o_instance_id) k;

    RETURN NEXT;
END;
$fn$;
