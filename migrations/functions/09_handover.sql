-- revision: 23
-- In-process hand-over: an ack that makes work runnable claims it, in the same call, for
-- a fetch of the acking process that is already waiting for exactly that kind of work
-- (src/handover.rs picks the waiters and passes what each can take). The claims are the
-- ones a fetch makes (claim_worker_item, claim_instance), so a handed-over item carries
-- the same lease, attempt count and session ownership as a fetched one.
--
--   * ack_orchestration_handover: ack_orchestration_item, then one worker claim per
--     waiting worker fetch; notifications only for the items nobody here took.
--   * ack_work_item_handover: the worker ack (every worker ack of this release goes
--     through it), then, when a local orchestration fetch waits, the claim of the
--     completed activity's instance, with the turn's reads on the procedure path.
--   * enqueue_orchestrator_handover: a client enqueue (a start, an event, a cancel) made
--     while a local orchestration fetch waits, then the claim of that instance's turn
--     the same way.
--
-- A waiter that is gone when the reply arrives gets nothing: the provider releases the
-- lease at once without counting the attempt (abandon with ignore-attempt).

-- The worker claim: an item whose lease expired, else the oldest visible, unleased item
-- (FIFO by (visible_at, id)) the tag filter and the session rules admit, leased. A session item is only leased if the
-- session upsert wins (unowned, expired, or already this owner's): otherwise nothing
-- changes. One row always: the leased item or NULLs; o_candidate says whether an item
-- was found at all (a lost session race: look again at once). With p_next_wake, a call
-- that leased nothing also says when to look again without a new write
-- (o_next_wake_ms: now after a lost session race, else the earliest future visible
-- time, lease expiry or session expiry; NULL = never).
-- p_tag_mode: 0 untagged only, 1 listed tags, 2 untagged and listed tags, 3 any.
--
-- Revision 12: steps in PL/pgSQL instead of one statement of CTEs, and the next wake-up
-- computed here instead of in the caller's query. PostgreSQL initializes every node of
-- a plan on each execution, used or not; the one statement carried the session upsert
-- (a second table and its indexes), six clock sub-plans and the caller's three
-- next-wake sub-plans into every claim. Profiled, executor start-up was a fifth of the
-- server's CPU under load. The old 7-argument signature is dropped (0.2.0 is
-- unreleased; 0.1.0 never called it).
--
-- Revision 17 added p_resend (the caller's resend of this call after a lost reply, same
-- p_lock_token): the item the first attempt leased under that token, if it committed, is
-- returned again instead of a second item being leased (the first would stay leased
-- until its lease ran out, and run with one attempt more). The 8-argument signature is
-- dropped; calls without p_resend resolve to this one.
DROP FUNCTION IF EXISTS claim_worker_item(TEXT, BIGINT, BOOLEAN, TEXT, BIGINT, INT, TEXT[]);
DROP FUNCTION IF EXISTS claim_worker_item(TEXT, BIGINT, BOOLEAN, TEXT, BIGINT, INT, TEXT[], BOOLEAN);
CREATE OR REPLACE FUNCTION claim_worker_item(
    p_lock_token               TEXT,
    p_lock_timeout_ms          BIGINT,
    p_has_session              BOOLEAN,
    p_owner_id                 TEXT,
    p_session_lock_timeout_ms  BIGINT,
    p_tag_mode                 INT,
    p_tags                     TEXT[],
    p_next_wake                BOOLEAN DEFAULT FALSE,
    p_resend                   BOOLEAN DEFAULT FALSE
)
RETURNS TABLE (
    o_work_item     TEXT,
    o_attempt_count INT,
    o_instance_id   TEXT,
    o_execution_id  BIGINT,
    o_activity_id   BIGINT,
    o_session_id    TEXT,
    o_tag           TEXT,
    o_now_ms        BIGINT,
    o_candidate     BOOLEAN,
    o_next_wake_ms  BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_id      BIGINT;
    v_session TEXT;
BEGIN
    o_now_ms := now_ms();
    IF p_resend THEN
        SELECT w.work_item, w.attempt_count, w.instance_id, w.execution_id, w.activity_id,
               w.session_id, w.tag
        INTO o_work_item, o_attempt_count, o_instance_id, o_execution_id, o_activity_id,
             o_session_id, o_tag
        FROM worker_queue w
        WHERE w.lock_token = p_lock_token;
        IF FOUND THEN
            o_candidate := TRUE;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    -- Two probes, each on an index that holds only its kind of candidate, so neither
    -- walks the dead index entries an item leaves behind when it is leased and acked
    -- (under load they pile up at the front of a whole-queue index faster than scans
    -- can mark them dead: the hot page keeps changing). First an item whose lease
    -- expired (its holder is gone; usually nothing: one probe of the lease index), then
    -- the oldest unleased one (worker_queue_unleased_idx). The second runs only when
    -- the first finds nothing.
    SELECT k.id, k.session_id INTO v_id, v_session
    FROM (
        SELECT * FROM (
            SELECT w.id, w.session_id
            FROM worker_queue w
            WHERE w.lock_token IS NOT NULL
              AND w.locked_until_ms <= o_now_ms
              AND w.visible_at_ms <= o_now_ms
              AND (p_tag_mode = 3
                   OR (p_tag_mode IN (0, 2) AND w.tag IS NULL)
                   OR (p_tag_mode IN (1, 2) AND w.tag = ANY (p_tags)))
              AND (w.session_id IS NULL OR (p_has_session AND NOT EXISTS (
                      SELECT 1 FROM sessions s
                      WHERE s.session_id = w.session_id
                        AND s.locked_until_ms > o_now_ms
                        AND s.worker_id <> p_owner_id)))
            ORDER BY w.locked_until_ms
            LIMIT 1
            FOR UPDATE OF w SKIP LOCKED
        ) expired
        UNION ALL
        SELECT * FROM (
            SELECT w.id, w.session_id
            FROM worker_queue w
            WHERE w.lock_token IS NULL
              AND w.visible_at_ms <= o_now_ms
              AND (p_tag_mode = 3
                   OR (p_tag_mode IN (0, 2) AND w.tag IS NULL)
                   OR (p_tag_mode IN (1, 2) AND w.tag = ANY (p_tags)))
              AND (w.session_id IS NULL OR (p_has_session AND NOT EXISTS (
                      SELECT 1 FROM sessions s
                      WHERE s.session_id = w.session_id
                        AND s.locked_until_ms > o_now_ms
                        AND s.worker_id <> p_owner_id)))
            ORDER BY w.visible_at_ms, w.id
            LIMIT 1
            FOR UPDATE OF w SKIP LOCKED
        ) unleased
    ) k
    LIMIT 1;
    o_candidate := FOUND;
    IF NOT o_candidate THEN
        IF p_next_wake THEN
            o_next_wake_ms := least(
                (SELECT min(w.visible_at_ms) FROM worker_queue w WHERE w.visible_at_ms > o_now_ms),
                (SELECT min(w.locked_until_ms) FROM worker_queue w
                  WHERE w.lock_token IS NOT NULL AND w.locked_until_ms > o_now_ms),
                (SELECT min(s.locked_until_ms) FROM sessions s WHERE s.locked_until_ms > o_now_ms));
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;

    IF v_session IS NOT NULL THEN
        INSERT INTO sessions AS s (session_id, worker_id, locked_until_ms, last_activity_at_ms)
        VALUES (v_session, p_owner_id, o_now_ms + p_session_lock_timeout_ms, o_now_ms)
        ON CONFLICT (session_id) DO UPDATE
            SET worker_id = EXCLUDED.worker_id,
                locked_until_ms = EXCLUDED.locked_until_ms,
                last_activity_at_ms = EXCLUDED.last_activity_at_ms
            WHERE s.locked_until_ms <= EXCLUDED.last_activity_at_ms
               OR s.worker_id = EXCLUDED.worker_id;
        IF NOT FOUND THEN
            -- Another owner holds the session: nothing leased, look again at once.
            o_next_wake_ms := CASE WHEN p_next_wake THEN o_now_ms END;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    UPDATE worker_queue w
    SET lock_token = p_lock_token, locked_until_ms = o_now_ms + p_lock_timeout_ms,
        attempt_count = w.attempt_count + 1
    WHERE w.id = v_id
    RETURNING w.work_item, w.attempt_count, w.instance_id, w.execution_id, w.activity_id,
              w.session_id, w.tag
    INTO o_work_item, o_attempt_count, o_instance_id, o_execution_id, o_activity_id,
         o_session_id, o_tag;
    RETURN NEXT;
END;
$fn$;

-- The claim of one given instance's turn (the instance a worker ack just made runnable),
-- with the steps of sp_fetch_and_lock for one candidate: its claim-state row if it is
-- runnable and claimable now (FOR NO KEY UPDATE SKIP LOCKED), the per-instance advisory
-- try-lock, then claim_instance (lease, capability filter, attempt count, batch). NULLs
-- when it cannot be claimed now (busy, leased, filtered out): the caller notifies
-- instead, and any fetch claims it as usual. p_ending_grace: the caller ends a fan-in
-- grace that holds the row (claimable later than its visible messages, no lease) and
-- takes the turn in the same write, the claim's lease; if the claim takes nothing, the
-- caller ends the grace itself. Revision 20 added it; the signature without it is
-- dropped (its callers are in this file). Revision 22 passes on claim_instance's batch
-- and instance name (o_messages, o_has_instance, o_orchestration_*: what a hybrid fetch
-- would otherwise read); a new return type, so it is dropped and created.
DROP FUNCTION IF EXISTS claim_instance_turn(TEXT, TEXT, BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT);
DROP FUNCTION IF EXISTS claim_instance_turn(TEXT, TEXT, BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT,
                                            BOOLEAN);
CREATE OR REPLACE FUNCTION claim_instance_turn(
    p_instance_id      TEXT,
    p_lock_token       TEXT,
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_ending_grace     BOOLEAN DEFAULT FALSE,
    OUT o_attempt_count  INT,
    OUT o_execution_id   BIGINT,
    OUT o_messages       TEXT[],
    OUT o_has_instance   BOOLEAN,
    OUT o_orchestration_name     TEXT,
    OUT o_orchestration_version  TEXT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_step RECORD;
BEGIN
    PERFORM 1 FROM pending_instances p
    WHERE p.instance_id = p_instance_id AND p.runnable
      AND (p.claimable_at_ms <= now_ms()
           OR (p_ending_grace AND p.visible_at_ms <= now_ms()
               AND coalesce(p.locked_until_ms, 0) <= now_ms()))
    FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND
       OR NOT pg_try_advisory_xact_lock(instance_lock_space(), hashtext(p_instance_id)) THEN
        RETURN;
    END IF;
    SELECT * INTO v_step
    FROM claim_instance(p_instance_id, p_lock_token, p_lock_timeout_ms, p_filter_enabled,
                        p_min_major, p_min_minor, p_min_patch,
                        p_max_major, p_max_minor, p_max_patch);
    IF v_step.o_outcome = 'claimed' THEN
        o_attempt_count := v_step.o_attempt_count;
        o_execution_id := v_step.o_execution_id;
        o_messages := v_step.o_messages;
        o_has_instance := v_step.o_has_instance;
        o_orchestration_name := v_step.o_orchestration_name;
        o_orchestration_version := v_step.o_orchestration_version;
    END IF;
END;
$fn$;

-- Drops up to 64 ledger rows older than 15 min. Callers run it for one call in 16 on
-- average (`IF random() < 0.0625`, at the call site so the other 15 pay no function
-- call): that keeps ahead of one insert per call without a statement on every call.
--
-- PL/pgSQL, not SQL (revision 19): a SQL function with a SET clause is parsed and planned
-- on every call; PL/pgSQL keeps the plan for the session.
CREATE OR REPLACE FUNCTION enqueue_ledger_prune(p_now_ms BIGINT) RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    DELETE FROM enqueue_ledger l
    WHERE l.enqueue_id IN (SELECT o.enqueue_id FROM enqueue_ledger o
                           WHERE o.created_at_ms < p_now_ms - 900000
                           ORDER BY o.created_at_ms LIMIT 64 FOR UPDATE SKIP LOCKED);
END;
$fn$;

-- ack_orchestration_item, then one worker claim per waiting local worker fetch
-- (p_handover_*: aligned arrays, one element per waiter: its lease token and length, its
-- session owner (NULL = it takes no session items) and session lease; one tag filter for
-- all of them). One row per item handed over (o_lock_token = the waiter's token), or one
-- row with only o_instance_id when none was. The turn's worker items that are still
-- unleased afterwards are announced as ack_orchestration_item would have.
-- p_call_id as for ack_orchestration_item: a resend of an ack that committed gets
-- o_instance_id NULL, with a row per item its lost reply had handed over that is still
-- leased under the waiter's token (the resend carries the same tokens), so the waiters
-- still get them. Revision 16 added it; the signature without it is dropped.
-- o_history_guard (every row; revision 21): history_row_guard of the last event this ack
-- appended (NULL when it appended none, and to a resend), so the caller's history cache
-- can hold the turn's history including what the ack wrote (src/history_cache.rs); a
-- caller with no waiter calls it for that alone (empty p_handover_* arrays). A new
-- output column changes the return type, so the function is dropped and created.
DROP FUNCTION IF EXISTS ack_orchestration_handover(
    TEXT, BIGINT, BIGINT[], TEXT[], TEXT[], TEXT, TEXT, TEXT, TEXT, TEXT, INT, INT, INT,
    BOOLEAN, TEXT, BOOLEAN, TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], BIGINT[], BIGINT[],
    TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], TEXT[], TEXT[], TEXT[], BIGINT[],
    TEXT[], BIGINT[], TEXT[], BIGINT[], INT, TEXT[]);
DROP FUNCTION IF EXISTS ack_orchestration_handover(
    TEXT, BIGINT, BIGINT[], TEXT[], TEXT[], TEXT, TEXT, TEXT, TEXT, TEXT, INT, INT, INT,
    BOOLEAN, TEXT, BOOLEAN, TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], BIGINT[], BIGINT[],
    TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], TEXT[], TEXT[], TEXT[], BIGINT[],
    TEXT[], BIGINT[], TEXT[], BIGINT[], INT, TEXT[], TEXT);
