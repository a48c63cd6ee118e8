-- revision: 4
-- Primitives every other function uses: the clock, notification channels, and the
-- advisory-lock key space of per-instance claims.
--
-- Functions are PL/pgSQL even when one SQL statement would do: a SQL function with a
-- `SET search_path` clause is never inlined and is planned again on every call, while
-- PL/pgSQL keeps its plans per session. (now_ms has no SET clause and is inlined.)
-- The functions on the hot path also SET plan_cache_mode = force_generic_plan: a
-- PL/pgSQL statement whose parameters appear in OR branches or range conditions gets a
-- custom plan cheaper on paper than the generic one, so the plan cache re-plans it on
-- every call (claim_worker_item: 0.45 ms per call, 0.07 of it executing; 0.15 with the
-- generic plan, which uses the same indexes). The setting holds for the functions and
-- triggers they call. A generic plan cannot know that one instance may hold most of a
-- queue: for "does instance $1 have rows" it expects an average share and picks a scan
-- that stops at the first match, which reads the whole queue for an instance with none
-- next to one holding 20,000 rows. So existence checks on the hot path are written as
-- an index-ordered `LIMIT 1` (the generic plan then walks the instance's index range),
-- and the functions made of per-instance lookups (claim_instance, pending_refresh,
-- pending_instance_facts) SET plan_cache_mode = auto, the plan cache's choice per
-- statement, as before. Admin functions (bulk deletes by id lists) keep the default.
--
-- Function files: each file holds the current definition of its functions
-- (CREATE OR REPLACE) and is re-applied, under the migration lock and in one
-- transaction with the other files, when its `revision` is newer than the schema's
-- ledger (_function_files). Rules that keep rolling upgrades working:
--   * bump `revision` with every change to a file;
--   * a function an older release calls keeps its name, argument names and result
--     columns; a change to any of those gets a new function name instead;
--   * tables and indexes never change here: they belong to append-only migrations.

-- The one clock every lease and visibility decision uses. Floor, not round, so a
-- timestamp is never ahead of a wall clock read at the same instant.
CREATE OR REPLACE FUNCTION now_ms() RETURNS BIGINT
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$ SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

-- LISTEN/NOTIFY channel of one queue ('orchestrator' or 'worker') of this schema.
-- Scoped to the schema, and hashed so it always fits PostgreSQL's 63-byte limit.
CREATE OR REPLACE FUNCTION notify_channel(p_queue TEXT) RETURNS TEXT
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN 'duroxide_' || left(p_queue, 4) || '_' || left(md5(current_schema()), 16);
END;
$fn$;

-- Wakes long-polling fetchers: called by the statements that make work visible now
-- (never by a per-row trigger). The payload is how many items became visible, so the
-- listener wakes that many waiters rather than all of them. PostgreSQL delivers at
-- commit and folds identical notifications of one transaction.
--
-- The notify functions spell the channel out rather than call notify_channel (a nested
-- call of a function with a SET clause costs a configuration save and restore, and the
-- next statement then re-resolves the search path), and test their arguments with IF,
-- so a call that sends nothing runs no statement. (Revision 4; notify_channel stays the
-- definition listeners use: tests/long_poll.rs listens on it for what these send.)
CREATE OR REPLACE FUNCTION notify_work_available(p_queue TEXT, p_count BIGINT) RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF p_count > 0 THEN
        PERFORM pg_notify('duroxide_' || left(p_queue, 4) || '_' || left(md5(current_schema()), 16),
                          p_count::TEXT);
    END IF;
END;
$fn$;

-- Advisory-lock key space of per-instance claims: (instance_lock_space(), hashtext(id)).
-- Scoped to the schema so tenants sharing a database never contend on equal instance ids.
-- Taken by the claim (try, skip on conflict) and by deletes (wait).
CREATE OR REPLACE FUNCTION instance_lock_space() RETURNS INT
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN hashtext('duroxide-pg-hybrid:' || current_schema());
END;
$fn$;

-- Notification payloads on a queue's channel (parsed by src/notify.rs):
--   <n>                      n items became visible now; their routing is unknown (the
--                            orchestrator queue always, old releases for the worker queue)
--   w:[[tag,session,n],...]  worker items visible now, grouped by (tag, session id);
--                            JSON, NULL = untagged / no session
--   at:<visible_ms>,<now_ms> an item becomes visible at <visible_ms> (database clock);
--                            <now_ms> is the sender's clock, so a listener can turn it into
--                            a delay without knowing the clock offset

-- Worker items made visible now, one array element per item (aligned arrays; NULL
-- element = untagged / no session; NULL arrays = nothing). Lets a listener wake only the
-- waiters whose tag filter and session ownership admit the item. Payloads stay under
-- PostgreSQL's 8000-byte limit: entries are chunked, and an entry too long to send
-- (huge tag or session id) goes as a bare count, which wakes every worker waiter.
CREATE OR REPLACE FUNCTION notify_worker_items(p_tags TEXT[], p_session_ids TEXT[])
RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_channel TEXT := 'duroxide_work_' || left(md5(current_schema()), 16);
    v_chunk   TEXT := '';
    v_entry   TEXT;
    r         RECORD;
BEGIN
    -- The common case, items without tag or session (one payload entry): no grouping
    -- query, no JSON building.
    IF cardinality(p_tags) > 0 AND cardinality(p_session_ids) = cardinality(p_tags)
       AND array_remove(p_tags, NULL) = '{}' AND array_remove(p_session_ids, NULL) = '{}' THEN
        PERFORM pg_notify(v_channel, 'w:[[null,null,' || cardinality(p_tags) || ']]');
        RETURN;
    END IF;
    FOR r IN
        SELECT i.tag, i.session_id, count(*) AS n
        FROM unnest(p_tags, p_session_ids) AS i(tag, session_id)
        GROUP BY i.tag, i.session_id
    LOOP
        v_entry := json_build_array(r.tag, r.session_id, r.n)::TEXT;
        IF octet_length(v_entry) > 2000 THEN
            PERFORM pg_notify(v_channel, r.n::TEXT);
            CONTINUE;
        END IF;
        IF octet_length(v_chunk) + octet_length(v_entry) > 7000 THEN
            PERFORM pg_notify(v_channel, 'w:[' || v_chunk || ']');
            v_chunk := '';
        END IF;
        v_chunk := CASE WHEN v_chunk = '' THEN v_entry ELSE v_chunk || ',' || v_entry END;
    END LOOP;
    IF v_chunk <> '' THEN
        PERFORM pg_notify(v_channel, 'w:[' || v_chunk || ']');
    END IF;
END;
$fn$;

-- Work that becomes visible later (a timer, a delayed enqueue or abandon): waiting
-- fetches shorten their sleep to that time instead of sleeping to the fallback poll.
-- p_visible_at_ms: the EARLIEST visible time among the delayed items (NULL = none).
CREATE OR REPLACE FUNCTION notify_delayed(p_queue TEXT, p_visible_at_ms BIGINT)
RETURNS VOID
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF p_visible_at_ms IS NOT NULL THEN
        PERFORM pg_notify('duroxide_' || left(p_queue, 4) || '_' || left(md5(current_schema()), 16),
                          'at:' || p_visible_at_ms || ',' || now_ms());
    END IF;
END;
$fn$;
