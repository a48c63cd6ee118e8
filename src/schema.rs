//! Schema management: identifier validation and quoting, migrations (sqlx `migrate!`,
//! run inside the provider's own schema with its own `_sqlx_migrations` ledger), and
//! verification when auto-migration is off.

use sqlx::migrate::Migrator;
use sqlx::{Connection, Executor, PgPool};

use crate::errors::ConfigError;

/// The embedded migrations (`migrations/*.sql`). Their text names no schema: they run
/// with `search_path` set to the target schema, and every function captures it.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

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
    /// Versions recorded in the schema's `_sqlx_migrations`, ascending.
    pub applied: Vec<i64>,
    /// Versions this binary would apply, ascending.
    pub pending: Vec<i64>,
    /// Applied versions this binary does not know (a newer binary migrated the schema).
    pub unknown: Vec<i64>,
    /// Applied versions whose checksum differs from the embedded file.
    pub checksum_mismatch: Vec<i64>,
}

impl SchemaStatus {
    /// True when the schema is exactly at this binary's version.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty() && self.unknown.is_empty() && self.checksum_mismatch.is_empty()
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
    // a least-privilege role connects to a schema an administrator migrated.
    if status(pool, schema).await?.is_current() {
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
        // sqlx's own (database-wide) migration lock is taken too; it is redundant with
        // ours but harmless, and keeps the static migrator untouched.
        MIGRATOR
            .run_direct(&mut conn)
            .await
            .map_err(sqlx::Error::from)
    }
    .await;
    // Closing the detached connection also releases the advisory lock.
    let _ = conn.close().await;
    result
}

/// Reads the schema's ledger and compares it with the embedded migrations.
///
/// # Errors
/// Database errors; a schema without a ledger reports every migration as pending.
pub async fn status(pool: &PgPool, schema: &str) -> Result<SchemaStatus, sqlx::Error> {
    validate_schema_name(schema).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
    // A duroxide-pg schema: refuse clearly instead of failing inside CREATE TABLE.
    crate::incumbent::refuse_if_present(pool, schema).await?;
    let ledger_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = '_sqlx_migrations')",
    )
    .bind(schema)
    .fetch_one(pool)
    .await?;
    let rows: Vec<(i64, Vec<u8>)> = if ledger_exists {
        sqlx::query_as(&format!(
            "SELECT version, checksum FROM {}._sqlx_migrations WHERE success ORDER BY version",
            quote_ident(schema)
        ))
        .fetch_all(pool)
        .await?
    } else {
        Vec::new()
    };
    let mut st = SchemaStatus {
        applied: rows.iter().map(|r| r.0).collect(),
        pending: Vec::new(),
        unknown: Vec::new(),
        checksum_mismatch: Vec::new(),
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

/// Fails unless the schema is exactly at this binary's version. Used when
/// auto-migration is off.
///
/// # Errors
/// A configuration error naming the schema, the versions found and expected, and what to
/// run; or a database error.
pub async fn verify(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let st = status(pool, schema).await?;
    if st.is_current() {
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
    } else {
        format!(
            "schema {schema:?} is at migration {found}, this binary expects {}; pending {:?}: \
             run migrations (auto_migrate = true, or `duroxide-pg-hybrid migrate up`)",
            expected_version(),
            st.pending
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
         CREATE TABLE IF NOT EXISTS _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, \
         execution_time BIGINT NOT NULL);\n"
    );
    for m in MIGRATOR.iter() {
        let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!(
            "\n-- migration {} {}\nBEGIN;\n{}\nINSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ({}, '{}', TRUE, '\\x{}', -1);\nCOMMIT;\n",
            m.version,
            m.description,
            m.sql.trim_end(),
            m.version,
            m.description.replace('\'', "''"),
            hex
        ));
    }
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
        assert!(migration_sql("bad;name").is_err());
    }
}
