-- revision: 1
-- Live adoption of a duroxide-pg 0.1.38 schema. Installed by src/adopt.rs (one
-- transaction, under the migration lock, search_path = the new schema) with {old} and
-- {new} replaced by the quoted names of the duroxide-pg schema and of this crate's schema.
-- Functions live in {new}; two triggers sit on duroxide-pg's tables. Finalize drops all of
-- it (src/adopt.rs). Everything here is CREATE OR REPLACE: re-installing is a no-op.
--
-- Where an instance lives: in {old} until adopt_instance moves it, then in {new} for good
-- (a row in adopted_instances, and a fence row in {old}.instance_locks that duroxide-pg's
-- fetch treats as a lease that never ends). Messages follow the instance:
--   * a duroxide-pg process inserting into {old}.orchestrator_queue for a moved instance
--     (client event, activity completion, sub-orchestration result) -> trigger
--     adoption_route_from_old puts it into {new}.orchestrator_queue instead;
--   * this crate inserting into {new}.orchestrator_queue for an instance that still lives
--     in {old} -> trigger adoption_route_to_old puts it into {old}.orchestrator_queue.
--
-- Locking. Key (adoption_lock_space(), hashtext(instance)), a two-int advisory key, so it
-- never meets duroxide-pg's one-key pg_advisory_xact_lock(hashtext(instance)):
--   * both routing triggers take it SHARED (writers never wait for each other);
--   * adopt_instance takes it EXCLUSIVE with a try-lock, after a try-lock on
--     duroxide-pg's own key (which every duroxide-pg lease change holds), and skips the
--     instance if either is taken or a duroxide-pg lease on it is live.
-- A mover therefore never waits, and a router waits at most for one move to commit, after
-- which it sees the instance's new home (READ COMMITTED: a fresh snapshot per statement).

CREATE OR REPLACE FUNCTION adoption_lock_space() RETURNS INT
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN hashtext('duroxide-pg-hybrid:adopt:' || current_schema());
END;
$fn$;

-- Milliseconds since the epoch of a duroxide-pg timestamp (written as to_timestamp(ms/1000.0)).
CREATE OR REPLACE FUNCTION adoption_ms(p_at TIMESTAMPTZ) RETURNS BIGINT
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$ SELECT round(extract(epoch FROM p_at) * 1000)::BIGINT $fn$;

