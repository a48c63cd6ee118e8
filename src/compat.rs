//! Source compatibility with duroxide-pg 0.1.38: its constructors, configuration types
//! and return types, so that an application switches by changing only its dependency
//! line:
//!
//! ```toml
//! duroxide-pg = { package = "duroxide-pg-hybrid", version = "0.1" }
//! # using Microsoft Entra ID: features = ["entra"]
//! ```
//!
//! This layer is thin on purpose: every call maps onto this crate's own API
//! ([`PostgresProvider::connect_with`], [`ProviderOptions`]), which stays the primary
//! one. What it keeps from duroxide-pg, because it decides where data lives or how a
//! deployment behaves:
//!
//! * schema: `None` means `public` (duroxide-pg's default; this crate's own default is
//!   `duroxide`); names follow duroxide-pg's rule `[A-Za-z_][A-Za-z0-9_]*` and are folded
//!   to lower case, as PostgreSQL folds duroxide-pg's unquoted names;
//! * [`MigrationPolicy::ApplyAll`] (default) migrates at start-up,
//!   [`MigrationPolicy::VerifyOnly`] runs no DDL and fails unless the schema is current;
//! * pool size `DUROXIDE_PG_POOL_MAX` (default 10), acquire timeout 30 s; Entra: the
//!   values of `EntraAuthOptions` (feature `entra`), TLS `verify-full`;
//! * every fallible call returns `anyhow::Result` (the error inside is this crate's
//!   [`ProviderError`] or [`ConfigError`], reachable with `downcast_ref`);
//! * [`cleanup_schema`](PostgresProvider::cleanup_schema) drops a custom schema, and in
//!   `public` drops only this crate's objects, never the schema.
//!
//! Everything else is this crate's behaviour (long polling, its own table layout). A
//! schema that holds duroxide-pg 0.1.38's tables is adopted live ([`adopt`](crate::adopt));
//! one of another duroxide-pg release is refused with a message
//! ([`incumbent`](crate::incumbent)).
//!
//! Not provided: duroxide-pg's `migrations::MigrationRunner` (use
//! [`schema::migrate`] / [`schema::verify`]).
//!
//! [`ProviderError`]: duroxide::providers::ProviderError

use std::fmt;
use std::time::Duration;

use sqlx::PgPool;

use crate::errors::ConfigError;
use crate::options::{ProviderOptions, redact_url};
use crate::provider::PostgresProvider;
use crate::schema::{self, quote_ident, validate_schema_name};

/// The schema duroxide-pg uses when none is given (and so do this module's constructors).
pub const DUROXIDE_PG_DEFAULT_SCHEMA: &str = "public";

/// Pool size variable duroxide-pg reads for URL connections.
pub const POOL_MAX_ENV: &str = "DUROXIDE_PG_POOL_MAX";

const DEFAULT_POOL_MAX: u32 = 10;
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a provider does with the schema's migrations at start-up (duroxide-pg's type).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MigrationPolicy {
    /// Apply pending migrations (needs DDL rights on the schema). Default.
    #[default]
    ApplyAll,
    /// Run no DDL; fail unless the schema is exactly at this binary's version
    /// (`ProviderOptions::auto_migrate = false`).
    VerifyOnly,
}

/// Configuration for [`PostgresProvider::new_with_config`] (duroxide-pg's type).
///
/// ```no_run
/// use duroxide_pg_hybrid::{MigrationPolicy, PostgresProvider, ProviderConfig};
///
/// # async fn demo() -> anyhow::Result<()> {
/// let mut config = ProviderConfig::url("postgres://app@db/prod");
/// config.schema_name = Some("my_app".into());
/// config.migration_policy = MigrationPolicy::VerifyOnly;
/// let provider = PostgresProvider::new_with_config(config).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProviderConfig {
    /// How to reach the database.
    pub connection: ConnectionConfig,
    /// Schema holding the provider's objects; `None` is `public`.
    pub schema_name: Option<String>,
    /// What to do with migrations at start-up.
    pub migration_policy: MigrationPolicy,
}

impl ProviderConfig {
    /// A `postgres://` URL; schema `public`, [`MigrationPolicy::ApplyAll`].
    pub fn url(database_url: impl Into<String>) -> Self {
        Self {
            connection: ConnectionConfig::Url(database_url.into()),
            schema_name: None,
            migration_policy: MigrationPolicy::default(),
        }
    }

