#!/usr/bin/env bash
# The project's test command: docs (warnings denied), doctests, then every target of the
# workspace but the bench (lib unit tests, integration tests, the conformance suite for
# both fetch paths, long polling, round trips, mixed fleet, faults, TLS, the CLI, the
# live adoption of a running duroxide-pg 0.1.38 deployment `tests/adopt_duroxide_pg.rs`
# and `tests/compat.rs` against a real duroxide-pg schema, and the duroxide-pg API
# compile test `compat-check/`) against a PostgreSQL found or started by
# scripts/with-postgres.sh; then the tests that depend on the compiled-in default fetch
# path (lib, fetch_path) again, built with the `full-procedure` feature (the other tests
# name their path); then the conformance suite (both paths) and the mixed fleet through
# PgBouncer. The `entra` feature is checked by scripts/test-entra.sh.
#
# One build serves every phase: profile `ci` (Cargo.toml: dependencies as in release,
# this workspace's crates at opt-level 0) and the same features in every cargo call
# (`duroxide-pg-tests` pulls in duroxide-pg 0.1.38 and its Azure SDK; a phase with other
# features would rebuild sqlx and everything above it), so only the full-procedure phase
# compiles anything again (the library and two test binaries).
#
#   scripts/test.sh                 # everything
#   scripts/test.sh hybrid::        # extra arguments go to the test harness (filters etc.)
#
# TEST_THREADS (default 8): the conformance tests mostly sleep on 1 s locks, so more
# threads than cores pays off. Each test provider uses at most 5 connections for calls,
# 1 for migrations and 1 for LISTEN: 8 threads stay under the default max_connections
# of 100 (a test that finds the server full waits for a slot).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${TEST_THREADS:-8}
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --exclude duroxide-pg-hybrid-bench
export DUROXIDE_PG_TEST_REQUIRE_PGBOUNCER=1
exec scripts/with-postgres.sh scripts/with-pgbouncer.sh bash -c '
  threads=$0
  build=(--profile ci --features duroxide-pg-hybrid/duroxide-pg-tests)
  workspace=(--workspace --exclude duroxide-pg-hybrid-bench)
  cargo test "${build[@]}" --doc "${workspace[@]}" &&
  # Built first so the CLI binary exists (`cargo test` builds a package'"'"'s binaries only for
  # its own integration tests) and shares the tests'"'"' dependency build.
  cargo build "${build[@]}" "${workspace[@]}" --all-targets &&
  echo "== [${SECONDS}s] every target of the workspace" &&
  DUROXIDE_PG_HYBRID_CLI="${CARGO_TARGET_DIR:-$PWD/target}/ci/duroxide-pg-hybrid" \
    cargo test "${build[@]}" "${workspace[@]}" --all-targets -- --test-threads="$threads" "$@" &&
  echo "== [${SECONDS}s] with --features full-procedure (procedure path as the default)" &&
  cargo test --profile ci --features duroxide-pg-hybrid/duroxide-pg-tests,duroxide-pg-hybrid/full-procedure \
    --lib --test fetch_path -- --test-threads="$threads" "$@" &&
  echo "== [${SECONDS}s] through PgBouncer (transaction mode): conformance (both paths), mixed fleet" &&
  # 4 threads: every call is 4 round trips through the pooler, and several conformance
  # tests allow only 100-200 ms between calls or around 1 s leases.
  DUROXIDE_PG_TEST_VIA_PGBOUNCER=1 cargo test "${build[@]}" --test conformance -- --test-threads=4 "$@" &&
  DUROXIDE_PG_TEST_VIA_PGBOUNCER=1 cargo test "${build[@]}" --test mixed_fleet -- --test-threads="$threads" "$@" &&
  echo "== [${SECONDS}s] done"' "$threads" "$@"