-- The serde tag of a serialized work item (the one key of the externally tagged enum).
CREATE OR REPLACE FUNCTION adoption_item_kind(p_item TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$ SELECT min(k) FROM jsonb_object_keys(p_item::jsonb) AS k $fn$;

-- Whether an instance still lives in {old}: not moved, and duroxide-pg knows it (an
-- instance row, or messages queued, e.g. a start its client queued and no turn ran yet).
CREATE OR REPLACE FUNCTION adoption_lives_in_old(p_instance_id TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN NOT EXISTS (SELECT 1 FROM adopted_instances a WHERE a.instance_id = p_instance_id)
       AND (EXISTS (SELECT 1 FROM {old}.instances i WHERE i.instance_id = p_instance_id)
            OR EXISTS (SELECT 1 FROM {old}.orchestrator_queue q WHERE q.instance_id = p_instance_id));
END;
$fn$;

-- Tells this crate's waiting fetches about orchestrator items that arrived by a route.
CREATE OR REPLACE FUNCTION adoption_announce(p_visible_at_ms BIGINT) RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF p_visible_at_ms <= now_ms() THEN
        PERFORM notify_work_available('orchestrator', 1);
    ELSE
        PERFORM notify_delayed('orchestrator', p_visible_at_ms);
    END IF;
END;
$fn$;

-- BEFORE INSERT on {old}.orchestrator_queue.
CREATE OR REPLACE FUNCTION adoption_route_from_old() RETURNS TRIGGER
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_visible BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(adoption_lock_space(), hashtext(NEW.instance_id));
    IF NOT EXISTS (SELECT 1 FROM adopted_instances a WHERE a.instance_id = NEW.instance_id) THEN
        RETURN NEW;
    END IF;
    v_visible := adoption_ms(coalesce(NEW.visible_at, now()));
    INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
    VALUES (NEW.instance_id, adoption_item_kind(NEW.work_item), NEW.work_item, v_visible, now_ms());
    PERFORM adoption_announce(v_visible);
    RETURN NULL;
END;
$fn$;

-- BEFORE INSERT on {new}.orchestrator_queue (only while adopting).
CREATE OR REPLACE FUNCTION adoption_route_to_old() RETURNS TRIGGER
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(adoption_lock_space(), hashtext(NEW.instance_id));
    IF NOT adoption_lives_in_old(NEW.instance_id) THEN
        RETURN NEW;
    END IF;
    INSERT INTO {old}.orchestrator_queue (instance_id, work_item, visible_at, created_at)
    VALUES (NEW.instance_id, NEW.work_item, to_timestamp(NEW.visible_at_ms / 1000.0), now());
    RETURN NULL;
END;
$fn$;

-- Moves one instance out of {old}: instance row, executions (pinned versions), history,
-- KV store and delta, queued messages (timers keep their fire time), and its activities
-- no duroxide-pg worker holds (a held one completes there; the completion is routed).
-- Returns 'moved', 'busy' (a duroxide-pg process holds it: try later), 'adopted'
-- (already moved) or 'absent' (duroxide-pg has nothing of it). Never waits for a lock.
CREATE OR REPLACE FUNCTION adopt_instance(p_instance_id TEXT) RETURNS TEXT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_now        BIGINT := now_ms();
    v_lease_end  BIGINT;
    v_ready      BIGINT;
    v_next       BIGINT;
    v_tags       TEXT[];
    v_sessions   TEXT[];
BEGIN
    IF EXISTS (SELECT 1 FROM adopted_instances a WHERE a.instance_id = p_instance_id) THEN
        RETURN 'adopted';
    END IF;
    -- duroxide-pg holds this key around every change of an instance's lease (its 0026).
    IF NOT pg_try_advisory_xact_lock(hashtext(p_instance_id)) THEN
        RETURN 'busy';
    END IF;
    IF NOT pg_try_advisory_xact_lock(adoption_lock_space(), hashtext(p_instance_id)) THEN
        RETURN 'busy';
    END IF;
    -- A mover that committed between the check above and the locks.
    IF EXISTS (SELECT 1 FROM adopted_instances a WHERE a.instance_id = p_instance_id) THEN
        RETURN 'adopted';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM {old}.instances i WHERE i.instance_id = p_instance_id)
       AND NOT EXISTS (SELECT 1 FROM {old}.orchestrator_queue q WHERE q.instance_id = p_instance_id)
       AND NOT EXISTS (SELECT 1 FROM {old}.worker_queue w WHERE w.instance_id = p_instance_id) THEN
        RETURN 'absent';
    END IF;
    -- duroxide-pg leases end at the later of its caller's and the database's clock plus
    -- the timeout, so the database clock never sees a live lease as ended.
    SELECT l.locked_until INTO v_lease_end
    FROM {old}.instance_locks l WHERE l.instance_id = p_instance_id FOR UPDATE NOWAIT;
    IF FOUND AND v_lease_end > v_now THEN
        RETURN 'busy';
    END IF;

    -- First: from here on the routing triggers see the instance as living in {new}.
    INSERT INTO adopted_instances (instance_id, adopted_at_ms) VALUES (p_instance_id, v_now);

    INSERT INTO instances (instance_id, orchestration_name, orchestration_version,
                           current_execution_id, parent_instance_id, custom_status,
                           custom_status_version, created_at_ms, updated_at_ms)
    SELECT i.instance_id, i.orchestration_name, i.orchestration_version, i.current_execution_id,
           i.parent_instance_id, i.custom_status, i.custom_status_version,
           adoption_ms(i.created_at), adoption_ms(i.updated_at)
    FROM {old}.instances i WHERE i.instance_id = p_instance_id;

    INSERT INTO executions (instance_id, execution_id, status, output, pinned_major,
                            pinned_minor, pinned_patch, started_at_ms, completed_at_ms)
    SELECT e.instance_id, e.execution_id, e.status, e.output, e.duroxide_version_major,
           e.duroxide_version_minor, e.duroxide_version_patch, adoption_ms(e.started_at),
           adoption_ms(e.completed_at)
    FROM {old}.executions e WHERE e.instance_id = p_instance_id;

    INSERT INTO history (instance_id, execution_id, event_id, event_type, event_data, created_at_ms)
    SELECT h.instance_id, h.execution_id, h.event_id,
           coalesce(h.event_data::jsonb ->> 'type', h.event_type), h.event_data,
           adoption_ms(h.created_at)
    FROM {old}.history h WHERE h.instance_id = p_instance_id;

    INSERT INTO kv_store (instance_id, key, value, last_updated_at_ms)
    SELECT k.instance_id, k.key, k.value, k.last_updated_at_ms
    FROM {old}.kv_store k WHERE k.instance_id = p_instance_id;

    INSERT INTO kv_delta (instance_id, key, value, last_updated_at_ms)
    SELECT d.instance_id, d.key, d.value, d.last_updated_at_ms
    FROM {old}.kv_delta d WHERE d.instance_id = p_instance_id;

    -- Messages, in arrival order; a message a crashed duroxide-pg turn had locked keeps
    -- its attempt count (poison detection carries over).
    WITH moved AS (
        DELETE FROM {old}.orchestrator_queue q WHERE q.instance_id = p_instance_id
        RETURNING q.id, q.work_item, q.visible_at, q.attempt_count, q.created_at
    ), ins AS (
        INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms,
                                        attempt_count, created_at_ms)
        SELECT p_instance_id, adoption_item_kind(m.work_item), m.work_item,
               adoption_ms(m.visible_at), m.attempt_count, adoption_ms(m.created_at)
        FROM moved m ORDER BY m.id
        RETURNING visible_at_ms
    )
    SELECT count(*) FILTER (WHERE visible_at_ms <= v_now),
           min(visible_at_ms) FILTER (WHERE visible_at_ms > v_now)
    INTO v_ready, v_next FROM ins;

    SELECT t.tags, t.sessions INTO v_tags, v_sessions
    FROM adoption_move_worker_items(ARRAY[p_instance_id], v_now) AS t;

    DELETE FROM {old}.history WHERE instance_id = p_instance_id;
    DELETE FROM {old}.executions WHERE instance_id = p_instance_id;
    DELETE FROM {old}.kv_store WHERE instance_id = p_instance_id;
    DELETE FROM {old}.kv_delta WHERE instance_id = p_instance_id;
    DELETE FROM {old}.instances WHERE instance_id = p_instance_id;
    -- The fence: duroxide-pg's fetch skips instances whose lock row has not ended.
    INSERT INTO {old}.instance_locks (instance_id, lock_token, locked_until, locked_at)
    VALUES (p_instance_id, 'adopted-by-duroxide-pg-hybrid:' || p_instance_id, 9223372036854775807, v_now)
    ON CONFLICT (instance_id) DO UPDATE
    SET lock_token = EXCLUDED.lock_token, locked_until = EXCLUDED.locked_until,
        locked_at = EXCLUDED.locked_at;

    PERFORM notify_work_available('orchestrator', v_ready);
    PERFORM notify_delayed('orchestrator', v_next);
    PERFORM notify_worker_items(v_tags, v_sessions);
    RETURN 'moved';