CREATE OR REPLACE FUNCTION ack_orchestration_handover(
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
    p_kv_values             TEXT[],
    p_kv_updated_ms         BIGINT[],
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
    p_orch_visible_at_ms    BIGINT[],
    p_handover_tokens                  TEXT[],
    p_handover_lock_timeout_ms         BIGINT[],
    p_handover_owner_ids               TEXT[],
    p_handover_session_lock_timeout_ms BIGINT[],
    p_handover_tag_mode                INT,
    p_handover_tags                    TEXT[],
    p_call_id                          TEXT DEFAULT NULL
)
RETURNS TABLE (
    o_instance_id       TEXT,
    o_lock_token        TEXT,
    o_work_item         TEXT,
    o_attempt_count     INT,
    o_item_instance_id  TEXT,
    o_item_execution_id BIGINT,
    o_item_activity_id  BIGINT,
    o_item_session_id   TEXT,
    o_item_tag          TEXT,
    o_history_guard     BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_instance TEXT;
    v_item     RECORD;
    v_handed   INT := 0;
    -- No waiter (a caller that wants only o_history_guard): ack_orchestration_item
    -- announces the turn's worker items itself.
    v_waiters  INT := coalesce(cardinality(p_handover_tokens), 0);
BEGIN
    v_instance := ack_orchestration_item(
        p_lock_token => p_lock_token, p_execution_id => p_execution_id,
        p_event_ids => p_event_ids, p_event_types => p_event_types,
        p_event_data => p_event_data, p_orchestration_name => p_orchestration_name,
        p_orchestration_version => p_orchestration_version,
        p_parent_instance_id => p_parent_instance_id, p_status => p_status,
        p_output => p_output, p_pinned_major => p_pinned_major,
        p_pinned_minor => p_pinned_minor, p_pinned_patch => p_pinned_patch,
        p_custom_status_set => p_custom_status_set, p_custom_status => p_custom_status,
        p_kv_clear_all => p_kv_clear_all, p_kv_keys => p_kv_keys, p_kv_values => p_kv_values,
        p_kv_updated_ms => p_kv_updated_ms, p_worker_items => p_worker_items,
        p_worker_instances => p_worker_instances, p_worker_executions => p_worker_executions,
        p_worker_activities => p_worker_activities, p_worker_sessions => p_worker_sessions,
        p_worker_tags => p_worker_tags, p_cancel_instances => p_cancel_instances,
        p_cancel_executions => p_cancel_executions, p_cancel_activities => p_cancel_activities,
        p_orch_instances => p_orch_instances, p_orch_kinds => p_orch_kinds,
        p_orch_items => p_orch_items, p_orch_visible_at_ms => p_orch_visible_at_ms,
        p_notify_worker_items => v_waiters = 0, p_call_id => p_call_id);

    IF v_instance IS NULL THEN
        -- A resend of an ack that committed: hand over again what its lost reply did.
        RETURN QUERY
        SELECT NULL::TEXT, w.lock_token, w.work_item, w.attempt_count, w.instance_id,
               w.execution_id, w.activity_id, w.session_id, w.tag, NULL::BIGINT
        FROM worker_queue w
        WHERE w.lock_token = ANY (p_handover_tokens);
        IF NOT FOUND THEN
            RETURN NEXT;
        END IF;
        RETURN;
    END IF;

    IF cardinality(p_event_ids) > 0 THEN
        SELECT history_row_guard(h.created_at_ms, h.event_data) INTO o_history_guard
        FROM history h
        WHERE h.instance_id = v_instance AND h.execution_id = p_execution_id
          AND h.event_id = (SELECT max(e.id) FROM unnest(p_event_ids) e(id));
    END IF;

    FOR i IN 1 .. coalesce(cardinality(p_handover_tokens), 0) LOOP
        SELECT c.o_work_item, c.o_attempt_count, c.o_instance_id, c.o_execution_id,
               c.o_activity_id, c.o_session_id, c.o_tag
        INTO v_item
        FROM claim_worker_item(p_handover_tokens[i], p_handover_lock_timeout_ms[i],
                               p_handover_owner_ids[i] IS NOT NULL,
                               coalesce(p_handover_owner_ids[i], ''),
                               coalesce(p_handover_session_lock_timeout_ms[i], 0),
                               p_handover_tag_mode, p_handover_tags) c;
        CONTINUE WHEN v_item.o_work_item IS NULL;
        v_handed := v_handed + 1;
        o_instance_id := v_instance;
        o_lock_token := p_handover_tokens[i];
        o_work_item := v_item.o_work_item;
        o_attempt_count := v_item.o_attempt_count;
        o_item_instance_id := v_item.o_instance_id;
        o_item_execution_id := v_item.o_execution_id;
        o_item_activity_id := v_item.o_activity_id;
        o_item_session_id := v_item.o_session_id;
        o_item_tag := v_item.o_tag;
        RETURN NEXT;
    END LOOP;

    -- Wake fetches (of any process) for this turn's items nobody here took.
    IF v_waiters > 0 THEN
        PERFORM notify_worker_items(array_agg(w.tag), array_agg(w.session_id))
        FROM worker_queue w
        JOIN unnest(p_worker_instances, p_worker_executions, p_worker_activities)
             AS k(instance_id, execution_id, activity_id)
          ON w.instance_id = k.instance_id AND w.execution_id = k.execution_id
         AND w.activity_id = k.activity_id
        WHERE w.lock_token IS NULL;
    END IF;

    IF v_handed = 0 THEN
        o_instance_id := v_instance;
        RETURN NEXT;
    END IF;
END;
$fn$;

-- Revision 6's signature, without p_fan_in_grace_ms (never in a release; dropped so
-- that calls resolve to the one below).
DROP FUNCTION IF EXISTS ack_work_item_handover(TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, BIGINT,
    BOOLEAN, INT, INT, INT, INT, INT, INT, BOOLEAN, BIGINT, BIGINT, BIGINT);

