-- revision: 6
-- Maintenance of pending_instances, the per-instance claim state (table: migration
-- 20261201000001).
--
-- Locking protocol. Three kinds of writers touch a row:
--   * enqueues (the trigger below, in whatever transaction inserts messages) take a
--     KEY SHARE row lock. Enqueues to one instance never wait for each other, and claims
--     (FOR NO KEY UPDATE) never wait for, or skip, an instance because of them. An
--     enqueue only writes the row when the row does not already promise work at or
--     before its message (first message after idle, an earlier message, or a start
--     message for an instance that could not run);
--   * claims, acks, renews and abandons update lease and pin mirrors (NO KEY UPDATE);
--     every lease end (a DELETE on instance_locks, by any release) refreshes the row
--     through the lease-end trigger below;
--   * corrections that make the row LESS claimable (raise visible_at, mark not
--     runnable, delete the row) go through pending_refresh, which takes FOR UPDATE
--     SKIP LOCKED first. That lock conflicts with the enqueues' KEY SHARE, so a
--     correction never runs while an enqueue it cannot see yet is in flight, and it
--     never waits (no deadlock with acks that enqueue to each other): when an enqueue
--     holds the row, the correction is skipped and the row stays claimable.
-- Hence the invariant: every queued message's instance has a row whose claimable_at_ms
-- is not later than when the message can next be claimed.