END;
$fn$;

-- Moves the activities of moved instances that no duroxide-pg worker holds: not leased
-- (or the lease ended: its worker died or gave up) and, for a session, no duroxide-pg
-- worker owns the session (so a session never runs on both sides at once). Rows a
-- duroxide-pg fetch is locking right now are skipped, to be found by a later sweep.
-- Returns the tags and session ids of the moved items (for notify_worker_items).
CREATE OR REPLACE FUNCTION adoption_move_worker_items(p_instance_ids TEXT[], p_now_ms BIGINT)
RETURNS TABLE(tags TEXT[], sessions TEXT[])
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN QUERY
    WITH picked AS (
        SELECT w.id FROM {old}.worker_queue w
        WHERE w.instance_id = ANY(p_instance_ids)
          AND (w.lock_token IS NULL OR w.locked_until <= p_now_ms)
          AND (w.session_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM {old}.sessions s
                WHERE s.session_id = w.session_id AND s.locked_until > p_now_ms))
        ORDER BY w.id
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        DELETE FROM {old}.worker_queue w USING picked WHERE w.id = picked.id
        RETURNING w.id, w.work_item, w.visible_at, w.attempt_count, w.created_at,
                  w.instance_id, w.execution_id, w.activity_id, w.session_id, w.tag
    ), ins AS (
        INSERT INTO worker_queue (work_item, instance_id, execution_id, activity_id, session_id,
                                  tag, visible_at_ms, attempt_count, created_at_ms)
        SELECT m.work_item,
               coalesce(m.instance_id, m.work_item::jsonb -> 'ActivityExecute' ->> 'instance'),
               coalesce(m.execution_id, (m.work_item::jsonb -> 'ActivityExecute' ->> 'execution_id')::BIGINT),
               coalesce(m.activity_id, (m.work_item::jsonb -> 'ActivityExecute' ->> 'id')::BIGINT),
               m.session_id, m.tag, adoption_ms(m.visible_at), m.attempt_count,
               adoption_ms(m.created_at)
        FROM moved m ORDER BY m.id
        RETURNING worker_queue.tag, worker_queue.session_id
    )
    SELECT array_agg(ins.tag), array_agg(ins.session_id) FROM ins;
