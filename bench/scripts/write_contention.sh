#!/usr/bin/env bash
# Write-side cost of the claim state (issue #10): many writers enqueueing for ONE
# instance at once (fan-in of completions, a burst of events). Runs pgbench with 8
# clients inserting ExternalRaised messages for one existing instance, against a schema
# built from the migrations of a BEFORE revision (default 76d655d, the queue-row claim)
# and one built from the working tree (claim by instance: pending_instances and its
# enqueue trigger). Also runs the same with 8 distinct instances, as the no-contention
# reference. Prints transactions/s and mean latency per case.
#
#   bench/scripts/write_contention.sh [BEFORE_REV] [SECONDS]
#
# Needs psql and pgbench, and DATABASE_URL (default: local postgres).
set -euo pipefail
cd "$(dirname "$0")/../.."
before=${1:-76d655d}
secs=${2:-10}
export PGOPTIONS="-c client_min_messages=warning"
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}
work=$(mktemp -d)
trap 'rm -rf "$work"; psql "$url" -Xq -c "DROP SCHEMA IF EXISTS wc_before CASCADE" -c "DROP SCHEMA IF EXISTS wc_after CASCADE" >/dev/null 2>&1 || true' EXIT

. bench/scripts/lib.sh
# An existing, idle instance receives the messages (8 of them for the reference run).
instances="INSERT INTO instances (instance_id, orchestration_name, orchestration_version, created_at_ms, updated_at_ms)
  SELECT 'i' || g, 'O', '1.0.0', now_ms(), now_ms() FROM generate_series(1, 8) g;"
migrations_at "$before" before
build_schema wc_before "${MIGRATIONS[@]}" <<<"$instances"
build_schema wc_after migrations/*.sql migrations/functions/*.sql <<<"$instances"

run() { # schema, instance expression
  cat >"$work/script.sql" <<SQL
INSERT INTO $1.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms)
SELECT $2, 'ExternalRaised', '{"ExternalRaised":{"instance":"i","name":"E","data":"x"}}', c.now, c.now
FROM (SELECT $1.now_ms() AS now) c;
SELECT $1.notify_work_available('orchestrator', 1);
SQL
  pgbench "$url" -n -c 8 -j 2 -T "$secs" -f "$work/script.sql" 2>/dev/null |
    awk -v label="$3" '/^latency average/ {lat=$4} /^tps/ {tps=$3} END {printf "%-44s %10.0f tx/s  %7.3f ms mean\n", label, tps, lat}'
}

echo "pgbench: 8 clients, ${secs}s, one INSERT + NOTIFY per transaction ($(psql "$url" -XAtc 'show server_version'))"
run wc_before "'i1'" "before ($before), 8 writers -> 1 instance"
run wc_after "'i1'" "after (working tree), 8 writers -> 1 instance"
run wc_before "'i' || (1 + :client_id % 8)" "before ($before), 8 writers -> 8 instances"
run wc_after "'i' || (1 + :client_id % 8)" "after (working tree), 8 writers -> 8 instances"
