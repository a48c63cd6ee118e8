-- revision: 7
-- The claim: sp_fetch_and_lock and its steps.
--
-- sp_fetch_and_lock claims one runnable orchestration instance and its visible messages
-- in ONE round trip and returns the keys, the claimed messages (the rows it tags anyway)
-- and the instance row's name and version (read for the capability filter anyway); the
-- hybrid path then reads the history and KV snapshot with plain SQL, concurrently
-- (fetch_orchestration_turn reads them in the same call). Revision 7 added the batch
-- and the name to the result (claim_instance's and sp_fetch_and_lock's return types
-- change, so both are dropped and created; callers that name their columns, releases
-- before this one included, are unaffected).
--
-- It picks instances, not queue rows: claim_pick is one indexed FOR NO KEY UPDATE SKIP
-- LOCKED scan over pending_instances, so instances that cannot run (orphans, pinned
-- outside the caller's range, turn in progress) are excluded by the index and cost
-- nothing however many there are. Each picked instance then goes through claim_instance:
--   1. the per-instance advisory try-lock (also taken by deletes and by earlier
--      releases' claims); a lost one moves on to the next candidate;
--   2. the lease row (instance_locks) without waiting: a live lease the claim state did
--      not know about is recorded (the instance is not picked again before it ends);
--   3. the exact capability filter on the current execution (a stale pin mirror is
--      corrected);
--   4. runnable: an instance that does not exist yet and has no start message visible
--      is corrected to not runnable (QueueMessage-only batches are dropped, as the
--      contract says);
--   5. lease and tag every visible message; nothing visible = the row was a lower bound:
--      corrected, next candidate.
-- A lost or corrected candidate never turns into "no work": the loop goes on. Nothing
-- here waits for a lock (SKIP LOCKED, try-locks), so claims cannot deadlock.
--
-- Output columns carry an `o_` prefix: a RETURNS TABLE column named like a table column
-- becomes a PL/pgSQL variable and makes every unqualified reference ambiguous (the
-- failure recorded in the seed document).

-- Version groups that have claimable work now, for a caller with a capability filter:
-- unpinned instances (always compatible) and each distinct pinned version inside the
-- range, with the oldest claimable_at_ms of each. Distinct versions are found by
-- skipping through pending_instances_pinned_idx (one probe per version), so their cost
-- does not grow with the number of instances. PL/pgSQL rather than SQL for this and the
-- other small helpers: PL/pgSQL keeps their plans per session, a SQL function called
-- from PL/pgSQL is planned again on every call.
CREATE OR REPLACE FUNCTION claim_groups(
    p_now_ms BIGINT,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT
)
RETURNS TABLE (o_unpinned BOOLEAN, o_major INT, o_minor INT, o_patch INT, o_oldest_ms BIGINT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    WITH RECURSIVE versions (major, minor, patch) AS (
        (SELECT p.pinned_major, p.pinned_minor, p.pinned_patch
         FROM pending_instances p
         WHERE p.runnable AND p.pinned_major IS NOT NULL
           AND (p.pinned_major, p.pinned_minor, p.pinned_patch) >= (p_min_major, p_min_minor, p_min_patch)
           AND (p.pinned_major, p.pinned_minor, p.pinned_patch) <= (p_max_major, p_max_minor, p_max_patch)
         ORDER BY p.pinned_major, p.pinned_minor, p.pinned_patch
         LIMIT 1)
        UNION ALL
        SELECT n.major, n.minor, n.patch
        FROM versions v
        CROSS JOIN LATERAL (
            SELECT p.pinned_major AS major, p.pinned_minor AS minor, p.pinned_patch AS patch
            FROM pending_instances p
            WHERE p.runnable AND p.pinned_major IS NOT NULL
              AND (p.pinned_major, p.pinned_minor, p.pinned_patch) > (v.major, v.minor, v.patch)
              AND (p.pinned_major, p.pinned_minor, p.pinned_patch) <= (p_max_major, p_max_minor, p_max_patch)
            ORDER BY p.pinned_major, p.pinned_minor, p.pinned_patch
            LIMIT 1
        ) n
    )
    SELECT FALSE, v.major, v.minor, v.patch, o.oldest
    FROM versions v
    CROSS JOIN LATERAL (
        SELECT min(p.claimable_at_ms) AS oldest
        FROM pending_instances p
        WHERE p.runnable AND p.pinned_major IS NOT NULL
          AND p.pinned_major = v.major AND p.pinned_minor = v.minor AND p.pinned_patch = v.patch
          AND p.claimable_at_ms <= p_now_ms
    ) o
    WHERE o.oldest IS NOT NULL
    UNION ALL
    SELECT TRUE, NULL, NULL, NULL, o.oldest
    FROM (
        SELECT min(p.claimable_at_ms) AS oldest
        FROM pending_instances p
        WHERE p.runnable AND p.pinned_major IS NULL AND p.claimable_at_ms <= p_now_ms
    ) o
    WHERE o.oldest IS NOT NULL;
END;
$fn$;

-- The oldest claimable instance the filter admits that no other transaction holds and
-- this call has not tried yet, row-locked (FOR NO KEY UPDATE: enqueues' KEY SHARE locks
-- do not make it skip a busy instance). NULL = none.
CREATE OR REPLACE FUNCTION claim_pick(
    p_now_ms BIGINT,
    p_filter_enabled BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_tried TEXT[]
)
RETURNS TEXT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance TEXT;
    v_group    RECORD;
BEGIN
    IF NOT p_filter_enabled THEN
        SELECT p.instance_id INTO v_instance
        FROM pending_instances p
        WHERE p.runnable AND p.claimable_at_ms <= p_now_ms
          AND p.instance_id <> ALL (p_tried)
        ORDER BY p.claimable_at_ms
        LIMIT 1
        FOR NO KEY UPDATE SKIP LOCKED;
        RETURN v_instance;
    END IF;

    -- The common case first: among the 32 oldest claimable instances, the oldest the
    -- filter admits that nobody holds. One statement; its cost is bounded whatever lies
    -- behind those 32. Only when none of them qualifies (instances pinned outside the
    -- range at the front, or all held) do the version groups below find the rest.
    SELECT p.instance_id INTO v_instance
    FROM pending_instances p
    WHERE p.instance_id IN (
              SELECT f.instance_id
              FROM (SELECT c.instance_id, c.pinned_major, c.pinned_minor, c.pinned_patch
                    FROM pending_instances c
                    WHERE c.runnable AND c.claimable_at_ms <= p_now_ms
                    ORDER BY c.claimable_at_ms
                    LIMIT 32) f
              WHERE f.pinned_major IS NULL
                 OR ((f.pinned_major, f.pinned_minor, f.pinned_patch) >= (p_min_major, p_min_minor, p_min_patch)
                     AND (f.pinned_major, f.pinned_minor, f.pinned_patch) <= (p_max_major, p_max_minor, p_max_patch)))
      AND p.runnable AND p.claimable_at_ms <= p_now_ms
      AND p.instance_id <> ALL (p_tried)
      AND (p.pinned_major IS NULL
           OR ((p.pinned_major, p.pinned_minor, p.pinned_patch) >= (p_min_major, p_min_minor, p_min_patch)
               AND (p.pinned_major, p.pinned_minor, p.pinned_patch) <= (p_max_major, p_max_minor, p_max_patch)))
    ORDER BY p.claimable_at_ms
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED;
    IF v_instance IS NOT NULL THEN
        RETURN v_instance;
    END IF;

    FOR v_group IN
        SELECT g.* FROM claim_groups(p_now_ms, p_min_major, p_min_minor, p_min_patch,
                                     p_max_major, p_max_minor, p_max_patch) g
        ORDER BY g.o_oldest_ms
    LOOP
        IF v_group.o_unpinned THEN
            SELECT p.instance_id INTO v_instance
            FROM pending_instances p
            WHERE p.runnable AND p.pinned_major IS NULL AND p.claimable_at_ms <= p_now_ms
              AND p.instance_id <> ALL (p_tried)
            ORDER BY p.claimable_at_ms
            LIMIT 1
            FOR NO KEY UPDATE SKIP LOCKED;
        ELSE
            SELECT p.instance_id INTO v_instance
            FROM pending_instances p
            WHERE p.runnable AND p.pinned_major IS NOT NULL
              AND p.pinned_major = v_group.o_major AND p.pinned_minor = v_group.o_minor
              AND p.pinned_patch = v_group.o_patch
              AND p.claimable_at_ms <= p_now_ms
              AND p.instance_id <> ALL (p_tried)
            ORDER BY p.claimable_at_ms
            LIMIT 1
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF v_instance IS NOT NULL THEN
            RETURN v_instance;
        END IF;
    END LOOP;
    RETURN NULL;
END;
$fn$;

-- Is any instance the filter admits claimable now (locked by others or not)? Asked by
-- an empty claim that skipped something, to tell "retry soon" from "sleep".
CREATE OR REPLACE FUNCTION claim_work_exists(
    p_now_ms BIGINT,
    p_filter_enabled BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT
)
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    IF p_filter_enabled THEN
        RETURN EXISTS (SELECT 1 FROM claim_groups(p_now_ms, p_min_major, p_min_minor, p_min_patch,
                                                  p_max_major, p_max_minor, p_max_patch));
    END IF;
    RETURN EXISTS (SELECT 1 FROM pending_instances p
                   WHERE p.runnable AND p.claimable_at_ms <= p_now_ms);
END;
$fn$;

-- When an idle caller should look again without a new write: the earliest future
-- claimable time (a timer, a lease end). NULL = never.
CREATE OR REPLACE FUNCTION claim_next_wake(p_now_ms BIGINT)
RETURNS BIGINT
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN (SELECT min(p.claimable_at_ms) FROM pending_instances p
            WHERE p.runnable AND p.claimable_at_ms > p_now_ms);
END;
$fn$;

-- Steps 2-5 for one picked, try-locked instance. o_outcome:
--   'claimed'   leased and tagged (o_attempt_count, o_execution_id, o_messages: the
--               tagged batch in queue order, o_has_instance and the instance row's
--               o_orchestration_name / o_orchestration_version set);
--   'skipped'   not claimable by this caller; its claim state was corrected;
--   'contended' another transaction is busy with it right now: look again soon.
DROP FUNCTION IF EXISTS claim_instance(TEXT, TEXT, BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT);
CREATE OR REPLACE FUNCTION claim_instance(
    p_instance_id      TEXT,
    p_lock_token       TEXT,
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    OUT o_outcome        TEXT,
    OUT o_attempt_count  INT,
    OUT o_execution_id   BIGINT,
    OUT o_messages       TEXT[],
    OUT o_has_instance   BOOLEAN,
    OUT o_orchestration_name     TEXT,
    OUT o_orchestration_version  TEXT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = auto
AS $fn$
DECLARE
    v_now      BIGINT := now_ms();
    v_until    BIGINT;
    v_has_row  BOOLEAN;
    v_current  RECORD;
    v_exists   BOOLEAN;
    v_runnable BOOLEAN;
    v_tagged   BIGINT;
BEGIN
    -- 2. The lease row, without waiting: an ack, renew, abandon or delete holding it
    --    means the instance is busy.
    SELECT l.locked_until_ms INTO v_until
    FROM instance_locks l WHERE l.instance_id = p_instance_id
    FOR UPDATE SKIP LOCKED;
    v_has_row := FOUND;
    IF v_has_row AND v_until > v_now THEN
        UPDATE pending_instances p
        SET locked_until_ms = v_until, claimable_at_ms = greatest(p.claimable_at_ms, v_until)
        WHERE p.instance_id = p_instance_id;
        o_outcome := 'skipped';
        RETURN;
    END IF;
    IF NOT v_has_row AND EXISTS (SELECT 1 FROM instance_locks l WHERE l.instance_id = p_instance_id) THEN
        o_outcome := 'contended';
        RETURN;
    END IF;

    -- The instance row and its current execution, read once for steps 3 to 5.
    SELECT i.current_execution_id, e.pinned_major, e.pinned_minor, e.pinned_patch,
           i.orchestration_name, i.orchestration_version
    INTO v_current
    FROM instances i
    LEFT JOIN executions e
           ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
    WHERE i.instance_id = p_instance_id;
    v_exists := FOUND;

    -- 3. Capability filter on the current execution (first range only; no pin =
    --    compatible), before anything is leased or read.
    IF p_filter_enabled AND v_current.pinned_major IS NOT NULL
       AND NOT ((v_current.pinned_major, v_current.pinned_minor, v_current.pinned_patch)
                    >= (p_min_major, p_min_minor, p_min_patch)
            AND (v_current.pinned_major, v_current.pinned_minor, v_current.pinned_patch)
                    <= (p_max_major, p_max_minor, p_max_patch)) THEN
        UPDATE pending_instances p
        SET pinned_major = v_current.pinned_major, pinned_minor = v_current.pinned_minor,
            pinned_patch = v_current.pinned_patch
        WHERE p.instance_id = p_instance_id;
        o_outcome := 'skipped';
        RETURN;
    END IF;

    -- 4. Runnable: the instance exists, or its start message is visible.
    v_runnable := v_exists
        OR EXISTS (SELECT 1 FROM history h
                   WHERE h.instance_id = p_instance_id AND h.event_type = 'OrchestrationStarted')
        OR EXISTS (SELECT 1 FROM orchestrator_queue q
                   WHERE q.instance_id = p_instance_id AND q.visible_at_ms <= v_now
                     AND q.kind IN ('StartOrchestration', 'ContinueAsNew'));
    IF NOT v_runnable THEN
        -- Messages for an instance that does not exist: QueueMessages alone are dropped
        -- (the contract's orphan rule); anything else waits for the start, outside the
        -- claim indexes.
        IF NOT EXISTS (SELECT 1 FROM orchestrator_queue q
                       WHERE q.instance_id = p_instance_id AND q.visible_at_ms <= v_now
                         AND q.kind <> 'QueueMessage') THEN
            DELETE FROM orchestrator_queue q
            WHERE q.instance_id = p_instance_id AND q.visible_at_ms <= v_now
              AND q.kind = 'QueueMessage';
        END IF;
        o_outcome := CASE WHEN pending_refresh(p_instance_id) THEN 'skipped' ELSE 'contended' END;
        RETURN;
    END IF;

    -- 5. Lease (a new row, or take over an expired one) and tag the batch.
    IF v_has_row THEN
        UPDATE instance_locks l
        SET lock_token = p_lock_token, locked_until_ms = v_now + p_lock_timeout_ms, locked_at_ms = v_now
        WHERE l.instance_id = p_instance_id;
    ELSE
        INSERT INTO instance_locks (instance_id, lock_token, locked_until_ms, locked_at_ms)
        VALUES (p_instance_id, p_lock_token, v_now + p_lock_timeout_ms, v_now)
        ON CONFLICT (instance_id) DO NOTHING;
        IF NOT FOUND THEN
            o_outcome := 'contended';
            RETURN;
        END IF;
    END IF;

    WITH tagged AS (
        UPDATE orchestrator_queue q
        SET lock_token = p_lock_token, attempt_count = q.attempt_count + 1
        WHERE q.instance_id = p_instance_id AND q.visible_at_ms <= v_now
        RETURNING q.id, q.attempt_count, q.work_item
    )
    SELECT count(*), max(t.attempt_count), array_agg(t.work_item ORDER BY t.id)
    INTO v_tagged, o_attempt_count, o_messages FROM tagged t;
    IF v_tagged = 0 THEN
        -- The claim state promised more than the queue holds (messages acked, deleted or
        -- delayed since): give the lease back (the lease-end trigger corrects the state)
        -- and check the correction happened.
        DELETE FROM instance_locks l WHERE l.lock_token = p_lock_token;
        IF pending_refresh(p_instance_id) THEN
            o_outcome := 'skipped';
        ELSE
            UPDATE pending_instances p SET claimable_at_ms = v_now + 10
            WHERE p.instance_id = p_instance_id;
            o_outcome := 'contended';
        END IF;
        RETURN;
    END IF;

    UPDATE pending_instances p
    SET locked_until_ms = v_now + p_lock_timeout_ms, claimable_at_ms = v_now + p_lock_timeout_ms
    WHERE p.instance_id = p_instance_id;

    o_execution_id := coalesce(
        v_current.current_execution_id,
        (SELECT max(e.execution_id) FROM executions e WHERE e.instance_id = p_instance_id),
        1);
    o_has_instance := v_exists;
    o_orchestration_name := v_current.orchestration_name;
    o_orchestration_version := v_current.orchestration_version;
    o_outcome := 'claimed';
END;
$fn$;

-- Always returns exactly one row. With nothing claimed, o_instance_id is NULL and
-- o_next_wake_ms says when to look again without a new write: soon when this call
-- skipped claimable work another transaction was busy with, else the earliest future
-- claimable time (NULL = never). Callers sleep on the database clock (o_now_ms), so
-- their own clocks never matter. p_max_candidates bounds the instances one call
-- examines.
--
-- p_lock_token: the lease's token, chosen by the caller (NULL: made here), so that a
-- resend of a call whose reply was lost (p_resend, same token) can be answered: when
-- the first attempt committed and its lease is still live, the resend returns that
-- claim (same instance, batch and attempt count) instead of claiming another instance
-- and leaving the first leased until it expires. Otherwise the resend claims as usual,
-- under a token made here (rows the first attempt may have left with the caller's token,
-- an expired lease and its tagged batch, must never be taken for the new claim's).
-- Revision 6 added both arguments; the signature without them is dropped (earlier
-- callers, positional or named, resolve to this one through the defaults). Revision 7
-- added o_messages, o_has_instance, o_orchestration_name and o_orchestration_version
-- (claim_instance's; a resend reads them again): a new return type, so the function is
-- dropped and created.
DROP FUNCTION IF EXISTS sp_fetch_and_lock(BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT, INT);
DROP FUNCTION IF EXISTS sp_fetch_and_lock(BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT, INT,
                                          TEXT, BOOLEAN);
CREATE OR REPLACE FUNCTION sp_fetch_and_lock(
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_max_candidates   INT DEFAULT 64,
    p_lock_token       TEXT DEFAULT NULL,
    p_resend           BOOLEAN DEFAULT FALSE
)
RETURNS TABLE (
    o_instance_id    TEXT,
    o_lock_token     TEXT,
    o_execution_id   BIGINT,
    o_attempt_count  INT,
    o_now_ms         BIGINT,
    o_next_wake_ms   BIGINT,
    -- Instances examined and passed over before this result: the contention signal.
    o_skipped        INT,
    o_messages       TEXT[],
    o_has_instance   BOOLEAN,
    o_orchestration_name     TEXT,
    o_orchestration_version  TEXT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance   TEXT;
    v_token      TEXT;
    v_tried      TEXT[] := '{}';
    v_step       RECORD;
    v_lock_space INT;
BEGIN
    o_now_ms := now_ms();
    IF p_resend AND p_lock_token IS NOT NULL THEN
        SELECT l.instance_id INTO v_instance
        FROM instance_locks l
        WHERE l.lock_token = p_lock_token AND l.locked_until_ms > o_now_ms;
        IF FOUND THEN
            o_instance_id := v_instance;
            o_lock_token := p_lock_token;
            -- As claim_instance's step 5 found them.
            o_execution_id := coalesce(
                (SELECT i.current_execution_id FROM instances i WHERE i.instance_id = v_instance),
                (SELECT max(e.execution_id) FROM executions e WHERE e.instance_id = v_instance),
                1);
            SELECT max(q.attempt_count), array_agg(q.work_item ORDER BY q.id)
            INTO o_attempt_count, o_messages
            FROM orchestrator_queue q
            WHERE q.lock_token = p_lock_token;
            SELECT TRUE, i.orchestration_name, i.orchestration_version
            INTO o_has_instance, o_orchestration_name, o_orchestration_version
            FROM instances i WHERE i.instance_id = v_instance;
            o_has_instance := coalesce(o_has_instance, FALSE);
            o_skipped := 0;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    -- Nothing claimable by anyone (every instance leased, waiting or idle: most empty
    -- claims of a busy fleet): one index probe answers, instead of the pick and the
    -- contention check, which would both find nothing.
    IF NOT EXISTS (SELECT 1 FROM pending_instances p
                   WHERE p.runnable AND p.claimable_at_ms <= o_now_ms) THEN
        o_skipped := 0;
        o_next_wake_ms := claim_next_wake(o_now_ms);
        RETURN NEXT;
        RETURN;
    END IF;
    v_lock_space := instance_lock_space();
    FOR i IN 1 .. p_max_candidates LOOP
        v_instance := claim_pick(now_ms(), p_filter_enabled,
                                 p_min_major, p_min_minor, p_min_patch,
                                 p_max_major, p_max_minor, p_max_patch, v_tried);
        EXIT WHEN v_instance IS NULL;
        v_tried := v_tried || v_instance;
        -- A lost try-lock keeps the picked row locked until this call ends (a few
        -- milliseconds) instead of undoing the pick in a subtransaction: the holder of
        -- the advisory lock without the row (a delete, or a claim of an earlier
        -- release) is the only one that could want the row meanwhile, and it may wait;
        -- this call never waits for it. A subtransaction per claim cost more than that.
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(v_lock_space, hashtext(v_instance));

        -- (A candidate that is not claimed leaves no row with the token: see step 5.)
        v_token := CASE WHEN p_resend OR p_lock_token IS NULL
                        THEN 'lock_' || gen_random_uuid()::TEXT
                        ELSE p_lock_token END;
        SELECT * INTO v_step
        FROM claim_instance(v_instance, v_token, p_lock_timeout_ms, p_filter_enabled,
                            p_min_major, p_min_minor, p_min_patch,
                            p_max_major, p_max_minor, p_max_patch);
        IF v_step.o_outcome = 'claimed' THEN
            o_instance_id := v_instance;
            o_lock_token := v_token;
            o_execution_id := v_step.o_execution_id;
            o_attempt_count := v_step.o_attempt_count;
            o_messages := v_step.o_messages;
            o_has_instance := v_step.o_has_instance;
            o_orchestration_name := v_step.o_orchestration_name;
            o_orchestration_version := v_step.o_orchestration_version;
            o_now_ms := now_ms();
            o_skipped := cardinality(v_tried) - 1;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;

    o_now_ms := now_ms();
    o_skipped := cardinality(v_tried);
    -- Claimable work left means another transaction holds it right now (the pick skips
    -- locked rows without saying so), or there was more than this call could examine:
    -- look again shortly rather than sleep. Work this call corrected is no longer
    -- claimable, so this cannot spin on it.
    IF claim_work_exists(o_now_ms, p_filter_enabled,
                         p_min_major, p_min_minor, p_min_patch,
                         p_max_major, p_max_minor, p_max_patch) THEN
        o_next_wake_ms := o_now_ms + 10;
    ELSE
        o_next_wake_ms := claim_next_wake(o_now_ms);
    END IF;
    RETURN NEXT;
END;
$fn$;
