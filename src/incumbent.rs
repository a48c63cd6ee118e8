//! Recognising a duroxide-pg schema (the incumbent provider, crates.io `duroxide-pg`).
//!
//! duroxide-pg keeps its migration ledger in a table `_duroxide_migrations` (`version
//! BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ`) inside the schema it
//! manages (`public` by default). Its tables have the same names as ours (`instances`,
//! `history`, ...) but other columns, so migrating such a schema would fail half-way
//! inside a `CREATE TABLE`. Start-up (migrate or verify), `migrate status` and `verify`
//! look for that ledger first and refuse with a message that names what was found.
//!
//! A schema at duroxide-pg 0.1.38's last migration is adopted live (`adopt.rs`,
//! [`IncumbentSchema::is_adoptable`]); any other duroxide-pg schema is refused with what was
//! found and what to do.

use sqlx::PgPool;

use crate::schema::quote_ident;

/// Name of duroxide-pg's migration ledger table.
pub const LEDGER_TABLE: &str = "_duroxide_migrations";

/// duroxide-pg's last migration in release 0.1.38 (`0026_serialize_orchestration_lock_mutations.sql`),
/// the layout an adoption would start from.
pub const ADOPTABLE_MIGRATION: i64 = 26;

/// The duroxide-pg release whose last migration is [`ADOPTABLE_MIGRATION`].
pub const ADOPTABLE_RELEASE: &str = "0.1.38";

/// One row of duroxide-pg's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    /// Migration number (`26` for `0026_...sql`).
    pub version: i64,
    /// Migration file name as duroxide-pg recorded it.
    pub name: String,
}

/// What was found in a schema that holds duroxide-pg's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncumbentSchema {
    /// The schema inspected.
    pub schema: String,
    /// Ledger rows in ascending version order (empty when the ledger could not be read).
    pub applied: Vec<LedgerRow>,
    /// Why the ledger could not be read, when it could not (not a table, other columns).
    pub unreadable: Option<String>,
}

impl IncumbentSchema {
    /// The newest migration recorded.
    pub fn latest(&self) -> Option<&LedgerRow> {
        self.applied.iter().max_by_key(|r| r.version)
    }

    /// The duroxide-pg release(s) whose last migration is the newest one recorded, as far
    /// as duroxide-pg's changelog tells.
    pub fn release(&self) -> String {
        match self.latest().map(|r| r.version) {
            Some(26) => "0.1.38".to_string(),
            Some(25) => "0.1.36 or 0.1.37".to_string(),
            Some(23) => "0.1.35".to_string(),
            Some(v) if v > 26 => "a release newer than 0.1.38".to_string(),
            Some(_) => "a release older than 0.1.35".to_string(),
            None => "unknown".to_string(),
        }
    }

    /// Whether the ledger is exactly at duroxide-pg 0.1.38's last migration (the only
    /// layout adoption accepts).
    pub fn is_adoptable(&self) -> bool {
        self.unreadable.is_none() && self.latest().map(|r| r.version) == Some(ADOPTABLE_MIGRATION)
    }

    /// What was found, in one sentence (no advice).
    pub fn describe(&self) -> String {
        let schema = &self.schema;
        if let Some(why) = &self.unreadable {
            return format!(
                "schema {schema:?} holds a duroxide-pg migration ledger ({LEDGER_TABLE}) that cannot be read ({why})"
            );
        }
        match self.latest() {
            Some(last) => format!(
                "schema {schema:?} holds a duroxide-pg schema: its ledger {LEDGER_TABLE} is at migration {} ({}), i.e. duroxide-pg {}",
                last.version,
                last.name,
                self.release()
            ),
            None => format!(
                "schema {schema:?} holds an empty duroxide-pg migration ledger ({LEDGER_TABLE})"
            ),
        }
    }

    /// Why this crate refuses the schema and what to do instead.
    pub fn refusal(&self) -> String {
        let what = match self.latest().map(|r| r.version) {
            _ if self.is_adoptable() => format!(
                "duroxide-pg-hybrid's provider and CLI adopt it: this crate's tables live in \
                 the companion schema {:?} (pass that schema to schema-level functions such \
                 as schema::status)",
                format!("{}{}", self.schema, crate::adopt::SCHEMA_SUFFIX)
            ),
            Some(v) if v > ADOPTABLE_MIGRATION => format!(
                "this release of duroxide-pg-hybrid adopts only duroxide-pg {ADOPTABLE_RELEASE} \
                 schemas, and this one is newer; use a duroxide-pg-hybrid release that knows it"
            ),
            _ => format!(
                "duroxide-pg-hybrid adopts a running duroxide-pg deployment only from \
                 duroxide-pg {ADOPTABLE_RELEASE} (ledger at migration {ADOPTABLE_MIGRATION}): \
                 upgrade the duroxide-pg processes to {ADOPTABLE_RELEASE} first (they migrate \
                 the schema), then start duroxide-pg-hybrid on it"
            ),
        };
        format!(
            "{}. {what}; or point duroxide-pg-hybrid at a different schema \
             (ProviderOptions::schema, new_with_schema, ProviderConfig::schema_name or \
             --schema). See README \"Adopting a running duroxide-pg deployment\".",
            self.describe()
        )
    }
}