    /// Azure Database for PostgreSQL with Microsoft Entra ID (TLS `verify-full`); schema
    /// `public`, [`MigrationPolicy::ApplyAll`].
    #[cfg(feature = "entra")]
    pub fn entra(
        host: impl Into<String>,
        port: u16,
        database: impl Into<String>,
        user: impl Into<String>,
        options: crate::entra::EntraAuthOptions,
    ) -> Self {
        Self {
            connection: ConnectionConfig::Entra {
                host: host.into(),
                port,
                database: database.into(),
                user: user.into(),
                options,
            },
            schema_name: None,
            migration_policy: MigrationPolicy::default(),
        }
    }
}

/// How a provider reaches the database (duroxide-pg's type).
#[derive(Clone)]
#[non_exhaustive]
pub enum ConnectionConfig {
    /// A `postgres://` / `postgresql://` URL.
    Url(String),
    /// Microsoft Entra ID (feature `entra`).
    #[cfg(feature = "entra")]
    Entra {
        /// Server host name, e.g. `myserver.postgres.database.azure.com`.
        host: String,
        /// Server port, usually 5432.
        port: u16,
        /// Database name.
        database: String,
        /// PostgreSQL role mapped to the Entra principal.
        user: String,
        /// Token and pool options.
        options: crate::entra::EntraAuthOptions,
    },
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // URLs carry passwords: shown redacted.
            ConnectionConfig::Url(url) => f.debug_tuple("Url").field(&redact_url(url)).finish(),
            #[cfg(feature = "entra")]
            ConnectionConfig::Entra {
                host,
                port,
                database,
                user,
                options,
            } => f
                .debug_struct("Entra")
                .field("host", host)
                .field("port", port)
                .field("database", database)
                .field("user", user)
                .field("options", options)
                .finish(),
        }
    }
}

/// duroxide-pg's schema rule, then PostgreSQL's folding of unquoted names, then this
/// crate's rule (at most 63 bytes, no `pg_` prefix).
fn resolve_schema(name: Option<&str>) -> Result<String, ConfigError> {
    let Some(name) = name else {
        return Ok(DUROXIDE_PG_DEFAULT_SCHEMA.to_string());
    };
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c == '_' || c.is_ascii_alphanumeric()) {
        return Err(ConfigError::new(format!(
            "schema name {name:?} must match [A-Za-z_][A-Za-z0-9_]*"
        )));
    }
    let folded = name.to_ascii_lowercase();
    validate_schema_name(&folded)?;
    Ok(folded)
}

