-- revision: 1
-- The client enqueue to the orchestrator queue (a start, an event, a cancel, or any item
-- with a delay) when no local fetch waits for it (else enqueue_orchestrator_handover,
-- 09_handover.sql). The item is queued once per p_enqueue_id (the enqueue ledger), so a
-- resent call cannot deliver it twice; returns 1 when queued, 0 for the resend of a call
-- that committed. Visibility is the database clock plus p_delay_ms (<= 0: now). Wakes a
-- waiting fetch for an item visible now, or tells waiters when a delayed one becomes
-- visible.
--
-- Before this function the enqueue was one statement of CTEs sent by the provider; every
-- execution initialized all of its plan (the ledger's pruning DELETE, run once in 16
-- calls, and both notifications included), which cost more than the statements that
-- run. Releases before it keep sending their statement; both write the same rows.
-- One client message into the orchestrator queue, with its claim state. For a single
-- message the enqueue trigger's work is one pending_note_messages call, made here without
-- the trigger's transition table and grouping query (02_pending_instances.sql; the worker
-- ack does the same). A QueueMessage goes through the trigger, which applies the
-- contract's orphan rule (one for an instance that does not exist is dropped).
CREATE OR REPLACE FUNCTION enqueue_orchestrator_message(
    p_instance_id    TEXT,
    p_kind           TEXT,
    p_work_item      TEXT,
    p_visible_at_ms  BIGINT,
    p_now_ms         BIGINT
)
RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    IF p_kind = 'QueueMessage' THEN
        INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
        VALUES (p_instance_id, p_kind, p_work_item, p_visible_at_ms, p_now_ms);
        RETURN;
    END IF;
    PERFORM set_config('duroxide_pg_hybrid.claim_state_kept', 'on', TRUE);
    INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
    VALUES (p_instance_id, p_kind, p_work_item, p_visible_at_ms, p_now_ms);
    PERFORM set_config('duroxide_pg_hybrid.claim_state_kept', 'off', TRUE);
    PERFORM pending_note_messages(p_instance_id, p_visible_at_ms,
                                  p_kind IN ('StartOrchestration', 'ContinueAsNew'));
END;
$fn$;

CREATE OR REPLACE FUNCTION enqueue_orchestrator_item(
    p_instance_id  TEXT,
    p_kind         TEXT,
    p_work_item    TEXT,
    p_delay_ms     BIGINT,
    p_enqueue_id   TEXT
)
RETURNS BIGINT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_now     BIGINT := now_ms();
    v_visible BIGINT := v_now + greatest(p_delay_ms, 0);
BEGIN
    INSERT INTO enqueue_ledger (enqueue_id, created_at_ms)
    VALUES (p_enqueue_id, v_now)
    ON CONFLICT (enqueue_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF random() < 0.0625 THEN
        PERFORM enqueue_ledger_prune(v_now);
    END IF;
    PERFORM enqueue_orchestrator_message(p_instance_id, p_kind, p_work_item, v_visible, v_now);
    IF v_visible > v_now THEN
        PERFORM notify_delayed('orchestrator', v_visible);
    ELSE
        PERFORM notify_work_available('orchestrator', 1);
    END IF;
    RETURN 1;
END;
$fn$;
