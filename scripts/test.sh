#!/usr/bin/env bash
# The project's test command: every target (lib unit tests, integration tests, the
# conformance suite for both fetch paths; `--all-targets` leaves out doctests) against a
# PostgreSQL found or started by scripts/with-postgres.sh.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh hybrid::        # extra arguments go to the test harness (filters etc.)
#
# TEST_THREADS (default 8): the conformance tests mostly sleep on 1 s locks, so more
# threads than cores pays off. Each test uses a pool of at most 5 connections plus one
# clean-up connection: 8 threads stay around 50 connections, under the default
# max_connections of 100.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${TEST_THREADS:-8}
exec scripts/with-postgres.sh cargo test --release --all-targets -- --test-threads="$threads" "$@"
