//! The provider handle: connection pool, schema, fetch path, and construction.
//! (duroxide-pg's constructor names live in `compat.rs`.)

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use duroxide::providers::ProviderError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::credentials::Credentials;
use crate::errors::db_error;
use crate::notify::Notifier;
use crate::options::{FetchPath, ProviderOptions};
use crate::pool::{ConnPool, PoolLimits};
use crate::schema::{self, quote_ident};

// duroxide-pg's paths `duroxide_pg::provider::{ProviderConfig, ...}` keep working.
pub use crate::compat::{ConnectionConfig, MigrationPolicy, ProviderConfig};

/// Target of every `tracing` event the provider emits.
pub const TRACING_TARGET: &str = "duroxide::providers::postgres";

/// PostgreSQL storage provider for duroxide.
///
/// Cheap to clone (an `Arc` inside); every clone shares one pool.
#[derive(Clone)]
pub struct PostgresProvider {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The application-facing pool: migrations and [`PostgresProvider::pool`].
    pub(crate) pool: PgPool,
    /// Connections of every provider call (no ping on release, see `pool.rs`).
    pub(crate) conns: ConnPool,
    pub(crate) schema: String,
    /// `"schema"`, quoted once, substituted for `{s}` in every query template.
    pub(crate) schema_q: String,
    pub(crate) fetch_path: FetchPath,
    pub(crate) long_poll: bool,
    pub(crate) fallback_poll_interval: Duration,
    pub(crate) notifier: Arc<Notifier>,
    /// Connect options plus the password source (if any) of every connection we open.
    pub(crate) credentials: Arc<Credentials>,
    /// Decoded histories of instances this provider ran recently (`history_cache.rs`).
    pub(crate) history_cache: crate::history_cache::HistoryCache,
}

impl fmt::Debug for PostgresProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately shows no connection details: URLs carry passwords.
        f.debug_struct("PostgresProvider")
            .field("schema", &self.inner.schema)
            .field("fetch_path", &self.inner.fetch_path)
            .field("pool_size", &self.inner.pool.size())
            .finish()
    }
}

impl PostgresProvider {
    /// Connects with default options (schema `duroxide`, migrations applied).
    ///
    /// # Errors
    /// Unreachable server, bad URL, failed migration or schema verification.
    pub async fn connect(url: &str) -> Result<Self, ProviderError> {
        Self::connect_with(url, ProviderOptions::default()).await
    }

    /// Connects with explicit options.
    ///
    /// # Errors
    /// Invalid options (before any connection is made), unreachable server, failed
    /// migration or schema verification.
    pub async fn connect_with(url: &str, options: ProviderOptions) -> Result<Self, ProviderError> {
        options.validate()?;
        let connect = url.parse::<PgConnectOptions>().map_err(|e| {
            ProviderError::permanent(
                "connect",
                format!(
                    "invalid database URL {}: {e}",
                    crate::options::redact_url(url)
                ),
            )
        })?;
        Self::connect_with_options(connect, options).await
    }

