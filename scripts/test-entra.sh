#!/usr/bin/env bash
# Checks the two cargo features that pull in the Azure SDK (azure_core / azure_identity
# 0.35). They are kept out of scripts/test.sh: a cold build of the SDK takes about 3
# minutes on a 2-core machine (seconds once target/ has it).
#
#   entra              clippy, docs, unit tests and doctests of src/entra.rs; the
#                      compat-check crate with the Entra items of duroxide-pg's API
#   duroxide-pg-tests  (also run by scripts/test.sh) tests/compat.rs against a schema made
#                      by duroxide-pg 0.1.38, tests/adopt_duroxide_pg.rs
#
#   scripts/test-entra.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo clippy --release --features entra,duroxide-pg-tests --all-targets -- -D warnings
cargo clippy --release -p duroxide-pg-compat-check --features entra --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p duroxide-pg-hybrid --features entra
exec scripts/with-postgres.sh bash -c '
  cargo test --release --features entra --lib entra:: &&
  cargo test --release --features entra --doc -p duroxide-pg-hybrid &&
  cargo test --release -p duroxide-pg-compat-check --features entra &&
  cargo test --release --features duroxide-pg-tests --test compat'
