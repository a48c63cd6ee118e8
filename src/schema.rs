//! Schema management: identifier validation and quoting, migrations (embedded with sqlx
//! `migrate!`, applied inside the provider's own schema and recorded in the crate's own
//! ledger `_duroxide_pg_hybrid_migrations`, so an application's sqlx ledger can share the
//! schema), function
//! files (`migrations/functions/*.sql`, re-applied when their revision changes, ledger
//! `_function_files`), and verification when auto-migration is off.
//!
//! Tables and indexes only ever change through new migrations. A SQL function's current
//! definition lives in exactly one function file, so a change to it reads as a diff.

use sqlx::migrate::Migrator;
use sqlx::{Connection, Executor, PgPool};

use crate::errors::ConfigError;

/// The embedded migrations (`migrations/*.sql`). Their text names no schema: they run
/// with `search_path` set to the target schema, and every function captures it.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// One file of `migrations/functions/`: `CREATE OR REPLACE` definitions applied, in
/// file-name order and in one transaction, whenever the file's `-- revision: N` header is
/// newer than what the schema's `_function_files` ledger records.
#[derive(Debug)]
pub struct FunctionFile {
    /// File name, e.g. `03_claim.sql`.
    pub name: &'static str,
    /// The file's text.
    pub sql: &'static str,
}