-- Can the instance run a turn (it exists), and its current execution's pinned version.
CREATE OR REPLACE FUNCTION pending_instance_facts(
    p_instance_id TEXT,
    OUT o_exists BOOLEAN,
    OUT o_pinned_major INT,
    OUT o_pinned_minor INT,
    OUT o_pinned_patch INT
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = auto
AS $fn$
BEGIN
    SELECT i.instance_id IS NOT NULL
               OR EXISTS (SELECT 1 FROM history h
                          WHERE h.instance_id = p_instance_id
                            AND h.event_type = 'OrchestrationStarted'),
           e.pinned_major, e.pinned_minor, e.pinned_patch
    INTO o_exists, o_pinned_major, o_pinned_minor, o_pinned_patch
    FROM (SELECT 1) AS one
    LEFT JOIN instances i ON i.instance_id = p_instance_id
    LEFT JOIN executions e
           ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id;
END;
$fn$;

-- Messages for p_instance_id were inserted: the earliest visible at p_visible_at_ms;
-- p_starts = one of them starts the instance (StartOrchestration, ContinueAsNew).
-- p_hold_until_ms (the worker ack's fan-in grace, 09_handover.sql): when this call
-- creates the row of a runnable instance without a live lease, the row is claimable
-- only from then on; returns TRUE when it did that (otherwise FALSE, and the caller
-- holds the row the usual way). Revision 6 added it and the result; the VOID signature
-- is dropped (every caller is in these files).
DROP FUNCTION IF EXISTS pending_note_messages(TEXT, BIGINT, BOOLEAN);
CREATE OR REPLACE FUNCTION pending_note_messages(
    p_instance_id   TEXT,
    p_visible_at_ms BIGINT,
    p_starts        BOOLEAN,
    p_hold_until_ms BIGINT DEFAULT NULL
)
RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_row   pending_instances%ROWTYPE;
    v_facts RECORD;
    v_lease BIGINT;
BEGIN
    SELECT * INTO v_row FROM pending_instances p
    WHERE p.instance_id = p_instance_id
    FOR KEY SHARE;
    IF FOUND THEN
        -- The common case, a burst of messages for one instance: nothing to write. (A
        -- live lease: the turn's ack or the lease expiry brings the instance back.)
        IF (v_row.runnable OR NOT p_starts)
           AND (v_row.visible_at_ms <= p_visible_at_ms OR v_row.locked_until_ms > now_ms()) THEN
            RETURN FALSE;
        END IF;
        UPDATE pending_instances p
        SET visible_at_ms = least(p.visible_at_ms, p_visible_at_ms),
            claimable_at_ms = CASE WHEN p.locked_until_ms > now_ms()
                                   THEN p.claimable_at_ms
                                   ELSE least(p.claimable_at_ms, p_visible_at_ms) END,
            runnable = p.runnable OR p_starts
        WHERE p.instance_id = p_instance_id;
        RETURN FALSE;
    END IF;

    SELECT * INTO v_facts FROM pending_instance_facts(p_instance_id);
    SELECT l.locked_until_ms INTO v_lease FROM instance_locks l
    WHERE l.instance_id = p_instance_id AND l.locked_until_ms > now_ms();
    IF p_hold_until_ms IS NOT NULL AND v_lease IS NULL AND (p_starts OR v_facts.o_exists) THEN
        -- Created held, in one write (not created, then updated). If another enqueue
        -- created the row meanwhile, the statement below merges into it as usual.
        INSERT INTO pending_instances (instance_id, visible_at_ms, claimable_at_ms, locked_until_ms,
                                       runnable, pinned_major, pinned_minor, pinned_patch)
        VALUES (p_instance_id, p_visible_at_ms, greatest(p_visible_at_ms, p_hold_until_ms), NULL,
                TRUE, v_facts.o_pinned_major, v_facts.o_pinned_minor, v_facts.o_pinned_patch)
        ON CONFLICT (instance_id) DO NOTHING;
        IF FOUND THEN
            RETURN TRUE;
        END IF;
    END IF;
    INSERT INTO pending_instances AS p (instance_id, visible_at_ms, claimable_at_ms, locked_until_ms,
                                        runnable, pinned_major, pinned_minor, pinned_patch)
    VALUES (p_instance_id, p_visible_at_ms, greatest(p_visible_at_ms, coalesce(v_lease, 0)), v_lease,
            p_starts OR v_facts.o_exists,
            v_facts.o_pinned_major, v_facts.o_pinned_minor, v_facts.o_pinned_patch)
    -- Another enqueue created the row first (this insert waited for it to commit).
    ON CONFLICT (instance_id) DO UPDATE
        SET visible_at_ms = least(p.visible_at_ms, EXCLUDED.visible_at_ms),
            claimable_at_ms = CASE WHEN p.locked_until_ms > now_ms()
                                   THEN p.claimable_at_ms
                                   ELSE least(p.claimable_at_ms, EXCLUDED.visible_at_ms) END,
            runnable = p.runnable OR EXCLUDED.runnable
        WHERE p.visible_at_ms > EXCLUDED.visible_at_ms
           OR (EXCLUDED.runnable AND NOT p.runnable);
    RETURN FALSE;
END;
$fn$;

-- Statement trigger on orchestrator_queue: one call per instance, in id order (so two
-- multi-instance inserts take their row locks in the same order).
CREATE OR REPLACE FUNCTION pending_instances_on_enqueue()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    r RECORD;
BEGIN
    FOR r IN
        SELECT n.instance_id,
               min(n.visible_at_ms) AS visible_at_ms,
               bool_or(n.kind IN ('StartOrchestration', 'ContinueAsNew')) AS starts,
               bool_and(n.kind = 'QueueMessage') AS only_queue_messages
        FROM new_rows n
        GROUP BY n.instance_id
        ORDER BY n.instance_id
    LOOP
        PERFORM pending_note_messages(r.instance_id, r.visible_at_ms, r.starts);
        -- The contract's orphan rule: QueueMessages for an instance that does not exist
        -- (and has nothing else queued) are dropped, as a claim of them would drop them.
        -- Other messages (events raised before the start, completions) wait for it.
        IF r.only_queue_messages
           AND NOT EXISTS (SELECT 1 FROM pending_instances p
                           WHERE p.instance_id = r.instance_id AND p.runnable)
           AND NOT EXISTS (SELECT 1 FROM orchestrator_queue q
                           WHERE q.instance_id = r.instance_id AND q.kind <> 'QueueMessage') THEN
            DELETE FROM orchestrator_queue q
            WHERE q.instance_id = r.instance_id
              AND q.id IN (SELECT n.id FROM new_rows n WHERE n.instance_id = r.instance_id);
            PERFORM pending_refresh(r.instance_id);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$fn$;

-- A statement whose writer keeps the claim state itself (it already holds the row and
-- knows what its message needs: the worker ack) sets claim_state_kept for the length of
-- its INSERT, and the trigger is not called at all. Every other writer, of any release,
-- goes through the trigger.
DROP TRIGGER IF EXISTS pending_instances_on_enqueue ON orchestrator_queue;
CREATE TRIGGER pending_instances_on_enqueue
    AFTER INSERT ON orchestrator_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (current_setting('duroxide_pg_hybrid.claim_state_kept', TRUE) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION pending_instances_on_enqueue();

-- Recomputes an instance's row exactly from its queued messages (deleting it when none
-- are left), unless an enqueue in flight holds it. Returns FALSE in that case: the
-- caller leaves the row claimable (the enqueue's message will be there).
CREATE OR REPLACE FUNCTION pending_refresh(p_instance_id TEXT)
RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = auto
AS $fn$
DECLARE
    v_now        BIGINT;
    v_next       BIGINT;
    v_next_start BIGINT;
    v_lease      BIGINT;
    v_facts      RECORD;
    v_runnable   BOOLEAN;
    v_claimable  BIGINT;
BEGIN
    PERFORM 1 FROM pending_instances p WHERE p.instance_id = p_instance_id
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM pending_instances p WHERE p.instance_id = p_instance_id) THEN
            RETURN FALSE;
        END IF;
        -- No row: heal one that is missing (it should not be) through the enqueue path.
        SELECT min(q.visible_at_ms),
               bool_or(q.kind IN ('StartOrchestration', 'ContinueAsNew'))
        INTO v_next, v_runnable
        FROM orchestrator_queue q WHERE q.instance_id = p_instance_id;
        IF v_next IS NOT NULL THEN
            PERFORM pending_note_messages(p_instance_id, v_next, v_runnable);
        END IF;
        RETURN TRUE;
    END IF;

    v_now := now_ms();
    SELECT min(q.visible_at_ms),
           min(q.visible_at_ms) FILTER (WHERE q.kind IN ('StartOrchestration', 'ContinueAsNew'))
    INTO v_next, v_next_start
    FROM orchestrator_queue q WHERE q.instance_id = p_instance_id;
    IF v_next IS NULL THEN
        DELETE FROM pending_instances p WHERE p.instance_id = p_instance_id;
        RETURN TRUE;
    END IF;

    SELECT * INTO v_facts FROM pending_instance_facts(p_instance_id);
    SELECT l.locked_until_ms INTO v_lease FROM instance_locks l
    WHERE l.instance_id = p_instance_id AND l.locked_until_ms > v_now;
    -- An instance that does not exist yet can run once its start message is visible.
    v_runnable := v_facts.o_exists OR v_next_start IS NOT NULL;
    v_claimable := CASE WHEN v_facts.o_exists THEN v_next ELSE greatest(v_next, v_next_start) END;
    UPDATE pending_instances p
    SET visible_at_ms = v_next,
        claimable_at_ms = greatest(coalesce(v_claimable, v_next), coalesce(v_lease, 0)),
        locked_until_ms = v_lease,
        runnable = v_runnable,
        pinned_major = v_facts.o_pinned_major,
        pinned_minor = v_facts.o_pinned_minor,
        pinned_patch = v_facts.o_pinned_patch
    WHERE p.instance_id = p_instance_id;
    RETURN TRUE;
END;
$fn$;

-- A lease of p_instance_id ended (ack, abandon, released claim): make the row exact, or,
-- if an enqueue in flight holds it, claimable now (its visible_at_ms is a lower bound)
-- and wake a fetch for it: that enqueue's message is not visible to this transaction, so
-- the ack's own wake-up count misses it, and a worker ack that found the instance
-- claimable before this turn claimed it does not wake anyone itself (09_handover.sql).
CREATE OR REPLACE FUNCTION pending_after_turn(p_instance_id TEXT)
RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    IF NOT pending_refresh(p_instance_id) THEN
        UPDATE pending_instances p
        SET locked_until_ms = NULL, claimable_at_ms = p.visible_at_ms
        WHERE p.instance_id = p_instance_id;
        PERFORM notify_work_available('orchestrator', 1);
    END IF;
END;
$fn$;

-- Statement trigger on instance_locks: a lease ended (ack, abandon, released claim,
-- delete), whichever release's statement ended it, so the instance's claim state never
-- waits for the old lease's expiry.
CREATE OR REPLACE FUNCTION pending_instances_on_lease_end()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance TEXT;
BEGIN
    FOR v_instance IN
        SELECT DISTINCT e.instance_id FROM ended_leases e ORDER BY e.instance_id
    LOOP
        PERFORM pending_after_turn(v_instance);
    END LOOP;
    RETURN NULL;
END;
$fn$;

DROP TRIGGER IF EXISTS pending_instances_on_lease_end ON instance_locks;
CREATE TRIGGER pending_instances_on_lease_end
    AFTER DELETE ON instance_locks
    REFERENCING OLD TABLE AS ended_leases
    FOR EACH STATEMENT EXECUTE FUNCTION pending_instances_on_lease_end();

-- Heal rows missing for messages queued before the trigger existed (first application,
-- or writers of an older release between its migration and this file). The trigger DDL
-- above locks orchestrator_queue against inserts until this transaction commits, so
-- nothing can slip between this and the trigger.
INSERT INTO pending_instances AS p (instance_id, visible_at_ms, claimable_at_ms, locked_until_ms,
                                    runnable, pinned_major, pinned_minor, pinned_patch)
SELECT g.instance_id, g.visible_at_ms,
       greatest(g.visible_at_ms, coalesce(l.locked_until_ms, 0)), l.locked_until_ms,
       g.starts OR f.o_exists, f.o_pinned_major, f.o_pinned_minor, f.o_pinned_patch
FROM (
    SELECT q.instance_id, min(q.visible_at_ms) AS visible_at_ms,
           bool_or(q.kind IN ('StartOrchestration', 'ContinueAsNew')) AS starts
    FROM orchestrator_queue q
    GROUP BY q.instance_id
) g
CROSS JOIN LATERAL pending_instance_facts(g.instance_id) f
LEFT JOIN instance_locks l ON l.instance_id = g.instance_id AND l.locked_until_ms > now_ms()
ON CONFLICT (instance_id) DO NOTHING;
