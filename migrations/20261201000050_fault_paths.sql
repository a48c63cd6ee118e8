-- Fault paths: a ledger that makes client enqueues and worker acks safe to resend. (The
-- notification functions of the same change, notify_worker_items and notify_delayed, live
-- in migrations/functions/01_primitives.sql with the payload formats.)

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
