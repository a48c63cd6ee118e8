# Shared by the pgbench scripts in this directory (sourced, not run). Expects $url (the
# database) and $work (a scratch directory) to be set.

# Writes the migration files of git revision $1 (table migrations, then function files,
# the adoption kit left out) into $work/$2 and sets MIGRATIONS to them, in order.
migrations_at() {
  local rev=$1 dir=$work/$2 f
  mkdir -p "$dir/functions"
  for f in $(git ls-tree -r --name-only "$rev" migrations/ | grep '\.sql$' | grep -v adoption/); do
    git show "$rev:$f" >"$dir/${f#migrations/}"
  done
  MIGRATIONS=("$dir"/*.sql)
  if compgen -G "$dir/functions/*.sql" >/dev/null; then
    MIGRATIONS+=("$dir"/functions/*.sql)
  fi
}

# Creates schema $1 afresh from the migration files that follow, plus any SQL on stdin.
build_schema() {
  local schema=$1; shift
  {
    echo "DROP SCHEMA IF EXISTS $schema CASCADE; CREATE SCHEMA $schema; SET search_path TO $schema;"
    cat "$@"
    cat
  } >"$work/$schema.sql"
  psql "$url" -Xq -v ON_ERROR_STOP=1 -f "$work/$schema.sql" >/dev/null
}
