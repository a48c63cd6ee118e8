-- revision: 6
-- ack_orchestration_item: commit one orchestration turn in ONE round trip and one
-- transaction (the function call's). Every write is set-based over the array arguments.
-- The caller (Rust) has already reduced the delta to what SQL needs: history rows with
-- their event type, the net KV change per key, the last custom-status update, and each
-- work item's routing columns.
--
-- Errors (SQLSTATE class DX, mapped to permanent provider errors):
--   DX001  Invalid lock token (unknown, already acked, or taken over after expiry)
--   DX002  Instance lock expired (lease ran out; nothing is applied)
-- A duplicate (instance, execution, event_id) raises 23505 and rolls everything back,
-- leaving the lease held.
-- Revision 3 skips the statements whose arrays are empty (most turns have no KV change,
-- no cancellation, no message to another instance; an empty INSERT still fires the
-- claim-state statement trigger).
-- Revision 2 added p_notify_worker_items (with a default, so calls of the previous
-- release resolve to it unchanged); the 32-argument signature is dropped first so those
-- calls are not ambiguous between two overloads. Revision 6 added p_call_id the same way
-- (the 33-argument signature is dropped): one id per call, reused by the caller's
-- resends and recorded in the enqueue ledger as 'oack:' || p_call_id, so a resend of an
-- ack that committed (its reply was lost) is answered as done (NULL instead of the
-- instance id) rather than "invalid lock token"; a second, separate ack of the token
-- still fails. Callers that pass no id (earlier releases) get the earlier behaviour.
DROP FUNCTION IF EXISTS ack_orchestration_item(
    TEXT, BIGINT, BIGINT[], TEXT[], TEXT[], TEXT, TEXT, TEXT, TEXT, TEXT, INT, INT, INT,
    BOOLEAN, TEXT, BOOLEAN, TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], BIGINT[], BIGINT[],
    TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], TEXT[], TEXT[], TEXT[], BIGINT[]);
DROP FUNCTION IF EXISTS ack_orchestration_item(
    TEXT, BIGINT, BIGINT[], TEXT[], TEXT[], TEXT, TEXT, TEXT, TEXT, TEXT, INT, INT, INT,
    BOOLEAN, TEXT, BOOLEAN, TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], BIGINT[], BIGINT[],
    TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], TEXT[], TEXT[], TEXT[], BIGINT[], BOOLEAN);

CREATE OR REPLACE FUNCTION ack_orchestration_item(
    p_lock_token            TEXT,
    p_execution_id          BIGINT,
    p_event_ids             BIGINT[],
    p_event_types           TEXT[],
    p_event_data            TEXT[],
    p_orchestration_name    TEXT,
    p_orchestration_version TEXT,
    p_parent_instance_id    TEXT,
    p_status                TEXT,
    p_output                TEXT,
    p_pinned_major          INT,
    p_pinned_minor          INT,
    p_pinned_patch          INT,
    p_custom_status_set     BOOLEAN,
    p_custom_status         TEXT,
    p_kv_clear_all          BOOLEAN,
    p_kv_keys               TEXT[],
    p_kv_values             TEXT[],     -- NULL element = key cleared (tombstone)
    p_kv_updated_ms         BIGINT[],   -- NULL element = now
    p_worker_items          TEXT[],
    p_worker_instances      TEXT[],
    p_worker_executions     BIGINT[],
    p_worker_activities     BIGINT[],
    p_worker_sessions       TEXT[],
    p_worker_tags           TEXT[],
    p_cancel_instances      TEXT[],
    p_cancel_executions     BIGINT[],
    p_cancel_activities     BIGINT[],
    p_orch_instances        TEXT[],
    p_orch_kinds            TEXT[],
    p_orch_items            TEXT[],
    p_orch_visible_at_ms    BIGINT[],   -- NULL element = now
    -- FALSE: the caller notifies for the worker items itself (ack_orchestration_handover
    -- first hands some of them to waiting fetches of its own process).
    p_notify_worker_items   BOOLEAN DEFAULT TRUE,
    p_call_id               TEXT DEFAULT NULL
)
RETURNS TEXT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance  TEXT;
    v_until     BIGINT;
    v_now       BIGINT;
    v_terminal  BOOLEAN := p_status IN ('Completed', 'Failed', 'ContinuedAsNew');