impl FunctionFile {
    /// The `-- revision: N` header (0 when missing, which a unit test forbids).
    pub fn revision(&self) -> i32 {
        self.sql
            .lines()
            .take(5)
            .find_map(|l| l.trim().strip_prefix("-- revision:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

macro_rules! function_file {
    ($name:literal) => {
        FunctionFile {
            name: $name,
            sql: include_str!(concat!("../migrations/functions/", $name)),
        }
    };
}

/// The embedded function files, in the order they are applied.
pub static FUNCTION_FILES: &[FunctionFile] = &[
    function_file!("01_primitives.sql"),
    function_file!("02_pending_instances.sql"),
    function_file!("03_claim.sql"),
    function_file!("04_turn_reads.sql"),
    function_file!("05_ack.sql"),
    function_file!("06_turn_lease.sql"),
    function_file!("07_admin.sql"),
    function_file!("09_handover.sql"),
    function_file!("10_client_enqueue.sql"),
];

/// This crate's migration ledger, in the provider's schema. Not sqlx's `_sqlx_migrations`:
/// `new(url)` uses `public` (as duroxide-pg does), where an application's own sqlx
/// migrations may keep that table.
pub const LEDGER_TABLE: &str = "_duroxide_pg_hybrid_migrations";

/// The ledger releases before 0.2.0 kept (sqlx's default). Rows of our migrations found
/// there (same version and checksum) are taken over into [`LEDGER_TABLE`]; the table is
/// left as it is, so a process of such a release still starts on the schema.
pub const LEGACY_LEDGER_TABLE: &str = "_sqlx_migrations";

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Accepts `[a-z_][a-z0-9_]*`, at most 63 bytes, not `pg_*`.
///
/// Upper case is rejected rather than folded: PostgreSQL folds unquoted names and keeps
/// quoted ones, so `Tenant` and `tenant` would silently be two schemas depending on how
/// a tool spells it.
///
/// # Errors
/// A `ConfigError` naming the schema and the rule it breaks.
pub fn validate_schema_name(name: &str) -> Result<(), ConfigError> {
    let fail = |why: &str| Err(ConfigError::new(format!("schema name {name:?} {why}")));
    if name.is_empty() {
        return fail("is empty");
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return fail("is longer than 63 bytes (PostgreSQL would truncate it)");
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or('_');
    if !(first.is_ascii_lowercase() || first == '_') {
        return fail("must start with a lower-case letter or '_'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return fail("may contain only lower-case ASCII letters, digits and '_'");
    }
    if name.starts_with("pg_") {
        return fail("must not start with 'pg_' (reserved for system schemas)");
    }
    Ok(())
}

/// Quotes an identifier for SQL text (`"name"`, inner quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Newest migration version this binary knows.
pub fn expected_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// State of a schema's migration ledger compared with this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Versions recorded in the schema's ledger ([`LEDGER_TABLE`]), ascending.
    pub applied: Vec<i64>,
    /// Versions this binary would apply, ascending.
    pub pending: Vec<i64>,
    /// Applied versions this binary does not know (a newer binary migrated the schema).
    pub unknown: Vec<i64>,
    /// Applied versions whose checksum differs from the embedded file.
    pub checksum_mismatch: Vec<i64>,
    /// Function files this binary would (re-)apply: missing from the ledger, older
    /// revision, or same revision with different text.
    pub functions_pending: Vec<String>,
    /// Function files the schema holds at a newer revision than this binary (a newer
    /// release applied them; this one keeps working with them).
    pub functions_newer: Vec<String>,
}

impl SchemaStatus {
    /// True when a newer release migrated the schema and this binary has nothing to add:
    /// every migration it knows is applied unchanged, and its function files are not
    /// newer than the schema's. It runs on such a schema as it is (rolling upgrade).
    pub fn is_newer_compatible(&self) -> bool {
        !self.unknown.is_empty()
            && self.pending.is_empty()
            && self.checksum_mismatch.is_empty()
            && self.functions_pending.is_empty()
    }

    /// True when the schema is exactly at this binary's version.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
            && self.unknown.is_empty()
            && self.checksum_mismatch.is_empty()
            && self.functions_pending.is_empty()
    }
}

fn lock_key(schema: &str) -> String {
    format!("duroxide-pg-hybrid:migrate:{schema}")
}

/// Creates the schema if needed and applies pending migrations.
///
/// Concurrent callers (many pods starting at once) serialise on a session advisory lock
/// scoped to the schema; the first applies, the others find nothing to do. The work runs
/// on a connection detached from the pool, so its `search_path` never leaks into the pool.
///
/// # Errors
/// Database errors (e.g. missing `CREATE` privilege) and migration failures, with the
/// schema named.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    validate_schema_name(schema).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    // Nothing to do is the common case at start-up, and it must not need DDL rights:
    // a least-privilege role connects to a schema an administrator migrated. A schema a
    // newer release already migrated is fine too (rolling upgrade: migrations keep every
    // table, column and function an older release uses).
    let st = status(pool, schema).await?;
    if st.is_current() || st.is_newer_compatible() {
        if !st.unknown.is_empty() {
            tracing::info!(
                target: crate::provider::TRACING_TARGET,
                schema,
                newer_migrations = ?st.unknown,
                "schema was migrated by a newer release; running on it unchanged"
            );
        }
        return Ok(());
    }
    let mut conn = pool.acquire().await?.detach();
    let result = async {
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(lock_key(schema))
            .execute(&mut conn)
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            conn.execute(format!("CREATE SCHEMA {}", quote_ident(schema)).as_str())
                .await?;
        }
        conn.execute(format!("SET search_path TO {}, pg_temp", quote_ident(schema)).as_str())
            .await?;
        apply_migrations(&mut conn).await?;
        apply_function_files(&mut conn).await
    }
    .await;
    // Closing the detached connection also releases the advisory lock.
    let _ = conn.close().await;
    result
}

/// [`migrate`] through a transaction-mode pooler (PgBouncer `pool_mode = transaction`),
/// where a session-level advisory lock would stay on whichever server connection the
/// pooler picked and `SET search_path` would leak to other clients. Everything runs in
/// ONE transaction: the ledger check, then (if something is pending) a
/// `pg_advisory_xact_lock` on the same key as [`migrate`]'s session lock (so a migration
/// through the pooler and one on a direct connection exclude each other), `SET LOCAL
/// search_path`, every pending migration (each under a savepoint) and the function files.
/// A failure rolls back all of it. Statements are unnamed (PgBouncer's default
/// `max_prepared_statements = 0`).
///
/// # Errors
/// As [`migrate`].
pub async fn migrate_through_pooler(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    validate_schema_name(schema).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    let mut tx = pool.begin().await?;
    let st = status_on(&mut tx, schema).await?;
    if st.is_current() || st.is_newer_compatible() {
        return tx.commit().await;
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(lock_key(schema))
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .persistent(false)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        tx.execute(format!("CREATE SCHEMA {}", quote_ident(schema)).as_str())
            .await?;
    }
    tx.execute(format!("SET LOCAL search_path TO {}, pg_temp", quote_ident(schema)).as_str())
        .await?;
    apply_migrations(&mut tx).await?;
    apply_function_files(&mut tx).await?;
    tx.commit().await
}

/// Creates the ledger (taking over a pre-0.2.0 release's rows) and applies every pending
/// migration, each in its own transaction with its ledger row. Runs under the migration
/// lock with `search_path` set to the schema.
async fn apply_migrations(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    conn.execute(
        format!(
            "CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), \
             success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)"
        )
        .as_str(),
    )
    .await?;
    let legacy: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = $1)",
    )
    .bind(LEGACY_LEDGER_TABLE)
    .persistent(false)
    .fetch_one(&mut *conn)
    .await?;
    if legacy {
        let (versions, checksums): (Vec<i64>, Vec<Vec<u8>>) = MIGRATOR
            .iter()
            .map(|m| (m.version, m.checksum.to_vec()))
            .unzip();
        sqlx::query(&format!(
            "INSERT INTO {LEDGER_TABLE} (version, description, installed_on, success, checksum, execution_time) \
             SELECT l.version, l.description, l.installed_on, l.success, l.checksum, l.execution_time \
             FROM {LEGACY_LEDGER_TABLE} l \
             JOIN unnest($1::BIGINT[], $2::BYTEA[]) AS ours(version, checksum) \
               ON ours.version = l.version AND ours.checksum = l.checksum \
             WHERE l.success \
             ON CONFLICT (version) DO NOTHING"
        ))
        .bind(&versions)
        .bind(&checksums)
        .persistent(false)
        .execute(&mut *conn)
        .await?;
    }
    let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(&format!(
        "SELECT version, checksum FROM {LEDGER_TABLE} WHERE success"
    ))
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    for m in MIGRATOR.iter() {
        match applied.iter().find(|(v, _)| *v == m.version) {
            Some((_, sum)) if sum.as_slice() == &*m.checksum => continue,
            Some(_) => {
                return Err(sqlx::Error::Configuration(
                    format!(
                        "migration {} ({}) was applied with different contents than this binary's",
                        m.version, m.description
                    )
                    .into(),
                ));
            }
            None => {}
        }
        let started = std::time::Instant::now();
        let mut tx = conn.begin().await?;
        tx.execute(&*m.sql).await?;
        sqlx::query(&format!(
            "INSERT INTO {LEDGER_TABLE} (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, TRUE, $3, $4)"
        ))
        .bind(m.version)
        .bind(&*m.description)
        .bind(&*m.checksum)
        .bind(i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX))
        .persistent(false)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            target: crate::provider::TRACING_TARGET,
            version = m.version,
            description = %m.description,
            "applied migration"
        );
    }
    Ok(())
}

