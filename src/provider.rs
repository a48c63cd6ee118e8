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
use crate::options::{FetchPath, PoolerMode, ProviderOptions};
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
    /// Connect options of the LISTEN connection (`None`: none possible, behind a
    /// transaction pooler without a direct URL; `long_poll` is then off).
    pub(crate) listen_connect: Option<PgConnectOptions>,
    pub(crate) pooler: PoolerMode,
    /// `pool` keeps server sessions (not a transaction pooler): session advisory lock.
    pub(crate) pool_has_sessions: bool,
    /// Connect options plus the password source (if any) of every connection we open.
    pub(crate) credentials: Arc<Credentials>,
    /// Decoded histories of instances this provider ran recently (`history_cache.rs`).
    pub(crate) history_cache: crate::history_cache::HistoryCache,
    /// Acks hand work to waiting fetches of this provider (`handover.rs`).
    pub(crate) handover: bool,
    /// Histories committed by acks that handed activities over (`handover_reads.rs`).
    pub(crate) handover_reads: crate::handover_reads::HandoverReads,
    /// Descriptor reads to come of activities this provider's worker fetches handed out
    /// (`permits.rs`: they check connections out in the dispatch lane).
    pub(crate) descriptor_reads: crate::permits::DescriptorReads,
    /// Fan-in grace of worker acks, in milliseconds (`ProviderOptions::fan_in_grace`).
    pub(crate) fan_in_grace_ms: i64,
    /// The duroxide-pg schema being adopted, quoted (client reads that find nothing here
    /// also ask it: `adopt.rs`).
    pub(crate) adopting_q: Option<String>,
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
        Self::connect_with_options(parse_url(url)?, options).await
    }

    /// Connects with connect options built by the caller (host, user, TLS; e.g. for
    /// Microsoft Entra ID, where there is no URL and the password comes from
    /// [`ProviderOptions::password_source`]).
    pub(crate) async fn connect_with_options(
        connect: PgConnectOptions,
        options: ProviderOptions,
    ) -> Result<Self, ProviderError> {
        options.validate()?;
        let behind_pooler = options.pooler == PoolerMode::Transaction;
        let calls = with_logging(connect, &options);
        let calls = if behind_pooler {
            for_transaction_pooler(calls)
        } else {
            with_session_settings(calls, &options)
        };
        // This pool serves migrations and the application (`pool()`); provider calls
        // use their own pool, so it can stay small. It reaches PostgreSQL directly when
        // a direct URL is given (session advisory lock, LISTEN), else like the calls.
        let (pool_connect, pool_has_sessions) = match &options.direct_url {
            Some(url) => (
                with_session_settings(with_logging(parse_url(url)?, &options), &options),
                true,
            ),
            None => (calls.clone(), !behind_pooler),
        };
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            // Start-up (catalog checks, migrations) opens the first connection here: a
            // call-sized acquire_timeout would fail start-up on a slow connect.
            .acquire_timeout(options.acquire_timeout.max(Duration::from_secs(5)))
            .test_before_acquire(false)
            .connect_lazy_with(pool_connect);
        Self::build(
            pool,
            Routes {
                calls: Some(calls),
                pool_has_sessions,
                listen: None,
            },
            options,
        )
        .await
    }

    /// Wraps an existing pool. Migrations run on it and [`pool`](Self::pool) returns it;
    /// provider calls use a pool of their own (`max_connections`, `acquire_timeout` from
    /// the options) built from the same connect options (host, TLS, credentials). With
    /// [`ProviderOptions::password_source`], the source's password replaces the pool's,
    /// in `pool`'s connect options too (now and while the provider lives).
    ///
    /// With [`PoolerMode::Transaction`], `pool` is taken to go through the pooler:
    /// migrations run in one transaction, and LISTEN uses
    /// [`ProviderOptions::direct_url`] if given (else fetches short-poll). Startup
    /// `options` already in `pool`'s connect options are kept (the pooler may refuse
    /// them).
    ///
    /// # Errors
    /// Invalid options, failed migration or schema verification.
    pub async fn from_pool(pool: PgPool, options: ProviderOptions) -> Result<Self, ProviderError> {
        options.validate()?;
        let routes = if options.pooler == PoolerMode::Transaction {
            let listen = match &options.direct_url {
                Some(url) => Some(with_session_settings(
                    with_logging(parse_url(url)?, &options),
                    &options,
                )),
                None => None,
            };
            Routes {
                calls: Some(for_transaction_pooler((*pool.connect_options()).clone())),
                pool_has_sessions: false,
                listen,
            }
        } else {
            Routes {
                calls: None,
                pool_has_sessions: true,
                listen: None,
            }
        };
        Self::build(pool, routes, options).await
    }

    async fn build(
        pool: PgPool,
        routes: Routes,
        options: ProviderOptions,
    ) -> Result<Self, ProviderError> {
        let fetch_path = options.resolved_fetch_path()?;
        let schema = options.schema.clone();
        let behind_pooler = options.pooler == PoolerMode::Transaction;
        let credentials = Arc::new(Credentials::new(
            (*pool.connect_options()).clone(),
            options.password_source.clone(),
        ));
        credentials
            .refresh(&pool)
            .await
            .map_err(|e| db_error("connect", None, e))?;
        // A duroxide-pg 0.1.38 schema is adopted: our tables live in a companion schema
        // (`adopt.rs`).
        let resolved = crate::adopt::resolve_in_transaction(&pool, &schema)
            .await
            .map_err(|e| db_error("resolve_schema", None, e))
            .map_err(|e| with_schema_context(e, &schema))?;
        let configured_schema = schema;
        let schema = resolved.data_schema.clone();
        let (migrate_op, result) = match (options.auto_migrate, routes.pool_has_sessions) {
            (true, true) => ("migrate", schema::migrate(&pool, &schema).await),
            (true, false) => (
                "migrate",
                schema::migrate_through_pooler(&pool, &schema).await,
            ),
            (false, true) => ("verify_schema", schema::verify(&pool, &schema).await),
            (false, false) => (
                "verify_schema",
                schema::verify_through_pooler(&pool, &schema).await,
            ),
        };
        result
            .map_err(|e| db_error(migrate_op, None, e))
            .map_err(|e| with_schema_context(e, &schema))?;
        if let Some(old) = &resolved.adopting {
            let adoption = if options.auto_migrate {
                crate::adopt::install(&pool, old, &schema).await
            } else {
                crate::adopt::verify_installed(&pool, old, &schema).await
            };
            adoption
                .map_err(|e| db_error("adopt_install", None, e))
                .map_err(|e| with_schema_context(e, &configured_schema))?;
        }
        let call_credentials = match routes.calls {
            Some(c) => Arc::new(Credentials::new(c, options.password_source.clone())),
            None => credentials.clone(),
        };
        let conns = ConnPool::new(
            call_credentials,
            options.max_connections,
            PoolLimits {
                acquire_timeout: options.acquire_timeout,
                idle_timeout: options.idle_timeout,
                max_lifetime: options.max_lifetime,
                call_begin: behind_pooler.then(|| call_begin_sql(&options)),
                dispatch_lane: options.dispatch_lane,
                adaptive_limit: options.adaptive_limit,
            },
        );
        if options.min_connections > 0 {
            conns
                .warm_up(options.min_connections)
                .await
                .map_err(|e| db_error("connect", None, e))?;
        }
        // LISTEN needs a session: the direct pool's, or the given direct options.
        let listen = match routes.listen {
            Some(l) => Some(l),
            None => routes
                .pool_has_sessions
                .then(|| (*pool.connect_options()).clone()),
        };
        let long_poll = options.long_poll && listen.is_some();
        if options.long_poll && !long_poll {
            tracing::warn!(
                target: TRACING_TARGET,
                schema = %schema,
                "behind a transaction-mode pooler without a direct URL: LISTEN is not \
                 possible, so fetches short-poll (return at once when nothing is ready). \
                 Set ProviderOptions::direct_url (DUROXIDE_PG_DIRECT_URL) to a URL that \
                 reaches PostgreSQL without the pooler to get long polling back"
            );
        }
        let listen_credentials = match &listen {
            Some(l) if !routes.pool_has_sessions => {
                Arc::new(Credentials::new(l.clone(), options.password_source.clone()))
            }
            _ => credentials.clone(),
        };
        tracing::info!(
            target: TRACING_TARGET,
            schema = %schema,
            fetch_path = %fetch_path,
            long_poll,
            pooler = %options.pooler,
            direct_url = options.direct_url.is_some(),
            "duroxide-pg-hybrid provider ready"
        );
        let inner = Arc::new(Inner {
            conns,
            schema_q: quote_ident(&schema),
            schema,
            pool: pool.clone(),
            fetch_path,
            long_poll,
            fallback_poll_interval: options.fallback_poll_interval,
            notifier: Arc::new(Notifier::with_credentials(Some(listen_credentials))),
            listen_connect: listen,
            pooler: options.pooler,
            pool_has_sessions: routes.pool_has_sessions,
            credentials: credentials.clone(),
            history_cache: crate::history_cache::HistoryCache::new(options.history_cache_events),
            handover: options.handover,
            handover_reads: crate::handover_reads::HandoverReads::new(
                options.handover_history_window,
            ),
            descriptor_reads: crate::permits::DescriptorReads::new(),
            fan_in_grace_ms: i64::try_from(options.fan_in_grace.as_millis()).unwrap_or(i64::MAX),
            adopting_q: resolved.adopting.as_deref().map(quote_ident),
        });
        if let Some(old) = resolved.adopting {
            if options.adoption_mover {
                crate::adopt::spawn_mover(
                    pool.clone(),
                    old,
                    inner.schema.clone(),
                    options.adoption_interval,
                    Arc::downgrade(&inner),
                );
            }
        }
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

    /// Whether fetches honour `poll_timeout` with LISTEN/NOTIFY (`false` when the
    /// option is off, or behind a transaction pooler without a direct URL).
    pub fn long_poll(&self) -> bool {
        self.inner.long_poll
    }

    /// What sits between the provider's calls and PostgreSQL (see [`PoolerMode`]).
    pub fn pooler(&self) -> PoolerMode {
        self.inner.pooler
    }

    /// Drops the provider's schema with everything in it. Irreversible; meant for tests
    /// and tear-down scripts.
    ///
    /// # Errors
    /// Database errors (e.g. missing privileges).
    pub async fn drop_schema(&self) -> Result<(), ProviderError> {
        self.refresh_pool_credentials().await?;
        // Simple protocol: one message, fine through a transaction pooler too.
        sqlx::raw_sql(&format!(
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

    pub(crate) fn conns(&self) -> &ConnPool {
        &self.inner.conns
    }
}

/// Which connections go where (see `build`).
struct Routes {
    /// Connect options of provider calls (`None`: the pool's).
    calls: Option<PgConnectOptions>,
    /// The pool keeps server sessions (direct connection or session pooler): migrations
    /// may take a session lock, LISTEN may use its options.
    pool_has_sessions: bool,
    /// LISTEN connect options when the pool has no sessions (a direct URL).
    listen: Option<PgConnectOptions>,
}

fn parse_url(url: &str) -> Result<PgConnectOptions, ProviderError> {
    url.parse::<PgConnectOptions>().map_err(|e| {
        ProviderError::permanent(
            "connect",
            format!(
                "invalid database URL {}: {e}",
                crate::options::redact_url(url)
            ),
        )
    })
}

fn with_logging(connect: PgConnectOptions, options: &ProviderOptions) -> PgConnectOptions {
    connect
        .application_name(&options.application_name)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1))
}

/// Connect options for a transaction-mode pooler: no named statements kept per
/// connection (PgBouncer's default `max_prepared_statements = 0` forwards them to
/// whichever server connection is free), and no startup parameters it refuses (the
/// timeouts are `SET LOCAL` per call instead, see [`call_begin_sql`]).
fn for_transaction_pooler(connect: PgConnectOptions) -> PgConnectOptions {
    connect.statement_cache_capacity(0).extra_float_digits(None)
}

/// The simple query opening each call's transaction behind a transaction pooler: the
/// timeouts travel with it (`SET LOCAL` ends with the transaction, so nothing leaks to
/// the pooler's next client). Whole milliseconds of validated `Duration`s, no user text.
fn call_begin_sql(options: &ProviderOptions) -> String {
    let mut sql = String::from("BEGIN");
    if let Some(t) = options.statement_timeout {
        sql.push_str(&format!(
            "; SET LOCAL statement_timeout = {}",
            t.as_millis()
        ));
    }
    if let Some(t) = options.lock_timeout {
        sql.push_str(&format!("; SET LOCAL lock_timeout = {}", t.as_millis()));
    }
    sql
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