BEGIN
    -- The lease row is locked first: a concurrent ack, renew, abandon or claim of the
    -- same token waits here, and sees the row gone once this ack commits.
    SELECT l.instance_id, l.locked_until_ms INTO v_instance, v_until
    FROM instance_locks l WHERE l.lock_token = p_lock_token
    FOR UPDATE;
    IF NOT FOUND THEN
        -- (A resend waited above for its first attempt's row lock, if that attempt was
        -- still running; this statement's snapshot sees what it committed.)
        IF p_call_id IS NOT NULL AND EXISTS (SELECT 1 FROM enqueue_ledger l
                                             WHERE l.enqueue_id = 'oack:' || p_call_id) THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'Invalid lock token: no live lease holds this token'
            USING ERRCODE = 'DX001';
    END IF;
    v_now := now_ms();
    IF v_until <= v_now THEN
        RAISE EXCEPTION 'Instance lock expired for instance % (lease ended % ms ago)',
            v_instance, v_now - v_until
            USING ERRCODE = 'DX002';
    END IF;

    DELETE FROM orchestrator_queue q WHERE q.lock_token = p_lock_token;

    IF p_orchestration_name IS NOT NULL AND p_orchestration_version IS NOT NULL THEN
        INSERT INTO instances AS i (instance_id, orchestration_name, orchestration_version,
                                    current_execution_id, parent_instance_id,
                                    created_at_ms, updated_at_ms)
        VALUES (v_instance, p_orchestration_name, p_orchestration_version,
                p_execution_id, p_parent_instance_id, v_now, v_now)
        ON CONFLICT (instance_id) DO UPDATE
            SET orchestration_name = EXCLUDED.orchestration_name,
                orchestration_version = EXCLUDED.orchestration_version;
    END IF;

    INSERT INTO executions (instance_id, execution_id, status, started_at_ms)
    VALUES (v_instance, p_execution_id, 'Running', v_now)
    ON CONFLICT (instance_id, execution_id) DO NOTHING;

    IF p_pinned_major IS NOT NULL OR p_status IS NOT NULL THEN
        UPDATE executions e
        SET pinned_major = coalesce(p_pinned_major, e.pinned_major),
            pinned_minor = CASE WHEN p_pinned_major IS NULL THEN e.pinned_minor ELSE p_pinned_minor END,
            pinned_patch = CASE WHEN p_pinned_major IS NULL THEN e.pinned_patch ELSE p_pinned_patch END,
            status = coalesce(p_status, e.status),
            output = CASE WHEN p_status IS NULL THEN e.output ELSE p_output END,
            completed_at_ms = CASE WHEN v_terminal THEN v_now ELSE e.completed_at_ms END
        WHERE e.instance_id = v_instance AND e.execution_id = p_execution_id;
    END IF;

    UPDATE instances i
    SET current_execution_id = greatest(i.current_execution_id, p_execution_id),
        updated_at_ms = v_now,
        custom_status = CASE WHEN p_custom_status_set THEN p_custom_status ELSE i.custom_status END,
        custom_status_version = i.custom_status_version
                                + CASE WHEN p_custom_status_set THEN 1 ELSE 0 END
    WHERE i.instance_id = v_instance;

    INSERT INTO history (instance_id, execution_id, event_id, event_type, event_data, created_at_ms)
    SELECT v_instance, p_execution_id, e.event_id, e.event_type, e.event_data, v_now
    FROM unnest(p_event_ids, p_event_types, p_event_data) AS e(event_id, event_type, event_data);

    IF p_kv_clear_all THEN
        UPDATE kv_delta d SET value = NULL, last_updated_at_ms = v_now
        WHERE d.instance_id = v_instance;
        INSERT INTO kv_delta (instance_id, key, value, last_updated_at_ms)
        SELECT v_instance, s.key, NULL, v_now FROM kv_store s WHERE s.instance_id = v_instance
        ON CONFLICT (instance_id, key) DO NOTHING;
    END IF;

    IF cardinality(p_kv_keys) > 0 THEN
        INSERT INTO kv_delta AS d (instance_id, key, value, last_updated_at_ms)
        SELECT v_instance, k.key, k.value, coalesce(k.updated_ms, v_now)
        FROM unnest(p_kv_keys, p_kv_values, p_kv_updated_ms) AS k(key, value, updated_ms)
        ON CONFLICT (instance_id, key) DO UPDATE
            SET value = EXCLUDED.value, last_updated_at_ms = EXCLUDED.last_updated_at_ms;
    END IF;

    IF v_terminal THEN
        DELETE FROM kv_store s USING kv_delta d
        WHERE s.instance_id = v_instance AND d.instance_id = v_instance
          AND d.key = s.key AND d.value IS NULL;
        INSERT INTO kv_store AS s (instance_id, key, value, last_updated_at_ms)
        SELECT d.instance_id, d.key, d.value, d.last_updated_at_ms
        FROM kv_delta d WHERE d.instance_id = v_instance AND d.value IS NOT NULL
        ON CONFLICT (instance_id, key) DO UPDATE
            SET value = EXCLUDED.value, last_updated_at_ms = EXCLUDED.last_updated_at_ms;
        DELETE FROM kv_delta d WHERE d.instance_id = v_instance;
    END IF;

    -- Worker items go in before cancellations are applied, so an activity scheduled and
    -- cancelled in the same turn ends up absent.
    IF cardinality(p_worker_items) > 0 THEN
        INSERT INTO worker_queue (work_item, instance_id, execution_id, activity_id,
                                  session_id, tag, visible_at_ms, created_at_ms)
        SELECT w.item, w.instance_id, w.execution_id, w.activity_id, w.session_id, w.tag, v_now, v_now
        FROM unnest(p_worker_items, p_worker_instances, p_worker_executions, p_worker_activities,
                    p_worker_sessions, p_worker_tags)
             AS w(item, instance_id, execution_id, activity_id, session_id, tag);
    END IF;

    IF cardinality(p_cancel_instances) > 0 THEN
        DELETE FROM worker_queue w
        USING unnest(p_cancel_instances, p_cancel_executions, p_cancel_activities)
              AS c(instance_id, execution_id, activity_id)
        WHERE w.instance_id = c.instance_id AND w.execution_id = c.execution_id
          AND w.activity_id = c.activity_id;
    END IF;

    IF cardinality(p_orch_instances) > 0 THEN
        INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
        SELECT o.instance_id, o.kind, o.item, coalesce(o.visible_at_ms, v_now), v_now
        FROM unnest(p_orch_instances, p_orch_kinds, p_orch_items, p_orch_visible_at_ms)
             AS o(instance_id, kind, item, visible_at_ms);
    END IF;

    -- Last, after every message this turn wrote: the lease-end trigger makes the
    -- instance's claim state exact again (02_pending_instances.sql).
    DELETE FROM instance_locks l WHERE l.lock_token = p_lock_token;

    IF p_call_id IS NOT NULL THEN
        INSERT INTO enqueue_ledger (enqueue_id, created_at_ms)
        VALUES ('oack:' || p_call_id, v_now)
        ON CONFLICT (enqueue_id) DO NOTHING;
        -- Every writer of the ledger prunes it now and then (09_handover.sql).
        IF random() < 0.0625 THEN
            PERFORM enqueue_ledger_prune(v_now);
        END IF;
    END IF;

    -- Wake long-pollers for what this turn made runnable: new activities, messages
    -- visible now (other instances, or this one, which is unlocked from here on, with
    -- anything that arrived while it was locked).
    IF p_notify_worker_items AND cardinality(p_worker_items) > 0 THEN
        PERFORM notify_worker_items(p_worker_tags, p_worker_sessions);
    END IF;
    IF cardinality(p_orch_instances) > 0 THEN
        PERFORM notify_delayed('orchestrator',
            (SELECT min(v.at) FROM unnest(p_orch_visible_at_ms) AS v(at) WHERE v.at > v_now));
    END IF;
    PERFORM notify_work_available('orchestrator',
        (SELECT count(*) FROM unnest(p_orch_visible_at_ms) AS v(at) WHERE v.at IS NULL OR v.at <= v_now)
        -- (An index-ordered LIMIT 1, not EXISTS: this runs with a generic plan, and for
        -- EXISTS that plan scans the queue when one instance holds most of it; see
        -- 01_primitives.sql.)
        + CASE WHEN (SELECT q.id FROM orchestrator_queue q
                     WHERE q.instance_id = v_instance AND q.visible_at_ms <= v_now
                     ORDER BY q.instance_id, q.id LIMIT 1) IS NOT NULL
               THEN 1 ELSE 0 END);
    RETURN v_instance;
END;
$fn$;