fn pool_max_from_env() -> u32 {
    std::env::var(POOL_MAX_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(DEFAULT_POOL_MAX)
        .max(1)
}

/// duroxide-pg's constructors and helpers. They return `anyhow::Result`, as duroxide-pg's
/// do; the primary API is [`connect`](PostgresProvider::connect) /
/// [`connect_with`](PostgresProvider::connect_with).
impl PostgresProvider {
    /// duroxide-pg's `new`: schema `public`, migrations applied.
    ///
    /// # Errors
    /// Bad URL, unreachable server, failed migration, or a schema holding duroxide-pg's
    /// own tables.
    pub async fn new(database_url: &str) -> anyhow::Result<Self> {
        Self::new_with_config(ProviderConfig::url(database_url)).await
    }

    /// duroxide-pg's `new_with_schema`: `None` is `public`.
    ///
    /// # Errors
    /// As [`new`](Self::new), plus an invalid schema name.
    pub async fn new_with_schema(
        database_url: &str,
        schema_name: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut config = ProviderConfig::url(database_url);
        config.schema_name = schema_name.map(str::to_string);
        Self::new_with_config(config).await
    }

    /// duroxide-pg's `new_with_config`: connection, schema and migration policy.
    ///
    /// # Errors
    /// As [`new_with_schema`](Self::new_with_schema); with Entra, also a credential chain
    /// that cannot be built. `VerifyOnly`: a schema not at this binary's version.
    pub async fn new_with_config(config: ProviderConfig) -> anyhow::Result<Self> {
        let ProviderConfig {
            connection,
            schema_name,
            migration_policy,
        } = config;
        #[cfg_attr(not(feature = "entra"), allow(unused_mut))]
        let mut options = ProviderOptions {
            schema: resolve_schema(schema_name.as_deref())?,
            auto_migrate: migration_policy == MigrationPolicy::ApplyAll,
            max_connections: pool_max_from_env(),
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            ..ProviderOptions::default()
        };
        match connection {
            ConnectionConfig::Url(url) => Ok(Self::connect_with(&url, options).await?),
            #[cfg(feature = "entra")]
            ConnectionConfig::Entra {
                host,
                port,
                database,
                user,
                options: entra,
            } => {
                options.max_connections = entra.max_connections_value();
                options.acquire_timeout = entra.acquire_timeout_value();
                options.password_source = Some(entra.password_source()?);
                let connect = crate::entra::connect_options(&host, port, &database, &user);
                Ok(Self::connect_with_options(connect, options).await?)
            }
        }
    }

    /// duroxide-pg's `new_with_entra` (deprecated there too).
    ///
    /// # Errors
    /// As [`new_with_config`](Self::new_with_config).
    #[cfg(feature = "entra")]
    #[deprecated(note = "use `PostgresProvider::new_with_config(ProviderConfig::entra(...))`")]
    pub async fn new_with_entra(
        host: &str,
        port: u16,
        database: &str,
        user: &str,
        options: crate::entra::EntraAuthOptions,
    ) -> anyhow::Result<Self> {
        Self::new_with_config(ProviderConfig::entra(host, port, database, user, options)).await
    }

    /// duroxide-pg's `new_with_schema_and_entra` (deprecated there too).
    ///
    /// # Errors
    /// As [`new_with_config`](Self::new_with_config).
    #[cfg(feature = "entra")]
    #[deprecated(
        note = "use `PostgresProvider::new_with_config(ProviderConfig::entra(...))` with `schema_name` set"
    )]
    pub async fn new_with_schema_and_entra(
        host: &str,
        port: u16,
        database: &str,
        user: &str,
        schema_name: Option<&str>,
        options: crate::entra::EntraAuthOptions,
    ) -> anyhow::Result<Self> {
        let mut config = ProviderConfig::entra(host, port, database, user, options);
        config.schema_name = schema_name.map(str::to_string);
        Self::new_with_config(config).await
    }

    /// duroxide-pg's `initialize_schema`: applies pending migrations (every constructor
    /// with [`MigrationPolicy::ApplyAll`] already did).
    ///
    /// # Errors
    /// Migration failures, missing privileges.
    #[deprecated(note = "constructors apply migrations (MigrationPolicy::ApplyAll)")]
    pub async fn initialize_schema(&self) -> anyhow::Result<()> {
        self.refresh_pool_credentials().await?;
        if self.inner.pool_has_sessions {
            schema::migrate(self.pool(), self.schema()).await
        } else {
            schema::migrate_through_pooler(self.pool(), self.schema()).await
        }
        .map_err(|e| crate::errors::db_error("migrate", None, e))?;
        Ok(())
    }

    /// duroxide-pg's name for [`schema`](Self::schema).
    pub fn schema_name(&self) -> &str {
        self.schema()
    }

    /// duroxide-pg's `cleanup_schema` (for tests and tear-down): drops the schema with
    /// everything in it, except `public`, which is kept and loses only this crate's
    /// tables, functions and migration ledger.
    ///
    /// # Errors
    /// Database errors (e.g. missing privileges).
    pub async fn cleanup_schema(&self) -> anyhow::Result<()> {
        if self.schema() != DUROXIDE_PG_DEFAULT_SCHEMA {
            self.drop_schema().await?;
            return Ok(());
        }
        self.refresh_pool_credentials().await?;
        drop_own_objects(self.pool(), self.schema())
            .await
            .map_err(|e| crate::errors::db_error("cleanup_schema", None, e))?;
        Ok(())
    }
}

/// Objects this crate's SQL creates, by kind: names following `CREATE [OR REPLACE]
/// TABLE|FUNCTION|PROCEDURE|TYPE|SEQUENCE|VIEW [IF NOT EXISTS]` in the embedded
/// migrations and function files (all the SQL that creates schema objects).
fn own_objects() -> Vec<(String, String)> {
    let sources: Vec<&str> = schema::MIGRATOR
        .iter()
        .map(|m| m.sql.as_ref())
        .chain(schema::FUNCTION_FILES.iter().map(|f| f.sql))
        .collect();
    let mut found = Vec::new();
    for sql in sources {
        // Comments are prose ("... the table is created ..."): never object names.
        let code: String = sql
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let words: Vec<String> = code
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        for (i, w) in words.iter().enumerate() {
            if w != "create" {
                continue;
            }
            let mut j = i + 1;
            if words.get(j).map(String::as_str) == Some("or")
                && words.get(j + 1).map(String::as_str) == Some("replace")
            {
                j += 2;
            }
            let Some(kind) = words.get(j).filter(|k| {
                matches!(
                    k.as_str(),
                    "table" | "function" | "procedure" | "type" | "sequence" | "view"
                )
            }) else {
                continue;
            };
            j += 1;
            if words.get(j).map(String::as_str) == Some("if") {
                j += 3; // if not exists
            }
            if let Some(name) = words.get(j) {
                let name = name.rsplit('.').next().unwrap_or(name).to_string();
                if !found.contains(&(kind.clone(), name.clone())) {
                    found.push((kind.clone(), name));
                }
            }
        }
    }
    found
}