END;
$fn$;

-- BEFORE INSERT on {old}.worker_queue: an activity for a moved instance (only a
-- duroxide-pg release other than 0.1.38 could write one) goes to {new}.
CREATE OR REPLACE FUNCTION adoption_route_worker_from_old() RETURNS TRIGGER
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF NEW.instance_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM adopted_instances a WHERE a.instance_id = NEW.instance_id) THEN
        RETURN NEW;
    END IF;
    INSERT INTO worker_queue (work_item, instance_id, execution_id, activity_id, session_id, tag,
                              visible_at_ms, attempt_count, created_at_ms)
    VALUES (NEW.work_item, NEW.instance_id, NEW.execution_id, NEW.activity_id, NEW.session_id,
            NEW.tag, adoption_ms(coalesce(NEW.visible_at, now())), NEW.attempt_count, now_ms());
    PERFORM notify_worker_items(ARRAY[NEW.tag], ARRAY[NEW.session_id]);
    RETURN NULL;
END;
$fn$;

-- One step of the background move. Visits up to p_limit instances of {old} in instance id
-- order after p_after (the caller wraps around to '' when fewer come back), each in its
-- own subtransaction so a busy instance releases the locks it took at once. Then sweeps:
-- messages of moved instances still in {old} (none are expected: the trigger routes them)
-- and their activities whose duroxide-pg lease ended.
CREATE OR REPLACE FUNCTION adopt_batch(p_after TEXT, p_limit INT)
RETURNS TABLE(moved INT, busy INT, visited INT, last_instance TEXT, swept INT, failures TEXT[])
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_id      TEXT;
    v_outcome TEXT;
    v_now     BIGINT := now_ms();
    v_tags    TEXT[];
    v_sess    TEXT[];
