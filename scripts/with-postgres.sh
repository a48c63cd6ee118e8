#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a PostgreSQL that answers.
#
#   scripts/with-postgres.sh <command...>
#
# Order of preference:
#   1. $DATABASE_URL, if set and answering;
#   2. postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable, if answering;
#   3. a throwaway cluster (initdb into a temp dir, fsync off, trust auth, 127.0.0.1 only),
#      installing the PostgreSQL server packages with apt-get if none are found. It is
#      stopped and deleted when the command ends.
#
# Environment:
#   PG_FORCE_THROWAWAY=1   skip steps 1 and 2
#   PG_THROWAWAY_PORT=N    first port to try for the throwaway cluster (default 15432)
#
# Exits with the command's exit code.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command...>" >&2
  exit 2
fi

log() { echo "with-postgres: $*" >&2; }

# postgres://user:secret@host/db -> postgres://user:***@host/db (and password=... in the query)
redact() {
  sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#; s#([?&]password=)[^&]*#\1***#I' <<<"$1"
}

answers() {
  local url=$1
  if command -v psql >/dev/null 2>&1; then
    PGCONNECT_TIMEOUT=3 psql "$url" -XAtqc 'select 1' >/dev/null 2>&1
  elif command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -t 3 -d "$url" >/dev/null 2>&1
  else
    return 1
  fi
}

run() {
  set +e
  "$@"
  local rc=$?
  set -e
  return "$rc"
}

if [ "${PG_FORCE_THROWAWAY:-0}" != 1 ]; then
  if [ -n "${DATABASE_URL:-}" ] && answers "$DATABASE_URL"; then
    log "using PostgreSQL at $(redact "$DATABASE_URL") (DATABASE_URL)"
    exec "$@"
  fi
  [ -n "${DATABASE_URL:-}" ] && log "DATABASE_URL=$(redact "$DATABASE_URL") does not answer"
  # No TLS on loopback: every new TLS connection costs the client tens of ms of CPU.
  local_url="postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
  if answers "$local_url"; then
    export DATABASE_URL=$local_url
    log "using PostgreSQL at $local_url (local server)"
    exec "$@"
  fi
fi

# ---- throwaway cluster -------------------------------------------------------------

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else
    log "need root (or sudo) to run: $*"
    return 1
  fi
}

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  fi
  for d in initdb pg_ctl; do command -v "$d" >/dev/null 2>&1 || return 1; done
  dirname "$(readlink -f "$(command -v initdb)")"
}

bindir=$(find_bindir || true)
if [ -z "$bindir" ]; then
  log "no PostgreSQL server binaries found; installing the postgresql package"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  bindir=$(find_bindir || true)
  [ -n "$bindir" ] || { log "PostgreSQL binaries still not found after installing"; exit 1; }
fi

# The server refuses to run as root: run it as the postgres OS user in that case.
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres \
      || adduser --system --group --home /var/lib/postgresql postgres >&2
  fi
  as_pg() { (cd / && runuser -u postgres -- "$@"); }
else
  as_pg() { "$@"; }
fi

# Free = nothing listens on the port and no connection uses it as its local port
# (outgoing connections take ports of the ephemeral range, 32768-60999 on Linux, which a
# connect test does not see; the default sits below that range).
port_free() {
  if command -v ss >/dev/null 2>&1; then
    [ -z "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
  else
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
port=${PG_THROWAWAY_PORT:-15432}
while ! port_free "$port"; do port=$((port + 1)); done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/with-postgres.XXXXXX")
chmod 755 "$tmp"
datadir=$tmp/data
[ "$(id -u)" -eq 0 ] && chown postgres: "$tmp"

cleanup() {
  as_pg "$bindir/pg_ctl" -D "$datadir" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

as_pg "$bindir/initdb" -D "$datadir" -U postgres -A trust -E UTF8 --no-locale >"$tmp/initdb.log" 2>&1 \
  || { cat "$tmp/initdb.log" >&2; log "initdb failed"; exit 1; }
if ! as_pg "$bindir/pg_ctl" -D "$datadir" -l "$tmp/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$tmp \
      -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  start >/dev/null; then
  cat "$tmp/server.log" >&2 || true
  log "could not start the throwaway cluster"
  exit 1
fi

export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
log "using PostgreSQL at $DATABASE_URL (throwaway cluster $("$bindir/postgres" --version | awk '{print $3}') in $tmp)"
run "$@"