/// Applies the function files whose revision is newer than the ledger's (or whose text
/// differs at the same revision), in one transaction. Runs under the migration lock with
/// `search_path` set to the schema.
async fn apply_function_files(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    let ledger = read_function_ledger(&mut *tx, "_function_files").await?;
    for file in FUNCTION_FILES {
        if !function_file_pending(file, &ledger) {
            continue;
        }
        tx.execute(file.sql).await?;
        sqlx::query(
            "INSERT INTO _function_files (name, revision, md5) VALUES ($1, $2, md5($3)) \
             ON CONFLICT (name) DO UPDATE SET revision = EXCLUDED.revision, md5 = EXCLUDED.md5, \
             applied_at = now()",
        )
        .bind(file.name)
        .bind(file.revision())
        .bind(file.sql)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            target: crate::provider::TRACING_TARGET,
            file = file.name,
            revision = file.revision(),
            "applied function file"
        );
    }
    tx.commit().await
}

/// Ledger rows: name, revision, and whether the stored md5 equals this binary's text.
struct LedgerRow {
    name: String,
    revision: i32,
    same_text: bool,
}

/// `table`: the ledger's (quoted, validated) name as the caller's search_path needs it.
async fn read_function_ledger<'e, E>(
    executor: E,
    table: &str,
) -> Result<Vec<LedgerRow>, sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let names: Vec<&str> = FUNCTION_FILES.iter().map(|f| f.name).collect();
    let texts: Vec<&str> = FUNCTION_FILES.iter().map(|f| f.sql).collect();
    let rows: Vec<(String, i32, bool)> = sqlx::query_as(&format!(
        "SELECT l.name, l.revision, l.md5 = md5(f.sql) \
         FROM {table} l JOIN unnest($1::text[], $2::text[]) AS f(name, sql) USING (name)"
    ))
    .bind(&names)
    .bind(&texts)
    .persistent(false)
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, revision, same_text)| LedgerRow {
            name,
            revision,
            same_text,
        })
        .collect())
}