BEGIN
    moved := 0; busy := 0; visited := 0; swept := 0; last_instance := NULL; failures := '{}';
    FOR v_id IN
        SELECT c.instance_id FROM (
            (SELECT i.instance_id FROM {old}.instances i
             WHERE i.instance_id > p_after ORDER BY i.instance_id LIMIT p_limit)
            UNION
            -- instances duroxide-pg has only messages for (a start no turn ran yet)
            (SELECT DISTINCT q.instance_id FROM {old}.orchestrator_queue q
             WHERE q.instance_id > p_after
               AND NOT EXISTS (SELECT 1 FROM {old}.instances i WHERE i.instance_id = q.instance_id)
             ORDER BY q.instance_id LIMIT p_limit)
        ) c
        ORDER BY c.instance_id LIMIT p_limit
    LOOP
        visited := visited + 1;
        last_instance := v_id;
        BEGIN
            v_outcome := adopt_instance(v_id);
            IF v_outcome = 'busy' THEN
                RAISE EXCEPTION USING ERRCODE = 'DH001';
            END IF;
            IF v_outcome = 'moved' THEN
                moved := moved + 1;
            ELSE
                -- Already moved, yet messages sit in {old}: sweep them below.
                NULL;
            END IF;
        EXCEPTION
            WHEN SQLSTATE 'DH001' OR lock_not_available THEN
                busy := busy + 1;
            WHEN OTHERS THEN
                -- One instance that cannot move must not stop the others; the caller
                -- logs it and it is retried by the next pass.
                failures := failures || (v_id || ': ' || SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')');
        END;
    END LOOP;

    -- Sweep stray messages of moved instances (they are fenced in {old}).
    FOR v_id IN
        SELECT DISTINCT q.instance_id FROM {old}.orchestrator_queue q
        JOIN adopted_instances a ON a.instance_id = q.instance_id
        LIMIT p_limit
    LOOP
        WITH gone AS (
            DELETE FROM {old}.orchestrator_queue q WHERE q.instance_id = v_id
            RETURNING q.id, q.work_item, q.visible_at, q.attempt_count, q.created_at
        )
        INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms,
                                        attempt_count, created_at_ms)
        SELECT v_id, adoption_item_kind(g.work_item), g.work_item, adoption_ms(g.visible_at),
               g.attempt_count, adoption_ms(g.created_at)
        FROM gone g ORDER BY g.id;
        swept := swept + 1;
        PERFORM notify_work_available('orchestrator', 1);
    END LOOP;

    -- Activities of moved instances that duroxide-pg workers gave back or let expire.
    SELECT t.tags, t.sessions INTO v_tags, v_sess
    FROM adoption_move_worker_items(
        ARRAY(SELECT DISTINCT w.instance_id FROM {old}.worker_queue w
              JOIN adopted_instances a ON a.instance_id = w.instance_id
              WHERE w.lock_token IS NULL OR w.locked_until <= v_now
              LIMIT p_limit),
        v_now) AS t;
    swept := swept + coalesce(cardinality(v_tags), 0);
    PERFORM notify_worker_items(v_tags, v_sess);
    RETURN NEXT;
END;
$fn$;

-- What is left in {old}: instances, queued messages, activities (leased ones included),
-- and how many instances moved so far.
CREATE OR REPLACE FUNCTION adoption_progress()
RETURNS TABLE(old_instances BIGINT, old_messages BIGINT, old_activities BIGINT,
              old_leased_activities BIGINT, adopted BIGINT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN QUERY SELECT
        (SELECT count(*) FROM {old}.instances)
          + (SELECT count(DISTINCT q.instance_id) FROM {old}.orchestrator_queue q
             WHERE NOT EXISTS (SELECT 1 FROM {old}.instances i WHERE i.instance_id = q.instance_id)),
        (SELECT count(*) FROM {old}.orchestrator_queue),
        (SELECT count(*) FROM {old}.worker_queue),
        (SELECT count(*) FROM {old}.worker_queue w WHERE w.lock_token IS NOT NULL
                                                    AND w.locked_until > now_ms()),
        (SELECT count(*) FROM adopted_instances);
END;
$fn$;

CREATE OR REPLACE TRIGGER duroxide_pg_hybrid_route_orchestrator
    BEFORE INSERT ON {old}.orchestrator_queue
    FOR EACH ROW EXECUTE FUNCTION {new}.adoption_route_from_old();

CREATE OR REPLACE TRIGGER duroxide_pg_hybrid_route_worker
    BEFORE INSERT ON {old}.worker_queue
    FOR EACH ROW EXECUTE FUNCTION {new}.adoption_route_worker_from_old();

CREATE OR REPLACE TRIGGER adoption_route_to_old
    BEFORE INSERT ON {new}.orchestrator_queue
    FOR EACH ROW EXECUTE FUNCTION {new}.adoption_route_to_old();

-- duroxide-pg's client reads, made to find moved instances. Each original function is
-- renamed once to <name>_before_adoption and a function of the original name and
-- signature answers from {new} for an instance living there, else calls the original. So a
-- duroxide-pg client (status, history, custom status, KV, instance and execution info,
-- listings) reaches every instance wherever it lives. Finalize drops both.
DO $do$
DECLARE
    v_name TEXT;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['fetch_history', 'fetch_history_with_execution',
        'latest_execution_id', 'list_executions', 'get_custom_status', 'get_kv_value',
        'get_kv_all_values', 'get_instance_info', 'get_execution_info', 'list_instances',
        'list_instances_by_status', 'list_children', 'get_parent_id',
        'delete_instances_atomic', 'prune_executions']
    LOOP
        -- Only at the first install (a re-install must not rename a replacement).
        IF NOT EXISTS (SELECT 1 FROM {new}.adoption_source)
           AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                           WHERE n.nspname = {old_literal} AND p.proname = v_name || '_before_adoption')
           AND EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                       WHERE n.nspname = {old_literal} AND p.proname = v_name) THEN
            EXECUTE format('ALTER FUNCTION %s.%I RENAME TO %I', {old_literal_ident}, v_name,
                           v_name || '_before_adoption');
        END IF;
    END LOOP;