/// Drops this crate's objects from `schema` and keeps the schema (and anything else in
/// it). One transaction: all or nothing.
async fn drop_own_objects(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let q = quote_ident(schema);
    let objects = own_objects();
    let names = |kinds: &[&str]| -> Vec<String> {
        objects
            .iter()
            .filter(|(k, _)| kinds.contains(&k.as_str()))
            .map(|(_, n)| n.clone())
            .collect()
    };
    let mut tx = pool.begin().await?;
    for (kind, list) in [
        ("VIEW", names(&["view"])),
        ("TABLE", names(&["table"])),
        ("SEQUENCE", names(&["sequence"])),
    ] {
        for name in list {
            sqlx::query(&format!(
                "DROP {kind} IF EXISTS {q}.{} CASCADE",
                quote_ident(&name)
            ))
            .execute(&mut *tx)
            .await?;
        }
    }
    // Every overload of every routine name we create.
    let routines: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = ANY($2)",
    )
    .bind(schema)
    .bind(names(&["function", "procedure"]))
    .fetch_all(&mut *tx)
    .await?;
    for signature in routines {
        // regprocedure text is already schema-qualified and quoted where needed.
        sqlx::query(&format!("DROP ROUTINE IF EXISTS {signature} CASCADE"))
            .execute(&mut *tx)
            .await?;
    }
    for name in names(&["type"]) {
        sqlx::query(&format!(
            "DROP TYPE IF EXISTS {q}.{} CASCADE",
            quote_ident(&name)
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(&format!(
        "DROP TABLE IF EXISTS {q}.{}",
        quote_ident(schema::LEDGER_TABLE)
    ))
    .execute(&mut *tx)
    .await?;
    // A pre-0.2.0 release's ledger is sqlx's default table: dropped only when every row
    // in it is one of our migrations (an application's own sqlx ledger stays).
    let legacy = format!("{q}.{}", quote_ident(schema::LEGACY_LEDGER_TABLE));
    let legacy_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&legacy)
        .fetch_one(&mut *tx)
        .await?;
    if legacy_exists {
        let ours: Vec<i64> = schema::MIGRATOR.iter().map(|m| m.version).collect();
        let foreign: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {legacy} WHERE NOT (version = ANY($1))"
        ))
        .bind(&ours)
        .fetch_one(&mut *tx)
        .await?;
        if foreign == 0 {
            sqlx::query(&format!("DROP TABLE {legacy}"))
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_resolution_matches_duroxide_pg() {
        assert_eq!(resolve_schema(None).unwrap(), "public");
        assert_eq!(resolve_schema(Some("my_app")).unwrap(), "my_app");
        // duroxide-pg writes names unquoted: PostgreSQL folds them.
        assert_eq!(resolve_schema(Some("MyApp_2")).unwrap(), "myapp_2");
        for bad in ["", "1abc", "a-b", "a;drop", "x\"y", "pg_catalog"] {
            assert!(resolve_schema(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_duroxide_pg() {
        let c = ProviderConfig::url("postgres://u:secret@h/db");
        assert_eq!(c.schema_name, None);
        assert_eq!(c.migration_policy, MigrationPolicy::ApplyAll);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("secret") && shown.contains("u:***@h"),
            "{shown}"
        );
    }

    #[test]
    fn own_objects_cover_the_core_tables_and_claim() {
        let objects = own_objects();
        for expected in [
            ("table", "instances"),
            ("table", "orchestrator_queue"),
            ("function", "sp_fetch_and_lock"),
        ] {
            assert!(
                objects
                    .iter()
                    .any(|(k, n)| k == expected.0 && n == expected.1),
                "{expected:?} not in {objects:?}"
            );
        }
        // Words in comments such as "create the table" must not yield names like "the".
        assert!(
            !objects.iter().any(|(_, n)| n == "the" || n == "if"),
            "{objects:?}"
        );
    }
}
