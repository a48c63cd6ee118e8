-- Fault paths: notifications that say what became visible (and when), and a ledger that
-- makes client enqueues safe to resend.
--
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
    v_channel TEXT := notify_channel('worker');
    v_chunk   TEXT := '';
    v_entry   TEXT;
    r         RECORD;
BEGIN
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
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$
    SELECT pg_notify(notify_channel(p_queue), 'at:' || p_visible_at_ms || ',' || now_ms())
    WHERE p_visible_at_ms IS NOT NULL
$$;

-- Client-generated id of every client enqueue (enqueue_for_orchestrator,
-- enqueue_for_worker) and of every worker ack call ('ack:<id>'). The statement inserts
-- its id here, ON CONFLICT DO NOTHING, and acts only if the id was new (an ack: reports
-- success if the id is already there): a statement resent after an ambiguous failure
-- (the reply was lost, 08P01/08007) cannot deliver or complete twice. A ledger rather
-- than a column on the queue row: the row can be claimed and acked (deleted) before the
-- resend arrives, and the id must outlive it. Resends happen within one provider call,
-- so ids are kept 15 minutes; each of these statements prunes up to 16 expired ids.
CREATE TABLE enqueue_ledger (
    enqueue_id     TEXT PRIMARY KEY,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX enqueue_ledger_created_idx ON enqueue_ledger (created_at_ms);
