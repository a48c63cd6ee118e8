#!/usr/bin/env bash
# Runs a command with a real PgBouncer in front of the PostgreSQL at $DATABASE_URL and
# its URL in $PGBOUNCER_URL. Meant to run inside scripts/with-postgres.sh:
#
#   scripts/with-postgres.sh scripts/with-pgbouncer.sh <command...>
#
# The PgBouncer is what managed offers put in front of PostgreSQL: pool_mode =
# transaction, max_prepared_statements left at its default (0, or absent on PgBouncer
# < 1.21), ignore_startup_parameters left empty (startup `options` are rejected). It
# listens on 127.0.0.1 (first free port from PGBOUNCER_PORT, default 16432), trusts
# clients (the user in DATABASE_URL, with its password if the URL has one, is the only
# entry of its auth file) and forwards every database name to DATABASE_URL's host and
# port. The Debian package `pgbouncer` is installed with apt-get if the binary is
# missing. Config, log and pid file live in a temp dir; PgBouncer is stopped and the
# dir deleted when the command ends (the log is printed first if the command failed).
#
# Exits with the command's exit code.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command...>" >&2
  exit 2
fi
log() { echo "with-pgbouncer: $*" >&2; }

: "${DATABASE_URL:?DATABASE_URL must be set (run inside scripts/with-postgres.sh)}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else
    log "need root (or sudo) to run: $*"
    return 1
  fi
}

bin=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
if [ -z "$bin" ]; then
  log "pgbouncer not found; installing the pgbouncer package"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >&2
  bin=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
  [ -n "$bin" ] || { log "pgbouncer still not found after installing"; exit 1; }
fi

# postgres[ql]://user[:password]@host[:port]/db[?params]
re='^postgres(ql)?://([^:@/]+)(:([^@/]*))?@([^:/?]+)(:([0-9]+))?/([^?]+)(\?.*)?$'
if ! [[ $DATABASE_URL =~ $re ]]; then
  log "cannot parse DATABASE_URL (expected postgres://user[:password]@host[:port]/db)"
  exit 1
fi
db_user=${BASH_REMATCH[2]}
db_password=${BASH_REMATCH[4]}
db_host=${BASH_REMATCH[5]}
db_port=${BASH_REMATCH[7]:-5432}
db_name=${BASH_REMATCH[8]}

# Free = nothing listens on the port and no connection uses it as its local port (an
# outgoing connection takes ports of the ephemeral range, 32768-60999 on Linux; a
# connect test does not see those, and PgBouncer's bind() then fails). The default sits
# below that range; a bind that fails anyway moves on to the next port (below).
port_free() {
  if command -v ss >/dev/null 2>&1; then
    [ -z "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
  else
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
port=${PGBOUNCER_PORT:-16432}

# PgBouncer refuses to run as root: run it as the postgres OS user in that case.
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres \
      || adduser --system --group --home /var/lib/postgresql postgres >&2
  fi
  as_bouncer() { (cd / && runuser -u postgres -- "$@"); }
else
  as_bouncer() { "$@"; }
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/with-pgbouncer.XXXXXX")
chmod 755 "$tmp"
printf '"%s" "%s"\n' "$db_user" "$db_password" >"$tmp/userlist.txt"
write_ini() {
cat >"$tmp/pgbouncer.ini" <<EOF
[databases]
* = host=$db_host port=$db_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $tmp/userlist.txt
pool_mode = transaction
; the suite runs 8 test threads of up to 5 provider connections each: 40 server
; connections, so a test's call does not queue in the pooler behind other tests (some
; conformance tests allow 200 ms between two calls); PostgreSQL's 100 leave room for the
; direct LISTEN and migration connections
max_client_conn = 500
default_pool_size = 40
; Server connections are recycled after 10 s. A pooled server connection serves every
; test schema in turn, and PL/pgSQL keeps the compiled functions and cached plans of
; each (dropped schemas' included) for the connection's life; every catalog change the
; other tests make (each one migrates a fresh schema) makes the server walk all of them
; at the start of the next transaction. After a minute of the suite that made a bare
; BEGIN take 0.3-0.8 s and failed timing-sensitive tests. A production deployment does
; not create and drop schemas all day, so keeping connections longer is fine there.
server_lifetime = 10
logfile = $tmp/pgbouncer.log
pidfile = $tmp/pgbouncer.pid
EOF
}

cleanup() {
  local rc=$?
  if [ -s "$tmp/pgbouncer.pid" ]; then
    kill "$(cat "$tmp/pgbouncer.pid")" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -e "$tmp/pgbouncer.pid" ] || break
      sleep 0.1
    done
  fi
  if [ "$rc" -ne 0 ] && [ -s "$tmp/pgbouncer.log" ]; then
    log "PgBouncer log (last 40 lines):"
    tail -n 40 "$tmp/pgbouncer.log" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_on_free_port() {
  for _ in $(seq 20); do
    while ! port_free "$port"; do port=$((port + 1)); done
    write_ini
    : >"$tmp/pgbouncer.log"
    if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$tmp"; fi
    if ! as_bouncer "$bin" -d -q "$tmp/pgbouncer.ini"; then
      cat "$tmp/pgbouncer.log" >&2 || true
      log "could not start pgbouncer"
      exit 1
    fi
    PGBOUNCER_URL="postgres://$db_user${db_password:+:$db_password}@127.0.0.1:$port/$db_name?sslmode=disable"
    for _ in $(seq 50); do
      if PGCONNECT_TIMEOUT=3 psql "$PGBOUNCER_URL" -XAtqc 'select 1' >/dev/null 2>&1; then
        return 0
      fi
      if grep -q "nowhere to listen" "$tmp/pgbouncer.log" 2>/dev/null; then
        break
      fi
      sleep 0.1
    done
    if grep -q "nowhere to listen" "$tmp/pgbouncer.log" 2>/dev/null; then
      log "port $port was taken when PgBouncer bound it; trying the next one"
      port=$((port + 1))
      continue
    fi
    log "PgBouncer on port $port does not answer"
    exit 1
  done
  log "no free port found for PgBouncer"
  exit 1
}

start_on_free_port
export PGBOUNCER_URL
log "PgBouncer $("$bin" --version | awk 'NR==1{print $2}') (transaction mode) on 127.0.0.1:$port -> $db_host:$db_port"
set +e
"$@"
exit $?
