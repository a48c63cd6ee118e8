#!/usr/bin/env bash
# Server cost of the worker side of a fan-out, per call, without the runtime (issue 13).
# pgbench (one client, prepared statements, one transaction per statement, as the
# provider sends them) runs, per transaction: an instance and its execution created,
# five activities queued, five worker claims (claim_worker_item), five worker acks
# (ack_work_item_handover, fan-in grace 20 ms, no hand-over), then the rows removed.
# Each revision gets its own schema, built from its migrations; rounds alternate between
# them and VACUUM the schema first (the claims' index scans slow down as acked items
# pile up between vacuums). Prints per round: the mean of one claim, and of each ack
# (the first holds the grace, the last ends it).
#
#   bench/scripts/worker_cycle.sh [BEFORE_REV] [ROUNDS] [SECONDS]
#
# Needs psql and pgbench, and DATABASE_URL (default: local postgres). Per-call means
# include pgbench's round trip (≈ 0.07 ms for `SELECT 1` on loopback).
set -euo pipefail
cd "$(dirname "$0")/../.."
before=${1:-HEAD}
rounds=${2:-3}
secs=${3:-10}
export PGOPTIONS="-c client_min_messages=warning"
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}
work=$(mktemp -d)
trap 'rm -rf "$work"; psql "$url" -Xq -c "DROP SCHEMA IF EXISTS wcyc_before CASCADE" -c "DROP SCHEMA IF EXISTS wcyc_after CASCADE" >/dev/null 2>&1 || true' EXIT

. bench/scripts/lib.sh
migrations_at "$before" before
build_schema wcyc_before "${MIGRATIONS[@]}" </dev/null
build_schema wcyc_after migrations/*.sql migrations/functions/*.sql </dev/null

script() { # schema
  local s=$1
  echo '\set n random(1, 2000000000)'
  echo "INSERT INTO $s.instances (instance_id, orchestration_name, created_at_ms, updated_at_ms) VALUES ('i' || :n, 'o', 0, 0);"
  echo "INSERT INTO $s.executions (instance_id, execution_id, started_at_ms) VALUES ('i' || :n, 1, 0);"
  echo "INSERT INTO $s.worker_queue (work_item, instance_id, execution_id, activity_id, visible_at_ms, created_at_ms) SELECT '{\"ActivityExecute\":{}}', 'i' || :n, 1, g, $s.now_ms(), $s.now_ms() FROM generate_series(1, 5) g;"
  for k in 1 2 3 4 5; do
    echo "SELECT o_instance_id FROM $s.claim_worker_item('t$k-' || :n, 30000, false, 'w', 30000, 3, '{}', true, false);"
  done
  for k in 1 2 3 4 5; do
    echo "SELECT o_acked FROM $s.ack_work_item_handover('t$k-' || :n, 'i' || :n, 'ActivityCompleted', '{\"ActivityCompleted\":{\"id\":$k}}', 'c$k-' || :n, NULL, 30000, false, 0, 0, 0, 0, 0, 0, false, NULL, NULL, NULL, 20);"
  done
  for t in orchestrator_queue pending_instances executions instances; do
    echo "DELETE FROM $s.$t WHERE instance_id = 'i' || :n;"
  done
}
script wcyc_before >"$work/before.pgbench"
script wcyc_after >"$work/after.pgbench"

run() { # schema, label
  psql "$url" -Xq -c "VACUUM $1.worker_queue, $1.orchestrator_queue, $1.pending_instances, $1.enqueue_ledger"
  pgbench "$url" -n -T "$secs" -M prepared -r -f "$work/${1#wcyc_}.pgbench" 2>/dev/null |
    awk -v label="$2" '/claim_worker_item/ {c += $1; nc++} /ack_work_item_handover/ {a[++na] = $1}
      END {printf "%-28s claim %.3f  acks", label, c / nc; for (i = 1; i <= na; i++) printf " %.3f", a[i]; print " ms"}'
}

echo "pgbench: 1 client, ${secs}s per run, ms per call ($(psql "$url" -XAtc 'show server_version'))"
# The order alternates: the second run of a pair was measured slower than the first.
for r in $(seq "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then
    run wcyc_before "round $r before ($before)"
    run wcyc_after "round $r after (working tree)"
  else
    run wcyc_after "round $r after (working tree)"
    run wcyc_before "round $r before ($before)"
  fi
done