/// Looks for duroxide-pg's ledger in `schema`.
///
/// # Errors
/// Database errors of the catalog query. A ledger that exists but does not read as
/// duroxide-pg's is reported through [`IncumbentSchema::unreadable`], not as an error.
pub async fn detect(pool: &PgPool, schema: &str) -> Result<Option<IncumbentSchema>, sqlx::Error> {
    detect_on(&mut *pool.acquire().await?, schema).await
}

/// [`detect`] on one connection (inside the caller's transaction behind a transaction
/// pooler). Statements are unnamed: nothing is left prepared on the server.
pub(crate) async fn detect_on(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Option<IncumbentSchema>, sqlx::Error> {
    let kind: Option<String> = sqlx::query_scalar(
        "SELECT c.relkind::text FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(schema)
    .bind(LEDGER_TABLE)
    .persistent(false)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(kind) = kind else {
        return Ok(None);
    };
    let mut found = IncumbentSchema {
        schema: schema.to_string(),
        applied: Vec::new(),
        unreadable: None,
    };
    if !matches!(kind.as_str(), "r" | "p") {
        found.unreadable = Some(format!("relation kind {kind:?}, not a table"));
        return Ok(Some(found));
    }
    let rows: Result<Vec<(i64, String)>, sqlx::Error> = sqlx::query_as(&format!(
        "SELECT version::bigint, name::text FROM {}.{} ORDER BY version",
        quote_ident(schema),
        quote_ident(LEDGER_TABLE)
    ))
    .persistent(false)
    .fetch_all(&mut *conn)
    .await;
    match rows {
        Ok(rows) => {
            found.applied = rows
                .into_iter()
                .map(|(version, name)| LedgerRow { version, name })
                .collect();
        }
        Err(sqlx::Error::Database(db)) => {
            found.unreadable = Some(format!(
                "{} (SQLSTATE {})",
                db.message(),
                db.code().unwrap_or_default()
            ));
        }
        Err(e) => return Err(e),
    }
    Ok(Some(found))
}

/// Fails with [`IncumbentSchema::refusal`] as a configuration error when `schema` holds
/// duroxide-pg's ledger.
///
/// # Errors
/// The refusal, or a database error of the detection query.
pub async fn refuse_if_present(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    refuse_if_present_on(&mut *pool.acquire().await?, schema).await
}

/// [`refuse_if_present`] on one connection.
pub(crate) async fn refuse_if_present_on(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<(), sqlx::Error> {
    match detect_on(conn, schema).await? {
        Some(found) => Err(sqlx::Error::Configuration(found.refusal().into())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(versions: &[i64]) -> IncumbentSchema {
        IncumbentSchema {
            schema: "public".into(),
            applied: versions
                .iter()
                .map(|v| LedgerRow {
                    version: *v,
                    name: format!("{v:04}_x.sql"),
                })
                .collect(),
            unreadable: None,
        }
    }

    #[test]
    fn names_release_and_advice() {
        assert!(at(&[1, 2, 25, 26]).is_adoptable());
        let s = at(&[1, 2, 25]);
        let msg = s.refusal();
        for needle in [
            "\"public\"",
            "migration 25 (0025_x.sql)",
            "duroxide-pg 0.1.36 or 0.1.37",
            "upgrade the duroxide-pg processes to 0.1.38",
            "different schema",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
        assert_eq!(at(&[1, 25]).release(), "0.1.36 or 0.1.37");
        assert!(!at(&[1, 25]).is_adoptable());
        assert_eq!(at(&[27]).release(), "a release newer than 0.1.38");
        assert_eq!(at(&[1, 21]).release(), "a release older than 0.1.35");
        assert!(at(&[1, 27]).refusal().contains("newer"));
        assert!(
            at(&[])
                .refusal()
                .contains("empty duroxide-pg migration ledger")
        );
    }
}