    /// Connects with connect options built by the caller (host, user, TLS; e.g. for
    /// Microsoft Entra ID, where there is no URL and the password comes from
    /// [`ProviderOptions::password_source`]).
    pub(crate) async fn connect_with_options(
        connect: PgConnectOptions,
        options: ProviderOptions,
    ) -> Result<Self, ProviderError> {
        options.validate()?;
        let connect = connect
            .application_name(&options.application_name)
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1));
        let connect = with_session_settings(connect, &options);
        // This pool serves migrations and the application (`pool()`); provider calls
        // use their own pool built from the same options, so it can stay small.
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        Self::from_pool(pool, options).await
    }

    /// Wraps an existing pool. Migrations run on it and [`pool`](Self::pool) returns it;
    /// provider calls use a pool of their own (`max_connections`, `acquire_timeout` from
    /// the options) built from the same connect options (host, TLS, credentials). With
    /// [`ProviderOptions::password_source`], the source's password replaces the pool's,
    /// in `pool`'s connect options too (now and while the provider lives).
    ///
    /// # Errors
    /// Invalid options, failed migration or schema verification.
    pub async fn from_pool(pool: PgPool, options: ProviderOptions) -> Result<Self, ProviderError> {
        options.validate()?;
        let fetch_path = options.resolved_fetch_path()?;
        let schema = options.schema.clone();
        let credentials = Arc::new(Credentials::new(
            (*pool.connect_options()).clone(),
            options.password_source.clone(),
        ));
        credentials
            .refresh(&pool)
            .await
            .map_err(|e| db_error("connect", None, e))?;
        if options.auto_migrate {
            schema::migrate(&pool, &schema)
                .await
                .map_err(|e| db_error("migrate", None, e))
                .map_err(|e| with_schema_context(e, &schema))?;
        } else {
            schema::verify(&pool, &schema)
                .await
                .map_err(|e| db_error("verify_schema", None, e))
                .map_err(|e| with_schema_context(e, &schema))?;
        }
        let conns = ConnPool::new(
            credentials.clone(),
            options.max_connections,
            PoolLimits {
                acquire_timeout: options.acquire_timeout,
                idle_timeout: options.idle_timeout,
                max_lifetime: options.max_lifetime,
            },
        );
        if options.min_connections > 0 {
            conns
                .warm_up(options.min_connections)
                .await
                .map_err(|e| db_error("connect", None, e))?;
        }
        tracing::info!(
            target: TRACING_TARGET,
            schema = %schema,
            fetch_path = %fetch_path,
            long_poll = options.long_poll,
            "duroxide-pg-hybrid provider ready"
        );
        let inner = Arc::new(Inner {
            conns,
            schema_q: quote_ident(&schema),
            schema,
            pool: pool.clone(),
            fetch_path,
            long_poll: options.long_poll,
            fallback_poll_interval: options.fallback_poll_interval,
            notifier: Arc::new(Notifier::with_credentials(Some(credentials.clone()))),
            credentials: credentials.clone(),
            history_cache: crate::history_cache::HistoryCache::new(options.history_cache_events),
        });
        // The application-facing pool cannot ask the source per connection: keep its
        // options fresh while the provider lives.
        credentials.keep_refreshed(pool, Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// Connects using [`ProviderOptions::from_env`] (`DATABASE_URL`, `DUROXIDE_PG_*`).
    ///
    /// # Errors
    /// Missing or malformed variables, then as [`connect_with`](Self::connect_with).
    pub async fn from_env() -> Result<Self, ProviderError> {
        let (url, options) = ProviderOptions::from_env()?;
        Self::connect_with(&url, options).await
    }

    /// The pool (for the application's own queries, e.g. in tests or tooling).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding this provider's objects.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The fetch path this provider uses.
    pub fn fetch_path(&self) -> FetchPath {
        self.inner.fetch_path
    }

    /// Whether fetches honour `poll_timeout` with LISTEN/NOTIFY.
    pub fn long_poll(&self) -> bool {
        self.inner.long_poll
    }

    /// Drops the provider's schema with everything in it. Irreversible; meant for tests
    /// and tear-down scripts.
    ///
    /// # Errors
    /// Database errors (e.g. missing privileges).
    pub async fn drop_schema(&self) -> Result<(), ProviderError> {
        self.refresh_pool_credentials().await?;
        sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.inner.schema_q
        ))
        .execute(&self.inner.pool)
        .await
        .map(|_| ())
        .map_err(|e| db_error("drop_schema", None, e))
    }

    /// Closes the provider's connections and the pool.
    ///
    /// Like `sqlx::PgPool::close`, everything is marked closed when this is CALLED
    /// (later calls fail with a permanent "pool closed" error, the LISTEN task stops);
    /// awaiting the future waits for the connections to finish closing. So a `Drop`
    /// impl can call it without awaiting.
    pub fn close(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let idle = self.inner.conns.shut();
        self.inner.notifier.shut_down();
        let pool = self.inner.pool.clone();
        // sqlx marks the pool closed when `close` is called, before the future runs.
        drop(pool.close());
        async move {
            for c in idle {
                let _ = sqlx::Connection::close(c).await;
            }
            pool.close().await;
        }
    }

    /// Puts the password source's current answer into [`pool`](Self::pool)'s connect
    /// options (no-op without a password source; also done periodically).
    pub(crate) async fn refresh_pool_credentials(&self) -> Result<(), ProviderError> {
        self.inner
            .credentials
            .refresh(&self.inner.pool)
            .await
            .map_err(|e| db_error("connect", None, e))
    }

    /// A query template with `{s}` replaced by the quoted schema.
    pub(crate) fn sql(&self, template: &str) -> String {
        template.replace("{s}", &self.inner.schema_q)
    }

    /// The SQL text of a call of one of the schema's functions (named notation).
    pub(crate) fn call_sql(&self, function: &crate::sql_fn::SqlFunction) -> String {
        function.call_sql(&self.inner.schema_q)
    }

    pub(crate) fn pool_ref(&self) -> &PgPool {
        &self.inner.pool
    }

    pub(crate) fn conns(&self) -> &ConnPool {
        &self.inner.conns
    }
}

fn with_session_settings(connect: PgConnectOptions, options: &ProviderOptions) -> PgConnectOptions {
    let mut connect = connect;
    if let Some(t) = options.statement_timeout {
        connect = connect.options([("statement_timeout", format!("{}ms", t.as_millis()))]);
    }
    if let Some(t) = options.lock_timeout {
        connect = connect.options([("lock_timeout", format!("{}ms", t.as_millis()))]);
    }
    connect
}

fn with_schema_context(mut e: ProviderError, schema: &str) -> ProviderError {
    if !e.message.contains(schema) {
        e.message = format!("schema {schema:?}: {}", e.message);
    }
    e
}
