-- sp_fetch_and_lock: claim one runnable orchestration instance and its visible messages
-- in ONE round trip. It returns keys only; the hybrid path then reads messages, metadata,
-- history and the KV snapshot with plain SQL, concurrently.
--
-- Output columns carry an `o_` prefix: a RETURNS TABLE column named like a table column
-- becomes a PL/pgSQL variable and makes every unqualified reference ambiguous (the
-- failure recorded in the seed document).
--
-- Claim protocol, per candidate:
--   1. oldest visible queue row (visible_at, id) not tagged by a live turn, of an
--      instance not tried yet in this call: FOR UPDATE SKIP LOCKED; then the capability
--      filter;
--   2. pg_try_advisory_xact_lock on (schema, instance), in a subtransaction together
--      with step 1: a concurrent claim of the same instance is skipped, not waited for,
--      and the skipped candidate's row lock is released at once;
--   3. take the lease row without waiting (FOR UPDATE SKIP LOCKED) and renew it only if
--      it expired, or insert it; busy or live = next candidate;
--   4. an instance nobody can run yet (no metadata, no history start, no start message)
--      is skipped; if its batch is only QueueMessages they are orphans and are deleted;
--   5. tag every visible message with the token and count the attempt.
-- A lost candidate never turns into "no work": the loop moves to the next one. And a
-- claim never waits for a lock another transaction holds (SKIP LOCKED and try-locks
-- only), so claims cannot take part in a deadlock.
--
-- Always returns exactly one row. With nothing claimed, o_instance_id is NULL and
-- o_next_wake_ms says when work may next become claimable without any new write (the
-- earliest future visible_at or lease expiry, NULL = never): a long-polling caller
-- sleeps until then or until a notification, using the database clock (o_now_ms) so
-- that its own clock never matters.
CREATE FUNCTION sp_fetch_and_lock(
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_max_candidates   INT DEFAULT 64
)
RETURNS TABLE (
    o_instance_id    TEXT,
    o_lock_token     TEXT,
    o_execution_id   BIGINT,
    o_attempt_count  INT,
    o_now_ms         BIGINT,
    o_next_wake_ms   BIGINT,
    -- Candidates passed over (held by a concurrent claim, lost lease race, not runnable)
    -- before this result: the claim-contention signal.
    o_skipped        INT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_now        BIGINT;
    v_instance   TEXT;
    v_token      TEXT;
    v_tried      TEXT[] := '{}';
    v_won        INT;
    v_until      BIGINT;
    v_found      BOOLEAN;
    v_at         BIGINT;
    v_id         BIGINT;
    v_stale      TEXT;
    v_expired    TEXT[];
    v_stale_at   BIGINT;
    v_stale_id   BIGINT;
    v_runnable   BOOLEAN;
    v_attempts   INT;
    v_exec       BIGINT;
    v_lock_space INT := instance_lock_space();
BEGIN
    FOR i IN 1 .. p_max_candidates LOOP
        v_now := now_ms();

        -- The candidate is chosen and try-locked in a subtransaction: if another claim
        -- is taking the same instance, the block is undone, which also releases the
        -- candidate's row lock at once. No claim ever sleeps on a lock while holding a
        -- candidate row, so none can deadlock with another claim or an ack.
        BEGIN
            -- Oldest visible row not tagged by a turn, of an instance without a live
            -- lease. Tagged rows are not in this index at all, so a leased instance
            -- holding a deep backlog costs nothing here.
            SELECT q.instance_id, q.visible_at_ms, q.id INTO v_instance, v_at, v_id
            FROM orchestrator_queue q
            WHERE q.lock_token IS NULL
              AND q.visible_at_ms <= v_now
              AND q.instance_id <> ALL (v_tried)
              AND NOT EXISTS (
                  SELECT 1 FROM instance_locks l
                  WHERE l.instance_id = q.instance_id AND l.locked_until_ms > v_now)
            ORDER BY q.visible_at_ms, q.id
            LIMIT 1
            FOR UPDATE OF q SKIP LOCKED;
            v_found := FOUND;

            -- Oldest row still tagged by a lease that ran out (its worker crashed or
            -- stalled): found through the few expired leases (the tokens first, so no
            -- plan can choose to walk the queue instead), usually none.
            SELECT array_agg(l.lock_token) INTO v_expired
            FROM instance_locks l WHERE l.locked_until_ms <= v_now;
            v_stale := NULL;
            IF v_expired IS NOT NULL THEN
                SELECT q.instance_id, q.visible_at_ms, q.id INTO v_stale, v_stale_at, v_stale_id
                FROM orchestrator_queue q
                WHERE q.lock_token = ANY (v_expired)
                  AND q.visible_at_ms <= v_now
                  AND q.instance_id <> ALL (v_tried)
                ORDER BY q.visible_at_ms, q.id
                LIMIT 1;
            END IF;
            IF v_stale IS NOT NULL AND (NOT v_found OR (v_stale_at, v_stale_id) < (v_at, v_id)) THEN
                PERFORM 1 FROM orchestrator_queue q WHERE q.id = v_stale_id FOR UPDATE SKIP LOCKED;
                IF FOUND THEN
                    v_instance := v_stale;
                    v_found := TRUE;
                ELSE
                    v_tried := v_tried || v_stale;
                    RAISE EXCEPTION USING ERRCODE = 'DX100';
                END IF;
            END IF;

            EXIT WHEN NOT v_found;
            v_tried := v_tried || v_instance;

            IF NOT pg_try_advisory_xact_lock(v_lock_space, hashtext(v_instance)) THEN
                RAISE EXCEPTION USING ERRCODE = 'DX100';
            END IF;
        EXCEPTION WHEN SQLSTATE 'DX100' THEN
            CONTINUE;
        END;

        -- Capability filter (first range only; no pin = compatible), checked before
        -- anything is leased or read.
        CONTINUE WHEN p_filter_enabled AND EXISTS (
            SELECT 1
            FROM instances i
            JOIN executions e
              ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
            WHERE i.instance_id = v_instance
              AND e.pinned_major IS NOT NULL
              AND NOT ((e.pinned_major, e.pinned_minor, e.pinned_patch)
                           >= (p_min_major, p_min_minor, p_min_patch)
                   AND (e.pinned_major, e.pinned_minor, e.pinned_patch)
                           <= (p_max_major, p_max_minor, p_max_patch)));

        -- The lease row is taken without waiting: if an ack, renew, abandon or delete of
        -- this instance holds it right now, the instance is busy and the next candidate
        -- is tried. (Waiting here while holding the candidate row could deadlock with
        -- an ack deleting that row.)
        v_token := 'lock_' || gen_random_uuid()::TEXT;
        v_now := now_ms();
        SELECT l.locked_until_ms INTO v_until
        FROM instance_locks l WHERE l.instance_id = v_instance
        FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            -- A lease committed after the candidate scan's snapshot is still live.
            CONTINUE WHEN v_until > v_now;
            UPDATE instance_locks l
            SET lock_token = v_token, locked_until_ms = v_now + p_lock_timeout_ms, locked_at_ms = v_now
            WHERE l.instance_id = v_instance;
        ELSIF EXISTS (SELECT 1 FROM instance_locks l WHERE l.instance_id = v_instance) THEN
            CONTINUE;
        ELSE
            -- Lease rows are only inserted under the advisory lock held above, so this
            -- cannot wait on a concurrent insert.
            INSERT INTO instance_locks (instance_id, lock_token, locked_until_ms, locked_at_ms)
            VALUES (v_instance, v_token, v_now + p_lock_timeout_ms, v_now)
            ON CONFLICT (instance_id) DO NOTHING;
            GET DIAGNOSTICS v_won = ROW_COUNT;
            CONTINUE WHEN v_won = 0;
        END IF;

        SELECT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = v_instance)
            OR EXISTS (SELECT 1 FROM history h
                       WHERE h.instance_id = v_instance AND h.event_type = 'OrchestrationStarted')
            OR EXISTS (SELECT 1 FROM orchestrator_queue q
                       WHERE q.instance_id = v_instance AND q.visible_at_ms <= v_now
                         AND q.kind IN ('StartOrchestration', 'ContinueAsNew'))
        INTO v_runnable;

        IF NOT v_runnable THEN
            -- Events raised before the orchestration exists. QueueMessages alone are
            -- orphans by contract and are dropped; anything else (a completion racing
            -- its start) stays queued for a later turn.
            IF NOT EXISTS (SELECT 1 FROM orchestrator_queue q
                           WHERE q.instance_id = v_instance AND q.visible_at_ms <= v_now
                             AND q.kind <> 'QueueMessage') THEN
                DELETE FROM orchestrator_queue q
                WHERE q.instance_id = v_instance AND q.visible_at_ms <= v_now;
            END IF;
            DELETE FROM instance_locks l WHERE l.lock_token = v_token;
            CONTINUE;
        END IF;

        -- Every visible row of the instance joins the batch. This may wait, briefly, for
        -- another claim that is looking at one of these rows as a candidate: it holds
        -- it only until its try-lock on this instance fails.
        UPDATE orchestrator_queue q
        SET lock_token = v_token, attempt_count = q.attempt_count + 1
        WHERE q.instance_id = v_instance AND q.visible_at_ms <= v_now;

        SELECT max(q.attempt_count) INTO v_attempts
        FROM orchestrator_queue q WHERE q.lock_token = v_token;

        IF v_attempts IS NULL THEN
            -- The messages were acked or deleted between the scan and the tagging.
            DELETE FROM instance_locks l WHERE l.lock_token = v_token;
            CONTINUE;
        END IF;

        SELECT coalesce(
                   (SELECT i.current_execution_id FROM instances i WHERE i.instance_id = v_instance),
                   (SELECT max(e.execution_id) FROM executions e WHERE e.instance_id = v_instance),
                   1)
        INTO v_exec;

        o_instance_id := v_instance;
        o_lock_token := v_token;
        o_execution_id := v_exec;
        o_attempt_count := v_attempts;
        o_now_ms := v_now;
        o_skipped := cardinality(v_tried) - 1;
        RETURN NEXT;
        RETURN;
    END LOOP;

    o_now_ms := now_ms();
    o_skipped := cardinality(v_tried);
    IF cardinality(v_tried) >= p_max_candidates THEN
        -- Every candidate of this call was lost or skipped; more may be waiting. Not
        -- "now": if they are all incompatible with the filter, a waiting caller would spin.
        o_next_wake_ms := o_now_ms + 20;
    ELSE
        o_next_wake_ms := least(
            (SELECT min(q.visible_at_ms) FROM orchestrator_queue q WHERE q.visible_at_ms > o_now_ms),
            (SELECT min(l.locked_until_ms) FROM instance_locks l WHERE l.locked_until_ms > o_now_ms));
    END IF;
    RETURN NEXT;
END;
$fn$;
