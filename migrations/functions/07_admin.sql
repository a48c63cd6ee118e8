-- revision: 1
-- ProviderAdmin: the multi-step management operations, each ONE function call (one round
-- trip, one transaction). Single-statement reads (listings, info, metrics) are plain SQL
-- in src/admin.rs.
--
-- Errors (SQLSTATE class DX, mapped to permanent provider errors; tests match the text):
--   DX010  instance still running (delete without force)
--   DX011  deletion would orphan a child (a child created after the tree was read)
--   DX012  instance not found
--   DX013  sub-orchestration deleted directly (only roots can be deleted)
--
-- Deletion and concurrent turns. A delete must never let an in-flight turn recreate what
-- it removed (a "zombie"), so admin_delete_instances works in this order:
--   1. the claim's per-instance advisory lock (the key sp_fetch_and_lock tries, migration
--      0002) is taken for every id, in sorted order: a claim already holding one finishes
--      first, later claims of these instances skip them until this transaction ends;
--   2. the lease rows go next: an ack holding its lease (SELECT ... FOR UPDATE) finishes
--      before the delete goes on, and any later ack with that token fails with "Invalid
--      lock token"; the running and orphan checks come after this, so they see what
--      such an ack wrote;
--   3. worker rows before orchestrator rows (a worker ack in flight finishes first, and
--      the completion it enqueued is deleted with the rest), then the data.
-- Claims only TRY advisory locks and acks take none, so nothing the runtime does waits on
-- this function while it waits on the runtime: the ordering cannot deadlock.
-- Cost: one advisory lock per distinct id until commit (shared lock table, sized by
-- max_locks_per_transaction x max_connections), which bounds sensible bulk batch sizes to
-- a few thousand instances per call.

-- Ids of an instance tree: the given root (even if it has no instance row) and every
-- descendant, breadth-first. The CYCLE clause keeps corrupt parent links from looping.
CREATE OR REPLACE FUNCTION admin_instance_tree(p_root TEXT)
RETURNS TABLE (o_instance_id TEXT)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    RETURN QUERY
    WITH RECURSIVE tree (instance_id, depth) AS (
        SELECT p_root, 0
        UNION ALL
        SELECT c.instance_id, t.depth + 1
        FROM tree t
        JOIN instances c ON c.parent_instance_id = t.instance_id
    ) CYCLE instance_id SET is_cycle USING path
    SELECT t.instance_id
    FROM tree t
    WHERE NOT t.is_cycle
    GROUP BY t.instance_id
    ORDER BY min(t.depth), t.instance_id;
END;
$fn$;

