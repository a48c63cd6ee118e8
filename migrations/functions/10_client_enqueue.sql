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
    IF p_kind = 'QueueMessage' THEN
        -- The enqueue trigger keeps the claim state, with the contract's orphan rule (a
        -- QueueMessage for an instance that does not exist is dropped).
        INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
        VALUES (p_instance_id, p_kind, p_work_item, v_visible, v_now);
    ELSE
        -- One message of one instance: what the trigger would do for it is one
        -- pending_note_messages call, made here without the trigger's transition table
        -- and grouping query (02_pending_instances.sql; the worker ack does the same).
        PERFORM set_config('duroxide_pg_hybrid.claim_state_kept', 'on', TRUE);
        INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
        VALUES (p_instance_id, p_kind, p_work_item, v_visible, v_now);
        PERFORM set_config('duroxide_pg_hybrid.claim_state_kept', 'off', TRUE);
        PERFORM pending_note_messages(p_instance_id, v_visible,
                                      p_kind IN ('StartOrchestration', 'ContinueAsNew'));
    END IF;
    IF v_visible > v_now THEN
        PERFORM notify_delayed('orchestrator', v_visible);
    ELSE
        PERFORM notify_work_available('orchestrator', 1);
    END IF;
    RETURN 1;
END;
$fn$;