fn function_file_pending(file: &FunctionFile, ledger: &[LedgerRow]) -> bool {
    match ledger.iter().find(|r| r.name == file.name) {
        None => true,
        Some(r) => r.revision < file.revision() || (r.revision == file.revision() && !r.same_text),
    }
}

/// Applied migrations (version, checksum) of `schema`: this crate's ledger, else the rows
/// of our migrations in a pre-0.2.0 release's sqlx ledger, else none.
async fn read_migration_ledger(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::TEXT FROM pg_tables WHERE schemaname = $1 AND tablename = ANY($2)",
    )
    .bind(schema)
    .bind([LEDGER_TABLE, LEGACY_LEDGER_TABLE])
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    let q = quote_ident(schema);
    if tables.iter().any(|t| t == LEDGER_TABLE) {
        return sqlx::query_as(&format!(
            "SELECT version, checksum FROM {q}.{LEDGER_TABLE} WHERE success ORDER BY version"
        ))
        .persistent(false)
        .fetch_all(&mut *conn)
        .await;
    }
    if tables.iter().any(|t| t == LEGACY_LEDGER_TABLE) {
        // Only our own rows: an application's sqlx ledger may share the schema.
        let ours: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        return sqlx::query_as(&format!(
            "SELECT version, checksum FROM {q}.{LEGACY_LEDGER_TABLE} \
             WHERE success AND version = ANY($1) ORDER BY version"
        ))
        .bind(&ours)
        .persistent(false)
        .fetch_all(&mut *conn)
        .await;
    }
    Ok(Vec::new())
}

/// Reads the schema's ledger and compares it with the embedded migrations.
///
/// # Errors
/// Database errors; a schema without a ledger reports every migration as pending.
pub async fn status(pool: &PgPool, schema: &str) -> Result<SchemaStatus, sqlx::Error> {
    validate_schema_name(schema).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    status_on(&mut *pool.acquire().await?, schema).await
}

/// [`status`] on one connection (inside the caller's transaction behind a transaction
/// pooler). Statements are unnamed: nothing is left prepared on the server.
async fn status_on(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<SchemaStatus, sqlx::Error> {
    // A duroxide-pg schema: refuse clearly instead of failing inside CREATE TABLE.
    crate::incumbent::refuse_if_present_on(&mut *conn, schema).await?;
    let rows = read_migration_ledger(&mut *conn, schema).await?;
    let function_ledger_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = '_function_files')",
    )
    .bind(schema)
    .persistent(false)
    .fetch_one(&mut *conn)
    .await?;
    let ledger = if function_ledger_exists {
        let table = format!("{}._function_files", quote_ident(schema));
        read_function_ledger(&mut *conn, &table).await?
    } else {
        Vec::new()
    };
    let mut st = SchemaStatus {
        applied: rows.iter().map(|r| r.0).collect(),
        pending: Vec::new(),
        unknown: Vec::new(),
        checksum_mismatch: Vec::new(),
        functions_pending: FUNCTION_FILES
            .iter()
            .filter(|f| function_file_pending(f, &ledger))
            .map(|f| f.name.to_string())
            .collect(),
        functions_newer: ledger
            .iter()
            .filter(|r| {
                FUNCTION_FILES
                    .iter()
                    .any(|f| f.name == r.name && r.revision > f.revision())
            })
            .map(|r| r.name.clone())
            .collect(),
    };
    for m in MIGRATOR.iter() {
        match rows.iter().find(|r| r.0 == m.version) {
            None => st.pending.push(m.version),
            Some(r) if r.1.as_slice() != &*m.checksum => st.checksum_mismatch.push(m.version),
            Some(_) => {}
        }
    }
    st.unknown = st
        .applied
        .iter()
        .copied()
        .filter(|v| !MIGRATOR.iter().any(|m| m.version == *v))
        .collect();
    Ok(st)
}

/// Fails unless the schema is at this binary's version, or at a newer release's with
/// nothing this binary would add (see [`SchemaStatus::is_newer_compatible`]). Used when
/// auto-migration is off.
///
/// # Errors
/// A configuration error naming the schema, the versions found and expected, and what to
/// run; or a database error.
pub async fn verify(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    check_verified(schema, status(pool, schema).await?)
}

/// [`verify`] through a transaction-mode pooler: the ledger reads run in one
/// transaction, so they stay on one server connection.
pub(crate) async fn verify_through_pooler(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    validate_schema_name(schema).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    let mut tx = pool.begin().await?;
    let st = status_on(&mut tx, schema).await?;
    tx.commit().await?;
    check_verified(schema, st)
}