-- delete_instances_atomic: all or nothing. `instances_deleted` is the number of ids
-- given (like the reference provider: executions and history may exist without an
-- instance row, and they are deleted all the same).
CREATE OR REPLACE FUNCTION admin_delete_instances(p_ids TEXT[], p_force BOOLEAN)
RETURNS TABLE (
    o_instances_deleted       BIGINT,
    o_executions_deleted      BIGINT,
    o_events_deleted          BIGINT,
    o_queue_messages_deleted  BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_lock_space INT := instance_lock_space();
    v_running    TEXT;
    v_child      TEXT;
    v_parent     TEXT;
    v_n          BIGINT;
    v_key        INT;
BEGIN
    o_instances_deleted := coalesce(cardinality(p_ids), 0);
    o_executions_deleted := 0;
    o_events_deleted := 0;
    o_queue_messages_deleted := 0;
    IF o_instances_deleted = 0 THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- Sorted by key, so two overlapping deletes cannot deadlock on each other.
    FOR v_key IN
        SELECT DISTINCT hashtext(x.id) FROM unnest(p_ids) AS x(id) ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(v_lock_space, v_key);
    END LOOP;

    -- Waits for an ack holding one of these leases; the checks below then see the
    -- status that ack wrote.
    DELETE FROM instance_locks l WHERE l.instance_id = ANY (p_ids);

    IF NOT p_force THEN
        SELECT i.instance_id INTO v_running
        FROM instances i
        JOIN executions e
          ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
        WHERE i.instance_id = ANY (p_ids) AND e.status = 'Running'
        ORDER BY i.instance_id
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'Instance % is still running. Use force=true to delete anyway, or cancel first.',
                v_running
                USING ERRCODE = 'DX010';
        END IF;
    END IF;

    SELECT c.instance_id, c.parent_instance_id INTO v_child, v_parent
    FROM instances c
    WHERE c.parent_instance_id = ANY (p_ids) AND NOT (c.instance_id = ANY (p_ids))
    ORDER BY c.instance_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'Cannot delete: instance % has child % that is not in the delete set (it would be orphaned). Re-read the instance tree and retry.',
            v_parent, v_child
            USING ERRCODE = 'DX011';
    END IF;

    -- Worker rows before orchestrator rows: a worker ack in flight (holding its row)
    -- finishes first, and the completion it enqueued is then deleted below.
    DELETE FROM worker_queue w WHERE w.instance_id = ANY (p_ids);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    o_queue_messages_deleted := v_n;

    -- Claim state before the messages: deleting it waits for enqueues in flight (their
    -- KEY SHARE locks), so every message they commit is seen by the delete below; later
    -- messages find no row and start a new one.
    DELETE FROM pending_instances p WHERE p.instance_id = ANY (p_ids);

    DELETE FROM orchestrator_queue q WHERE q.instance_id = ANY (p_ids);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    o_queue_messages_deleted := o_queue_messages_deleted + v_n;

    DELETE FROM history h WHERE h.instance_id = ANY (p_ids);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    o_events_deleted := v_n;

    DELETE FROM executions e WHERE e.instance_id = ANY (p_ids);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    o_executions_deleted := v_n;

    DELETE FROM kv_store k WHERE k.instance_id = ANY (p_ids);
    DELETE FROM kv_delta d WHERE d.instance_id = ANY (p_ids);
    DELETE FROM instances i WHERE i.instance_id = ANY (p_ids);

    RETURN NEXT;
END;
$fn$;

-- delete_instance: the default trait method (get_parent_id, get_instance_tree,
-- delete_instances_atomic) in one call.
CREATE OR REPLACE FUNCTION admin_delete_instance(p_instance_id TEXT, p_force BOOLEAN)
RETURNS TABLE (
    o_instances_deleted       BIGINT,
    o_executions_deleted      BIGINT,
    o_events_deleted          BIGINT,
    o_queue_messages_deleted  BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_parent TEXT;
    v_ids    TEXT[];
BEGIN
    SELECT i.parent_instance_id INTO v_parent
    FROM instances i WHERE i.instance_id = p_instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Instance % not found', p_instance_id
            USING ERRCODE = 'DX012';
    END IF;
    IF v_parent IS NOT NULL THEN
        RAISE EXCEPTION 'Cannot delete sub-orchestration % directly (its parent is %). Delete root instance instead.',
            p_instance_id, v_parent
            USING ERRCODE = 'DX013';
    END IF;

    SELECT array_agg(t.o_instance_id) INTO v_ids FROM admin_instance_tree(p_instance_id) t;

    RETURN QUERY SELECT * FROM admin_delete_instances(v_ids, p_force);
END;
$fn$;

-- delete_instance_bulk: terminal ROOT instances matching the filter, each with its whole
-- tree (descendants are deleted whatever their status, as the reference provider does).
-- `instances_deleted` counts roots and descendants. Oldest first, so batching with a
-- limit works through the backlog in creation order.
CREATE OR REPLACE FUNCTION admin_delete_instance_bulk(
    p_instance_ids      TEXT[],   -- NULL = no id filter
    p_completed_before  BIGINT,   -- NULL = no time filter
    p_limit             BIGINT
)
RETURNS TABLE (
    o_instances_deleted       BIGINT,
    o_executions_deleted      BIGINT,
    o_events_deleted          BIGINT,
    o_queue_messages_deleted  BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_ids TEXT[];
BEGIN
    WITH roots AS (
        SELECT i.instance_id
        FROM instances i
        JOIN executions e
          ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
        WHERE i.parent_instance_id IS NULL
          AND e.status IN ('Completed', 'Failed', 'ContinuedAsNew')
          AND (p_instance_ids IS NULL OR i.instance_id = ANY (p_instance_ids))
          AND (p_completed_before IS NULL OR e.completed_at_ms < p_completed_before)
        ORDER BY i.created_at_ms, i.instance_id
        LIMIT p_limit
    )
    SELECT array_agg(DISTINCT t.o_instance_id) INTO v_ids
    FROM roots r
    CROSS JOIN LATERAL admin_instance_tree(r.instance_id) t;

    IF v_ids IS NULL THEN
        RETURN QUERY SELECT 0::BIGINT, 0::BIGINT, 0::BIGINT, 0::BIGINT;
        RETURN;
    END IF;

    RETURN QUERY SELECT * FROM admin_delete_instances(v_ids, TRUE);
END;
$fn$;

-- prune_executions: delete old executions of one instance with their history. Never the
-- current execution, never a Running one; KV belongs to the instance and is untouched.
CREATE OR REPLACE FUNCTION admin_prune_executions(
    p_instance_id       TEXT,
    p_keep_last         BIGINT,   -- NULL = no count-based retention
    p_completed_before  BIGINT    -- NULL = no time filter
)
RETURNS TABLE (
    o_instances_processed  BIGINT,
    o_executions_deleted   BIGINT,
    o_events_deleted       BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_current BIGINT;
    v_execs   BIGINT[];
BEGIN
    SELECT i.current_execution_id INTO v_current
    FROM instances i WHERE i.instance_id = p_instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Instance % not found', p_instance_id
            USING ERRCODE = 'DX012';
    END IF;

    -- Row locks on the chosen executions: an ack finishing one of them concurrently
    -- cannot interleave with its deletion.
    SELECT coalesce(array_agg(e.execution_id), '{}') INTO v_execs
    FROM (
        SELECT e.execution_id
        FROM executions e
        WHERE e.instance_id = p_instance_id
          AND e.execution_id <> v_current
          AND e.status <> 'Running'
          AND (p_completed_before IS NULL OR e.completed_at_ms < p_completed_before)
          AND (p_keep_last IS NULL OR e.execution_id NOT IN (
                  SELECT k.execution_id FROM executions k
                  WHERE k.instance_id = p_instance_id
                  ORDER BY k.execution_id DESC
                  LIMIT p_keep_last))
        FOR UPDATE
    ) e;

    o_instances_processed := 1;

    DELETE FROM history h
    WHERE h.instance_id = p_instance_id AND h.execution_id = ANY (v_execs);
    GET DIAGNOSTICS o_events_deleted = ROW_COUNT;

    DELETE FROM executions e
    WHERE e.instance_id = p_instance_id AND e.execution_id = ANY (v_execs);
    GET DIAGNOSTICS o_executions_deleted = ROW_COUNT;

    RETURN NEXT;
END;
$fn$;

-- prune_executions_bulk: the instances matching the filter, of ANY status (a Running
-- instance that continued-as-new has old executions too), each pruned as above.
-- `completed_before` of the filter applies to the instance's current execution.
CREATE OR REPLACE FUNCTION admin_prune_executions_bulk(
    p_instance_ids             TEXT[],   -- NULL = no id filter
    p_completed_before         BIGINT,   -- instance filter; NULL = none
    p_limit                    BIGINT,
    p_keep_last                BIGINT,   -- prune options
    p_exec_completed_before    BIGINT
)
RETURNS TABLE (
    o_instances_processed  BIGINT,
    o_executions_deleted   BIGINT,
    o_events_deleted       BIGINT
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_instance TEXT;
    v_one      RECORD;
BEGIN
    o_instances_processed := 0;
    o_executions_deleted := 0;
    o_events_deleted := 0;

    FOR v_instance IN
        SELECT i.instance_id
        FROM instances i
        LEFT JOIN executions e
          ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
        WHERE (p_instance_ids IS NULL OR i.instance_id = ANY (p_instance_ids))
          AND (p_completed_before IS NULL OR e.completed_at_ms < p_completed_before)
        ORDER BY i.created_at_ms, i.instance_id
        LIMIT p_limit
    LOOP
        SELECT * INTO v_one
        FROM admin_prune_executions(v_instance, p_keep_last, p_exec_completed_before);
        o_instances_processed := o_instances_processed + v_one.o_instances_processed;
        o_executions_deleted := o_executions_deleted + v_one.o_executions_deleted;
        o_events_deleted := o_events_deleted + v_one.o_events_deleted;
    END LOOP;

    RETURN NEXT;
END;
$fn$;