END;
$do$;

-- Moved, or created by this crate (started through its client, or a child of a moved
-- instance).
CREATE OR REPLACE FUNCTION adoption_lives_in_new(p_instance_id TEXT) RETURNS BOOLEAN
LANGUAGE sql STABLE
AS $fn$
SELECT EXISTS (SELECT 1 FROM {new}.adopted_instances a WHERE a.instance_id = p_instance_id)
    OR EXISTS (SELECT 1 FROM {new}.instances i WHERE i.instance_id = p_instance_id)
$fn$;

CREATE OR REPLACE FUNCTION {old}.fetch_history(p_instance_id TEXT)
RETURNS TABLE(out_event_data TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY SELECT h.event_data FROM {new}.history h
        WHERE h.instance_id = p_instance_id
          AND h.execution_id = (SELECT coalesce(max(e.execution_id), 1) FROM {new}.executions e
                                WHERE e.instance_id = p_instance_id)
        ORDER BY h.event_id;
    ELSE
        RETURN QUERY SELECT * FROM {old}.fetch_history_before_adoption(p_instance_id);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.fetch_history_with_execution(p_instance_id TEXT, p_execution_id BIGINT)
RETURNS TABLE(out_event_data TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY SELECT h.event_data FROM {new}.history h
        WHERE h.instance_id = p_instance_id AND h.execution_id = p_execution_id
        ORDER BY h.event_id;
    ELSE
        RETURN QUERY SELECT * FROM {old}.fetch_history_with_execution_before_adoption(p_instance_id, p_execution_id);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.latest_execution_id(p_instance_id TEXT) RETURNS BIGINT
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN (SELECT i.current_execution_id FROM {new}.instances i WHERE i.instance_id = p_instance_id);
    END IF;
    RETURN {old}.latest_execution_id_before_adoption(p_instance_id);
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.list_executions(p_instance_id TEXT)
RETURNS TABLE(execution_id BIGINT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY SELECT e.execution_id FROM {new}.executions e
        WHERE e.instance_id = p_instance_id ORDER BY e.execution_id;
    ELSE
        RETURN QUERY SELECT * FROM {old}.list_executions_before_adoption(p_instance_id);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.get_custom_status(p_instance_id TEXT, p_last_seen_version BIGINT)
RETURNS TABLE(out_custom_status TEXT, out_custom_status_version BIGINT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY SELECT i.custom_status, i.custom_status_version::BIGINT FROM {new}.instances i
        WHERE i.instance_id = p_instance_id AND i.custom_status_version > p_last_seen_version;
    ELSE
        RETURN QUERY SELECT * FROM {old}.get_custom_status_before_adoption(p_instance_id, p_last_seen_version);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.get_kv_value(p_instance TEXT, p_key TEXT)
RETURNS TABLE(out_value TEXT, out_found BOOLEAN)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance) THEN
        -- The delta (writes of the running execution) wins over the store; a NULL in the
        -- delta is a removal.
        RETURN QUERY
        SELECT v.value, v.value IS NOT NULL FROM (
            SELECT d.value, 0 AS rank FROM {new}.kv_delta d WHERE d.instance_id = p_instance AND d.key = p_key
            UNION ALL
            SELECT s.value, 1 FROM {new}.kv_store s WHERE s.instance_id = p_instance AND s.key = p_key
            UNION ALL
            SELECT NULL, 2
        ) v ORDER BY v.rank LIMIT 1;
    ELSE
        RETURN QUERY SELECT * FROM {old}.get_kv_value_before_adoption(p_instance, p_key);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.get_kv_all_values(p_instance TEXT)
RETURNS TABLE(out_key TEXT, out_value TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance) THEN
        RETURN QUERY
        SELECT coalesce(d.key, s.key), CASE WHEN d.key IS NOT NULL THEN d.value ELSE s.value END
        FROM (SELECT * FROM {new}.kv_store WHERE instance_id = p_instance) s
        FULL JOIN (SELECT * FROM {new}.kv_delta WHERE instance_id = p_instance) d ON d.key = s.key
        WHERE d.key IS NULL OR d.value IS NOT NULL;
    ELSE
        RETURN QUERY SELECT * FROM {old}.get_kv_all_values_before_adoption(p_instance);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.get_instance_info(p_instance_id TEXT)
RETURNS TABLE(instance_id TEXT, orchestration_name TEXT, orchestration_version TEXT,
              current_execution_id BIGINT, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ,
              status TEXT, output TEXT, parent_instance_id TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY
        SELECT i.instance_id, i.orchestration_name, coalesce(i.orchestration_version, 'unknown'),
               i.current_execution_id, to_timestamp(i.created_at_ms / 1000.0),
               to_timestamp(i.updated_at_ms / 1000.0), e.status, e.output, i.parent_instance_id
        FROM {new}.instances i
        LEFT JOIN {new}.executions e ON e.instance_id = i.instance_id
                                    AND e.execution_id = i.current_execution_id
        WHERE i.instance_id = p_instance_id;
    ELSE
        RETURN QUERY SELECT * FROM {old}.get_instance_info_before_adoption(p_instance_id);
    END IF;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.get_execution_info(p_instance_id TEXT, p_execution_id BIGINT)
RETURNS TABLE(execution_id BIGINT, status TEXT, output TEXT, started_at TIMESTAMPTZ,
              completed_at TIMESTAMPTZ, event_count BIGINT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY
        SELECT e.execution_id, e.status, e.output, to_timestamp(e.started_at_ms / 1000.0),
               to_timestamp(e.completed_at_ms / 1000.0),
               (SELECT count(*) FROM {new}.history h
                WHERE h.instance_id = e.instance_id AND h.execution_id = e.execution_id)
        FROM {new}.executions e
        WHERE e.instance_id = p_instance_id AND e.execution_id = p_execution_id;
    ELSE
        RETURN QUERY SELECT * FROM {old}.get_execution_info_before_adoption(p_instance_id, p_execution_id);
    END IF;
END;
$fn$;

-- Listings: both homes (the duroxide-pg tables hold the instances not moved yet).
CREATE OR REPLACE FUNCTION {old}.list_instances()
RETURNS TABLE(instance_id TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    RETURN QUERY
    SELECT x.instance_id FROM (
        SELECT i.instance_id, i.created_at_ms FROM {new}.instances i
        UNION ALL
        SELECT o.instance_id, {new}.adoption_ms(o.created_at) FROM {old}.instances o
    ) x ORDER BY x.created_at_ms DESC;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.list_instances_by_status(p_status TEXT)
RETURNS TABLE(instance_id TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    RETURN QUERY
    SELECT x.instance_id FROM (
        SELECT i.instance_id, i.created_at_ms FROM {new}.instances i
        JOIN {new}.executions e ON e.instance_id = i.instance_id
                               AND e.execution_id = i.current_execution_id
        WHERE e.status = p_status
        UNION ALL
        SELECT o.instance_id, {new}.adoption_ms(o.created_at) FROM {old}.instances o
        JOIN {old}.executions e ON e.instance_id = o.instance_id
                               AND e.execution_id = o.current_execution_id
        WHERE e.status = p_status
    ) x ORDER BY x.created_at_ms DESC;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.list_children(p_instance_id TEXT)
RETURNS TABLE(child_instance_id TEXT)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    RETURN QUERY
    SELECT x.instance_id FROM (
        SELECT i.instance_id, i.created_at_ms FROM {new}.instances i
        WHERE i.parent_instance_id = p_instance_id
        UNION ALL
        SELECT o.instance_id, {new}.adoption_ms(o.created_at) FROM {old}.instances o
        WHERE o.parent_instance_id = p_instance_id
    ) x ORDER BY x.created_at_ms;
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.get_parent_id(p_instance_id TEXT) RETURNS TEXT
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        IF NOT EXISTS (SELECT 1 FROM {new}.instances i WHERE i.instance_id = p_instance_id) THEN
            RAISE EXCEPTION 'Instance not found: %', p_instance_id;
        END IF;
        RETURN (SELECT i.parent_instance_id FROM {new}.instances i WHERE i.instance_id = p_instance_id);
    END IF;
    RETURN {old}.get_parent_id_before_adoption(p_instance_id);
END;
$fn$;

-- Management: each side deletes or prunes what lives in its tables (a tree that spans both
-- homes is deleted in both, under each side's rules).
CREATE OR REPLACE FUNCTION {old}.delete_instances_atomic(p_instance_ids TEXT[], p_force BOOLEAN)
RETURNS TABLE(instances_deleted BIGINT, executions_deleted BIGINT, events_deleted BIGINT,
              queue_messages_deleted BIGINT)
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    v_new  TEXT[] := ARRAY(SELECT x FROM unnest(p_instance_ids) x WHERE {new}.adoption_lives_in_new(x));
    v_old  TEXT[] := ARRAY(SELECT x FROM unnest(p_instance_ids) x WHERE NOT {new}.adoption_lives_in_new(x));
    v_a    BIGINT[] := ARRAY[0, 0, 0, 0];
    v_b    BIGINT[] := ARRAY[0, 0, 0, 0];
BEGIN
    IF cardinality(v_new) > 0 THEN
        SELECT ARRAY[d.o_instances_deleted, d.o_executions_deleted, d.o_events_deleted,
                     d.o_queue_messages_deleted]
        INTO v_a FROM {new}.admin_delete_instances(v_new, p_force) d;
    END IF;
    IF cardinality(v_old) > 0 OR cardinality(v_new) = 0 THEN
        SELECT ARRAY[d.instances_deleted, d.executions_deleted, d.events_deleted,
                     d.queue_messages_deleted]
        INTO v_b FROM {old}.delete_instances_atomic_before_adoption(v_old, p_force) d;
    END IF;
    RETURN QUERY SELECT v_a[1] + v_b[1], v_a[2] + v_b[2], v_a[3] + v_b[3], v_a[4] + v_b[4];
END;
$fn$;

CREATE OR REPLACE FUNCTION {old}.prune_executions(p_instance_id TEXT, p_keep_last INTEGER DEFAULT NULL,
                                                  p_completed_before_ms BIGINT DEFAULT NULL)
RETURNS TABLE(instances_processed BIGINT, executions_deleted BIGINT, events_deleted BIGINT)
LANGUAGE plpgsql VOLATILE
AS $fn$
BEGIN
    IF {new}.adoption_lives_in_new(p_instance_id) THEN
        RETURN QUERY SELECT p.o_instances_processed, p.o_executions_deleted, p.o_events_deleted
        FROM {new}.admin_prune_executions(p_instance_id, p_keep_last::BIGINT, p_completed_before_ms) p;
    ELSE
        RETURN QUERY SELECT * FROM {old}.prune_executions_before_adoption(p_instance_id, p_keep_last,
                                                                        p_completed_before_ms);
    END IF;
END;
$fn$;