fn check_verified(schema: &str, st: SchemaStatus) -> Result<(), sqlx::Error> {
    if st.is_current() || st.is_newer_compatible() {
        return Ok(());
    }
    let found = st.applied.last().copied().unwrap_or(0);
    let msg = if !st.unknown.is_empty() {
        format!(
            "schema {schema:?} is at migration {found}, newer than this binary ({}); upgrade the binary",
            expected_version()
        )
    } else if !st.checksum_mismatch.is_empty() {
        format!(
            "schema {schema:?}: applied migrations {:?} differ from this binary's files",
            st.checksum_mismatch
        )
    } else if !st.pending.is_empty() {
        format!(
            "schema {schema:?} is at migration {found}, this binary expects {}; pending {:?}: \
             run migrations (auto_migrate = true, or `duroxide-pg-hybrid migrate up`)",
            expected_version(),
            st.pending
        )
    } else {
        format!(
            "schema {schema:?}: function files {:?} are older than this binary's: \
             run migrations (auto_migrate = true, or `duroxide-pg-hybrid migrate up`)",
            st.functions_pending
        )
    };
    Err(sqlx::Error::Configuration(msg.into()))
}

/// The SQL a DBA would run to create or upgrade `schema` by hand: every pending
/// migration wrapped with the `search_path` it needs, plus the ledger rows.
pub fn migration_sql(schema: &str) -> Result<String, ConfigError> {
    validate_schema_name(schema)?;
    let q = quote_ident(schema);
    let mut out = format!(
        "-- duroxide-pg-hybrid migrations for schema {schema}\nCREATE SCHEMA IF NOT EXISTS {q};\n\
         SET search_path TO {q}, pg_temp;\n\
         CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, \
         execution_time BIGINT NOT NULL);\n"
    );
    for m in MIGRATOR.iter() {
        let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!(
            "\n-- migration {} {}\nBEGIN;\n{}\nINSERT INTO {LEDGER_TABLE} (version, description, success, checksum, execution_time) \
             VALUES ({}, '{}', TRUE, '\\x{}', -1);\nCOMMIT;\n",
            m.version,
            m.description,
            m.sql.trim_end(),
            m.version,
            m.description.replace('\'', "''"),
            hex
        ));
    }
    out.push_str("\n-- function files (current definitions of every SQL function)\nBEGIN;\n");
    for f in FUNCTION_FILES {
        out.push_str(&format!(
            "\n-- function file {} revision {}\n{}\nINSERT INTO _function_files (name, revision, md5) \
             VALUES ('{}', {}, md5($dpgh_file${}$dpgh_file$)) ON CONFLICT (name) DO UPDATE \
             SET revision = EXCLUDED.revision, md5 = EXCLUDED.md5, applied_at = now();\n",
            f.name,
            f.revision(),
            f.sql.trim_end(),
            f.name,
            f.revision(),
            f.sql
        ));
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["duroxide", "_x", "tenant_42", &"a".repeat(63)] {
            assert!(validate_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Duroxide",
            "a-b",
            "a;drop",
            "x\"y",
            "1abc",
            "pg_x",
            "ünï",
            &"a".repeat(64),
        ] {
            let err = validate_schema_name(bad).unwrap_err();
            assert!(err.to_string().contains("schema name"), "{bad}: {err}");
        }
    }

    #[test]
    fn function_files_are_all_embedded_with_a_revision() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/functions");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = FUNCTION_FILES.iter().map(|f| f.name).collect();
        assert_eq!(
            on_disk, embedded,
            "FUNCTION_FILES must list every file, in order"
        );
        for f in FUNCTION_FILES {
            assert!(
                f.revision() > 0,
                "{} has no `-- revision: N` header",
                f.name
            );
            assert!(
                !f.sql.contains("$dpgh_file$"),
                "{} uses the print-sql quote tag",
                f.name
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("abc"), "\"abc\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn print_sql_covers_every_migration() {
        let sql = migration_sql("tenant").unwrap();
        for m in MIGRATOR.iter() {
            assert!(sql.contains(&format!("VALUES ({}", m.version)));
        }
        for f in FUNCTION_FILES {
            assert!(sql.contains(&format!("-- function file {}", f.name)));
        }
        assert!(migration_sql("bad;name").is_err());
    }
}
