-- Worker claims walk only the items nobody holds (issue 13).
--
-- worker_queue_ready_idx covers every item, leased or not. Leasing an item updates its
-- row (a new index entry) and acking deletes it, so each item leaves dead entries at the
-- front of that index. Under load the front page changes all the time, and a btree scan
-- only marks entries dead on a page that did not change since it read it, so the dead
-- entries pile up until VACUUM and every claim walked them (measured: 250-770 buffer
-- hits, 0.5-5 ms, to find one item in a 450-item queue). This index holds unleased items
-- only: a lease moves the row out of it, and new items enter at the tail, away from the
-- front. Items whose lease expired are found through worker_queue_lease_idx
-- (claim_worker_item, migrations/functions/09_handover.sql revision 3).
--
-- worker_queue_ready_idx stays: the next-wake-up query uses it, and so do claims of
-- releases before this one during a rolling upgrade.
--
-- A plain CREATE INDEX (migrations run in a transaction): it blocks writes to the worker
-- queue while it builds, which on a queue of normal size takes milliseconds.
CREATE INDEX worker_queue_unleased_idx ON worker_queue (visible_at_ms, id)
    WHERE lock_token IS NULL;
