-- revision: 1
-- Primitives every other function uses: the clock, notification channels, and the
-- advisory-lock key space of per-instance claims.
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
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$ SELECT 'duroxide_' || left(p_queue, 4) || '_' || left(md5(current_schema()), 16) $$;

-- Wakes long-polling fetchers: called by the statements that make work visible now
-- (never by a per-row trigger). The payload is how many items became visible, so the
-- listener wakes that many waiters rather than all of them. PostgreSQL delivers at
-- commit and folds identical notifications of one transaction.
CREATE OR REPLACE FUNCTION notify_work_available(p_queue TEXT, p_count BIGINT) RETURNS VOID
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$ SELECT pg_notify(notify_channel(p_queue), p_count::TEXT) WHERE p_count > 0 $$;

-- Advisory-lock key space of per-instance claims: (instance_lock_space(), hashtext(id)).
-- Scoped to the schema so tenants sharing a database never contend on equal instance ids.
-- Taken by the claim (try, skip on conflict) and by deletes (wait).
CREATE OR REPLACE FUNCTION instance_lock_space() RETURNS INT
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$ SELECT hashtext('duroxide-pg-hybrid:' || current_schema()) $$;
