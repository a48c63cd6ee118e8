-- Claim state per instance (issue #10: claims that no queue can stall).
--
-- One row for every instance that has orchestrator messages queued. The claim picks
-- instances from here with one indexed, SKIP LOCKED scan instead of walking queue rows,
-- so instances that cannot run now cost it nothing:
--   * an instance whose turn is in progress (lease) has claimable_at_ms = lease expiry;
--   * an instance nobody can run yet (events for an instance that does not exist) has
--     runnable = FALSE and is outside the claim indexes;
--   * an instance pinned to a duroxide version outside a dispatcher's range is outside
--     that dispatcher's index range (pinned columns lead the pinned index).
-- The row is maintained by a trigger on orchestrator_queue (every writer, whatever its
-- release, keeps it current) and by the claim, ack, abandon and renew functions. The
-- functions and the trigger live in migrations/functions/ (re-applied when changed); see
-- 02_pending_instances.sql there for the locking protocol.
CREATE TABLE pending_instances (
    instance_id      TEXT PRIMARY KEY,
    -- Lower bound of the earliest visible_at of the instance's queued messages: never
    -- later than the truth (a claim may find nothing and correct it, never the reverse).
    visible_at_ms    BIGINT NOT NULL,
    -- When a claim should next look at the instance: greatest(visible_at_ms, lease end),
    -- or a short retry time after a correction was blocked by an enqueue in flight.
    claimable_at_ms  BIGINT NOT NULL,
    -- Mirror of instance_locks.locked_until_ms for the lease of a turn in progress.
    locked_until_ms  BIGINT,
    -- The instance can start a turn: it exists (instance row or history start) or a start
    -- message is queued. FALSE = its messages wait for the instance (orphans).
    runnable         BOOLEAN NOT NULL,
    -- Mirror of the current execution's pinned duroxide version (NULL = unpinned).
    pinned_major     INT,
    pinned_minor     INT,
    pinned_patch     INT
);
-- Claims without a capability filter, and the next wake-up time of an idle claim.
CREATE INDEX pending_instances_claim_idx ON pending_instances (claimable_at_ms)
    WHERE runnable;
-- Claims with a filter: unpinned instances (always compatible) ...
CREATE INDEX pending_instances_unpinned_idx ON pending_instances (claimable_at_ms)
    WHERE runnable AND pinned_major IS NULL;
-- ... and, per pinned version inside the filter's range, its oldest claimable instance.
CREATE INDEX pending_instances_pinned_idx
    ON pending_instances (pinned_major, pinned_minor, pinned_patch, claimable_at_ms)
    WHERE runnable AND pinned_major IS NOT NULL;
-- Orphans (stats, `instances orphans`).
CREATE INDEX pending_instances_orphan_idx ON pending_instances (instance_id)
    WHERE NOT runnable;

-- Ledger of the function files (migrations/functions/*.sql). A file is applied when its
-- revision is newer than the one recorded here, so an older release starting after a
-- newer one never puts its older definitions back.
CREATE TABLE _function_files (
    name        TEXT PRIMARY KEY,
    revision    INT NOT NULL,
    md5         TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
