-- revision: 4
-- Ending or extending an orchestration turn's lease outside the ack.

-- abandon_orchestration_item and the release of a claim whose reads failed: drops the
-- lease and hands the batch back (only rows tagged with this token change). NULL = no
-- lease holds this token.
CREATE OR REPLACE FUNCTION abandon_orchestration_turn(
    p_lock_token      TEXT,
    p_delay_ms        BIGINT,    -- NULL = messages visible as before
    p_ignore_attempt  BOOLEAN    -- TRUE = the attempt is not counted
)
RETURNS TEXT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance TEXT;
    -- One time for the whole batch: now_ms() per row would let a fetch waking at the
    -- earliest of them claim part of the batch a millisecond before the rest.
    v_visible  BIGINT := now_ms() + p_delay_ms;
BEGIN
    -- Lease row first (the ack's lock order, so the two cannot deadlock), then the
    -- messages, then the lease ends: the lease-end trigger sees the batch as it will be
    -- claimed next.
    PERFORM 1 FROM instance_locks l WHERE l.lock_token = p_lock_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE orchestrator_queue q
    SET lock_token = NULL,
        visible_at_ms = CASE WHEN p_delay_ms IS NULL THEN q.visible_at_ms ELSE v_visible END,
        attempt_count = CASE WHEN p_ignore_attempt THEN greatest(0, q.attempt_count - 1)
                             ELSE q.attempt_count END
    WHERE q.lock_token = p_lock_token;
    DELETE FROM instance_locks l WHERE l.lock_token = p_lock_token
    RETURNING l.instance_id INTO v_instance;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF p_delay_ms IS NULL THEN
        PERFORM notify_work_available('orchestrator', 1);
    ELSE
        -- Waiting fetches shorten their sleep to when the batch is visible again.
        PERFORM notify_delayed('orchestrator',
            (SELECT min(q.visible_at_ms) FROM orchestrator_queue q WHERE q.instance_id = v_instance));
    END IF;
    RETURN v_instance;
END;
$fn$;

-- renew_orchestration_item_lock: extends a live lease (and its mirror in the claim
-- state, so claims keep passing the instance over). NULL = no live lease holds the token.
CREATE OR REPLACE FUNCTION renew_orchestration_turn(
    p_lock_token   TEXT,
    p_extend_ms    BIGINT
)
RETURNS TEXT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance TEXT;
    v_until    BIGINT;
    v_now      BIGINT := now_ms();
BEGIN
    UPDATE instance_locks l SET locked_until_ms = v_now + p_extend_ms
    WHERE l.lock_token = p_lock_token AND l.locked_until_ms > v_now
    RETURNING l.instance_id, l.locked_until_ms INTO v_instance, v_until;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE pending_instances p
    SET locked_until_ms = v_until, claimable_at_ms = greatest(p.claimable_at_ms, v_until)
    WHERE p.instance_id = v_instance;
    RETURN v_instance;
END;
$fn$;