-- The worker ack (ack_work_item): deletes the leased item if its lease is live, touches
-- its session, and enqueues the completion, atomically. Records 'ack:' || p_call_id (one
-- id per call, reused by its resends) in the enqueue ledger, so a resend of an ack that
-- committed (its reply was lost) is recognised and answered as done; a second, separate
-- ack of the token still fails.
--
-- Hand-over (p_turn_lock_token not NULL: a local orchestration fetch waits, with this
-- lease length and capability filter): the completed activity's instance is claimed
-- under that token when it is claimable now and has no other activity outstanding, and on the procedure path (p_read_turn) its
-- turn is read in the same call (p_history_*: the caller's history cache entry of the
-- instance, NULLs for none). o_execution_id is NULL when nothing was claimed. A resend
-- of an ack that committed gives a turn its lost reply had claimed back (attempt not
-- counted).
--
-- Fan-in grace (p_fan_in_grace_ms > 0): a completion that makes its idle instance
-- claimable while other activities of the instance are still outstanding makes it
-- claimable p_fan_in_grace_ms later instead, so the completions of a fan-out that
-- arrive together run in one turn rather than one turn each. The instance's last
-- outstanding completion (whatever the grace of the process that acks it, 0 for an
-- older release) makes it claimable at once. The grace lives only in the claim state's
-- claimable_at_ms: a claim, a refresh or a lease end may drop it early, never extend it.
CREATE OR REPLACE FUNCTION ack_work_item_handover(
    p_lock_token        TEXT,
    p_instance_id       TEXT,
    p_kind              TEXT,
    p_work_item         TEXT,
    p_call_id           TEXT,
    p_turn_lock_token   TEXT,
    p_lock_timeout_ms   BIGINT,
    p_filter_enabled    BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_read_turn                BOOLEAN,
    p_history_execution_id     BIGINT,
    p_history_after_event_id   BIGINT,
    p_history_guard            BIGINT,
    p_fan_in_grace_ms          BIGINT DEFAULT 0
)
RETURNS TABLE (
    o_acked                  BIGINT,
    o_acked_before           BOOLEAN,
    o_execution_id           BIGINT,
    o_attempt_count          INT,
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
    v_now     BIGINT := now_ms();
    v_session TEXT;
    v_queued  BIGINT := 0;
    v_claim   RECORD;
    v_turn    RECORD;
    v_woken   BOOLEAN := FALSE;
    v_leased_until BIGINT;
    -- Set when the instance is held back by a fan-in grace (claimable later than its
    -- visible messages, no lease): before this ack (v_held_until) or by it (v_holds).
    v_held_until BIGINT;
    v_holds   BOOLEAN := FALSE;
    v_last    BOOLEAN := FALSE;
    -- The row stopped being claimable now before the grace could be set (another
    -- completion's grace, a claim): whoever did that announces the instance.
    v_passed  BOOLEAN := FALSE;
    -- The claim-state row already promises a claim at or before now, or the turn's
    -- lease end: the completion needs no claim-state write (pending_note_messages).
    v_promised BOOLEAN;
BEGIN
    DELETE FROM worker_queue w
    WHERE w.lock_token = p_lock_token AND w.locked_until_ms > v_now
    RETURNING w.session_id INTO v_session;
    o_acked := CASE WHEN FOUND THEN 1 ELSE 0 END;
    -- Only a call that acked nothing can be the resend of one that did. Asked after the
    -- DELETE: that statement's snapshot sees an earlier attempt still running when the
    -- DELETE began (it waited for its row lock) and committed since.
    o_acked_before := FALSE;
    IF o_acked = 0 THEN
        o_acked_before := EXISTS (SELECT 1 FROM enqueue_ledger l
                                  WHERE l.enqueue_id = 'ack:' || p_call_id);
    END IF;
    IF o_acked = 1 THEN
        IF v_session IS NOT NULL THEN
            UPDATE sessions s SET last_activity_at_ms = v_now
            WHERE s.session_id = v_session AND s.locked_until_ms > v_now;
        END IF;
        IF p_work_item IS NOT NULL THEN
            -- A completion for an instance that is already claimable, with no lease, needs
            -- no wake-up of its own: whoever made it claimable woke a fetch for it (an
            -- enqueue, an ack or abandon), or it became claimable at a time fetches sleep
            -- until (a timer, a lease expiry). If a turn claims the instance before this
            -- commits, that turn's ack wakes a fetch for the completion: its EXISTS check
            -- sees it, or its lease-end refresh is blocked by this KEY SHARE lock and
            -- wakes one instead (pending_after_turn). Only the first completion of a
            -- fan-out wakes a fetch, not every one.
            --
            -- Likewise a completion for an instance whose turn is running (a live
            -- lease): that turn's ack or abandon wakes a fetch for what arrived
            -- meanwhile, by the same two routes, so waking one now only buys an empty
            -- claim. Waiters learn the lease's end instead (a delayed-work notice): if
            -- the holder dies, the completion is claimed when the lease runs out.
            SELECT p.runnable AND p.visible_at_ms <= v_now AND p.claimable_at_ms <= v_now
                   AND coalesce(p.locked_until_ms, 0) <= v_now,
                   CASE WHEN p.locked_until_ms > v_now THEN p.locked_until_ms END,
                   CASE WHEN p.runnable AND p.visible_at_ms <= v_now AND p.claimable_at_ms > v_now
                             AND coalesce(p.locked_until_ms, 0) <= v_now
                        THEN p.claimable_at_ms END,
                   p.visible_at_ms <= v_now OR coalesce(p.locked_until_ms > v_now, FALSE)
            INTO v_woken, v_leased_until, v_held_until, v_promised
            FROM pending_instances p
            WHERE p.instance_id = p_instance_id
            FOR KEY SHARE;
            v_woken := coalesce(v_woken, FALSE);
            -- The claim state is kept here, not by the enqueue trigger: this call holds
            -- the row (KEY SHARE, as the trigger would take it) and has read it.
            PERFORM set_config('duroxide_pg_hybrid.claim_state_kept', 'on', TRUE);
            INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
            VALUES (p_instance_id, p_kind, p_work_item, v_now, v_now);
            PERFORM set_config('duroxide_pg_hybrid.claim_state_kept', 'off', TRUE);
            IF v_promised IS NULL AND p_fan_in_grace_ms > 0
               -- (Index-ordered LIMIT 1 rather than EXISTS, for the generic plan.)
               AND (SELECT w.activity_id FROM worker_queue w WHERE w.instance_id = p_instance_id
                    ORDER BY w.instance_id, w.execution_id, w.activity_id LIMIT 1) IS NOT NULL THEN
                -- No claim-state row (the instance was idle) and other activities are still
                -- outstanding: create the row held for the grace rather than create it
                -- and then hold it. Completions that race this one find the row (or wait
                -- for its insert) and go through the grace block below, which looks at
                -- the queue after this one has committed.
                v_holds := pending_note_messages(p_instance_id, v_now, FALSE,
                                                 v_now + p_fan_in_grace_ms);
            ELSIF NOT coalesce(v_promised, FALSE) THEN
                PERFORM pending_note_messages(p_instance_id, v_now, FALSE);
            END IF;
            v_queued := 1;
        END IF;
        INSERT INTO enqueue_ledger (enqueue_id, created_at_ms)
        VALUES ('ack:' || p_call_id, v_now)
        ON CONFLICT (enqueue_id) DO NOTHING;
    END IF;
    IF random() < 0.0625 THEN
        PERFORM enqueue_ledger_prune(v_now);
    END IF;

    -- Only the instance's last outstanding activity hands its turn over: while others of
    -- a fan-out are still queued or running, a turn now would hold one completion and
    -- lease the instance while the rest arrive; a fetch later takes them together.
    --
    -- Completions of one fan-out acked at the same moment would each see the others'
    -- activities still queued (their deletes are not committed yet) and none would end
    -- the grace. So a completion that may hold or end one first locks the instance's
    -- claim-state row, then looks at the queue: the locks make such completions take
    -- turns, each one's look comes after the ones before it committed, and the last to
    -- look sees every other activity gone. The grace it ends may have been set after
    -- this call read the row (v_held_until), by a completion that committed meanwhile,
    -- so the end does not depend on that read.
    IF v_queued > 0 AND NOT v_holds
       AND (p_turn_lock_token IS NOT NULL OR v_held_until IS NOT NULL
            OR (NOT v_woken AND v_leased_until IS NULL)) THEN
        PERFORM 1 FROM pending_instances p WHERE p.instance_id = p_instance_id
        FOR NO KEY UPDATE;
        -- (Index-ordered LIMIT 1 rather than EXISTS, for the generic plan: 01_primitives.sql.)
        v_last := (SELECT w.activity_id FROM worker_queue w WHERE w.instance_id = p_instance_id
                   ORDER BY w.instance_id, w.execution_id, w.activity_id LIMIT 1) IS NULL;
        IF v_last THEN
            -- The fan-in is complete: the grace (an earlier completion's, maybe of another
            -- process), if one holds the instance, ends below.
            v_held_until := NULL;
        ELSIF NOT v_last AND p_fan_in_grace_ms > 0 AND NOT v_woken
              AND v_leased_until IS NULL AND v_held_until IS NULL THEN
            -- This completion made the idle instance claimable: hold it for the rest.
            UPDATE pending_instances p SET claimable_at_ms = v_now + p_fan_in_grace_ms
            WHERE p.instance_id = p_instance_id AND p.runnable AND p.claimable_at_ms <= v_now
              AND coalesce(p.locked_until_ms, 0) <= v_now;
            v_holds := FOUND;
            v_passed := NOT FOUND;
        END IF;
    END IF;
    IF v_last AND p_turn_lock_token IS NOT NULL THEN
        -- The claim's lease write ends the grace too.
        SELECT * INTO v_claim
        FROM claim_instance_turn(p_instance_id, p_turn_lock_token, p_lock_timeout_ms,
                                 p_filter_enabled, p_min_major, p_min_minor, p_min_patch,
                                 p_max_major, p_max_minor, p_max_patch, TRUE);
        IF v_claim.o_execution_id IS NOT NULL THEN
            -- The waiter takes the completion: nobody else needs waking for it.
            v_queued := 0;
            o_execution_id := v_claim.o_execution_id;
            o_attempt_count := v_claim.o_attempt_count;
            -- The batch and the instance's name, as the claim found them (the hybrid
            -- fetch then reads only history and KV; replaced below on the procedure path).
            o_messages := v_claim.o_messages;
            o_has_instance := v_claim.o_has_instance;
            o_orchestration_name := v_claim.o_orchestration_name;
            o_orchestration_version := v_claim.o_orchestration_version;
            IF p_read_turn THEN
                SELECT * INTO v_turn
                FROM read_claimed_turn(p_instance_id, p_turn_lock_token, o_execution_id,
                                       CASE WHEN p_history_execution_id = o_execution_id
                                            THEN p_history_after_event_id END,
                                       CASE WHEN p_history_execution_id = o_execution_id
                                            THEN p_history_guard END,
                                       v_claim.o_messages);
                o_has_instance := v_turn.o_has_instance;
                o_orchestration_name := v_turn.o_orchestration_name;
                o_orchestration_version := v_turn.o_orchestration_version;
                o_messages := v_turn.o_messages;
                o_history_incremental := v_turn.o_history_incremental;
                o_history := v_turn.o_history;
                o_history_last_event_id := v_turn.o_history_last_event_id;
                o_history_last_guard := v_turn.o_history_last_guard;
                o_kv_keys := v_turn.o_kv_keys;
                o_kv_values := v_turn.o_kv_values;
                o_kv_updated_ms := v_turn.o_kv_updated_ms;
            END IF;
        END IF;
    ELSIF o_acked = 0 AND o_acked_before AND p_turn_lock_token IS NOT NULL THEN
        -- A resend of an ack that committed: the turn its lost reply carried goes back.
        PERFORM abandon_orchestration_turn(p_turn_lock_token, NULL, TRUE);
    END IF;
    IF v_last AND o_execution_id IS NULL THEN
        -- The fan-in is complete and nothing here took the turn: end the grace. (Not
        -- for a row the claim above found not runnable and corrected.)
        UPDATE pending_instances p SET claimable_at_ms = v_now
        WHERE p.instance_id = p_instance_id AND p.runnable AND p.claimable_at_ms > v_now
          AND p.visible_at_ms <= v_now AND coalesce(p.locked_until_ms, 0) <= v_now;
    END IF;
    IF v_queued > 0 AND v_leased_until IS NOT NULL THEN
        PERFORM notify_delayed('orchestrator', v_leased_until);
    ELSIF v_queued > 0 AND v_holds THEN
        PERFORM notify_delayed('orchestrator', v_now + p_fan_in_grace_ms);
    ELSIF v_held_until IS NULL AND NOT v_passed AND NOT v_woken AND v_queued > 0 THEN
        -- (Held by an earlier completion's grace: that ack announced when it ends.)
        PERFORM notify_work_available('orchestrator', v_queued);
    END IF;
    RETURN NEXT;
END;
$fn$;

-- A client enqueue of an item visible now (a start, an event, a cancel) while a local
-- orchestration fetch waits (p_turn_lock_token, its lease length and capability filter):
-- the item is queued once per p_enqueue_id (the enqueue ledger, as the plain enqueue),
-- then its instance's turn is claimed under that token when it is claimable now, with
-- the turn's reads on the procedure path (p_read_turn; p_history_*: the caller's history
-- cache entry of the instance, NULLs for none). Otherwise fetches are woken as the plain
-- enqueue wakes them. o_queued is 0 for a resend of a call that committed (its reply was
-- lost): the item is queued already and the turn that reply carried goes back (attempt
-- not counted). o_execution_id is NULL when nothing was claimed.
CREATE OR REPLACE FUNCTION enqueue_orchestrator_handover(
    p_instance_id      TEXT,
    p_kind             TEXT,
    p_work_item        TEXT,
    p_enqueue_id       TEXT,
    p_turn_lock_token  TEXT,
    p_lock_timeout_ms  BIGINT,
    p_filter_enabled   BOOLEAN,
    p_min_major INT, p_min_minor INT, p_min_patch INT,
    p_max_major INT, p_max_minor INT, p_max_patch INT,
    p_read_turn                BOOLEAN,
    p_history_execution_id     BIGINT,
    p_history_after_event_id   BIGINT,
    p_history_guard            BIGINT
)
RETURNS TABLE (
    o_queued                 BIGINT,
    o_execution_id           BIGINT,
    o_attempt_count          INT,
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
    v_now   BIGINT := now_ms();
    v_claim RECORD;
BEGIN
    INSERT INTO enqueue_ledger (enqueue_id, created_at_ms)
    VALUES (p_enqueue_id, v_now)
    ON CONFLICT (enqueue_id) DO NOTHING;
    IF NOT FOUND THEN
        PERFORM abandon_orchestration_turn(p_turn_lock_token, NULL, TRUE);
        o_queued := 0;
        RETURN NEXT;
        RETURN;
    END IF;
    IF random() < 0.0625 THEN
        PERFORM enqueue_ledger_prune(v_now);
    END IF;
    -- (With its claim state: 10_client_enqueue.sql.)
    PERFORM enqueue_orchestrator_message(p_instance_id, p_kind, p_work_item, v_now, v_now);
    o_queued := 1;

    SELECT * INTO v_claim
    FROM claim_instance_turn(p_instance_id, p_turn_lock_token, p_lock_timeout_ms,
                             p_filter_enabled, p_min_major, p_min_minor, p_min_patch,
                             p_max_major, p_max_minor, p_max_patch);
    IF v_claim.o_execution_id IS NULL THEN
        -- Busy, leased, filtered out or not yet due: any fetch takes it as usual.
        PERFORM notify_work_available('orchestrator', 1);
        RETURN NEXT;
        RETURN;
    END IF;
    o_execution_id := v_claim.o_execution_id;
    o_attempt_count := v_claim.o_attempt_count;
    IF NOT p_read_turn THEN
        -- The batch and the instance's name, as the claim found them.
        o_messages := v_claim.o_messages;
        o_has_instance := v_claim.o_has_instance;
        o_orchestration_name := v_claim.o_orchestration_name;
        o_orchestration_version := v_claim.o_orchestration_version;
        RETURN NEXT;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT o_queued, o_execution_id, o_attempt_count, t.o_has_instance,
           t.o_orchestration_name, t.o_orchestration_version, t.o_messages,
           t.o_history_incremental, t.o_history, t.o_history_last_event_id,
           t.o_history_last_guard, t.o_kv_keys, t.o_kv_values, t.o_kv_updated_ms
    FROM read_claimed_turn(p_instance_id, p_turn_lock_token, o_execution_id,
                           CASE WHEN p_history_execution_id = o_execution_id
                                THEN p_history_after_event_id END,
                           CASE WHEN p_history_execution_id = o_execution_id
                                THEN p_history_guard END,
                           v_claim.o_messages) t;
END;
$fn$;
