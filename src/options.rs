//! Provider configuration: a plain struct with documented defaults, `from_env`, and
//! `validate` (run before any connection is made).

use std::fmt;
use std::time::Duration;

use crate::credentials::PasswordSource;
use crate::errors::ConfigError;
use crate::schema::validate_schema_name;

/// Default schema holding every table, function and the migrations ledger.
pub const DEFAULT_SCHEMA: &str = "duroxide";

/// Largest [`ProviderOptions::fan_in_grace`] accepted: the grace is meant to gather
/// completions that arrive together, not to hold turns back for long.
pub const MAX_FAN_IN_GRACE: Duration = Duration::from_secs(1);
/// Largest [`ProviderOptions::handover_history_window`] accepted: the history it answers
/// with is the one an ack committed, so the window stays short.
pub const MAX_HANDOVER_HISTORY_WINDOW: Duration = Duration::from_secs(1);

/// Which `fetch_orchestration_item` implementation a provider uses.
///
/// Both paths claim through the same `sp_fetch_and_lock` function and share one schema,
/// so workers on different paths can run side by side against one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchPath {
    /// `sp_fetch_and_lock` (one round trip, returning the batch and the instance's name),
    /// then history and KV snapshot read concurrently on separate pooled connections (one
    /// more round trip; the history alone for an execution whose last turn ran here).
    Hybrid,
    /// `fetch_orchestration_full`: claim and all reads in one function call (one round trip).
    Procedure,
}

impl FetchPath {
    /// The path compiled in as default: `Procedure` with the `full-procedure` feature,
    /// `Hybrid` otherwise.
    pub const fn compiled_default() -> Self {
        if cfg!(feature = "full-procedure") {
            FetchPath::Procedure
        } else {
            FetchPath::Hybrid
        }
    }

    /// The name used in configuration (`hybrid` / `procedure`).
    pub const fn as_str(self) -> &'static str {
        match self {
            FetchPath::Hybrid => "hybrid",
            FetchPath::Procedure => "procedure",
        }
    }
}

impl Default for FetchPath {
    fn default() -> Self {
        Self::compiled_default()
    }
}

impl fmt::Display for FetchPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FetchPath {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hybrid" => Ok(FetchPath::Hybrid),
            "procedure" | "full-procedure" | "full_procedure" => Ok(FetchPath::Procedure),
            other => Err(ConfigError::new(format!(
                "unknown fetch path {other:?}: expected \"hybrid\" or \"procedure\""
            ))),
        }
    }
}

/// Options of a [`PostgresProvider`](crate::PostgresProvider).
///
/// ```
/// use duroxide_pg_hybrid::{FetchPath, ProviderOptions};
/// let opts = ProviderOptions {
///     schema: "tenant_a".into(),
///     max_connections: 8,
///     fetch_path: Some(FetchPath::Procedure),
///     ..ProviderOptions::default()
/// };
/// assert!(opts.validate().is_ok());
/// ```
#[derive(Clone)]
pub struct ProviderOptions {
    /// Schema holding all objects (validated: `[a-z_][a-z0-9_]*`, at most 63 bytes).
    pub schema: String,
    /// Connections for provider calls. A hybrid fetch uses up to two at once for its
    /// reads. (The provider also keeps up to 2 for migrations and `pool()`, and 1 for
    /// LISTEN once a fetch long-polls.)
    pub max_connections: u32,
    /// Connections opened at start-up; idle connections are kept open.
    pub min_connections: u32,
    /// How long a call waits for a pooled connection before failing with a retryable
    /// error.
    pub acquire_timeout: Duration,
    /// When every connection is busy, serve the runtime's dispatch calls (fetch, ack,
    /// renew, abandon, and the worker's history read before each activity it fetched)
    /// before other calls (status reads, client enqueues, admin), so a
    /// crowd of clients polling `wait_for_orchestration` does not queue in front of the
    /// turns that would complete their orchestrations, and a lease renewal is not late
    /// behind them. A waiting call of the other lane is passed over by at most 8
    /// dispatch calls in a row. Default on; `false` = one first-come queue. Env
    /// `DUROXIDE_PG_DISPATCH_LANE`.
    pub dispatch_lane: bool,
    /// Let fewer than `max_connections` run statements at once while statements take
    /// well over their usual best (they queue for the server's CPUs or locks), and all
    /// of them when calls run near their best (a database far away, where a call's time
    /// is on the wire). Never below 3 (or `max_connections` if smaller); calls running
    /// over 1 s do not count against it. Default on;
    /// `false` = every connection may run at once. Env `DUROXIDE_PG_ADAPTIVE_LIMIT`.
    /// See README "Connections".
    pub adaptive_limit: bool,
    /// Server-side `statement_timeout` for the provider's connections (`None` = server
    /// default).
    pub statement_timeout: Option<Duration>,
    /// Server-side `lock_timeout` for the provider's connections (`None` = server default).
    pub lock_timeout: Option<Duration>,
    /// Apply pending migrations on connect (default). When `false`, connect only verifies
    /// that the schema is at the version this binary expects.
    pub auto_migrate: bool,
    /// Fetch path; `None` = `DUROXIDE_PG_FETCH_PATH` if set, else the compiled default.
    pub fetch_path: Option<FetchPath>,
    /// `application_name` reported to the server (visible in `pg_stat_activity`).
    pub application_name: String,
    /// Honour duroxide's `poll_timeout` with LISTEN/NOTIFY (default). When `false`,
    /// every fetch returns at once (short polling), as duroxide-pg does.
    pub long_poll: bool,
    /// Longest a long-polling fetch sleeps without looking at the database, even when no
    /// notification or timer is due: a safety net for notifications lost outside the
    /// listener's reconnect handling. Idle cost: one claim per dispatcher per interval.
    pub fallback_poll_interval: Duration,
    /// Asked for the password of every new connection (rotating secrets, cloud access
    /// tokens such as Microsoft Entra ID with the `entra` feature); replaces the URL's
    /// password. `None` (default): the URL's password. See [`PasswordSource`].
    pub password_source: Option<PasswordSource>,
    /// A pooled connection idle longer than this is closed instead of reused (`None` =
    /// kept forever). Load balancers and NAT gateways drop idle flows without telling
    /// either end, and a call on such a connection hangs until TCP gives up. The default,
    /// 5 minutes, is below AWS's 350 s cut; behind a shorter one (Azure Load Balancer's
    /// default is 4 minutes) set it lower. Checked when a connection is checked out.
    pub idle_timeout: Option<Duration>,
    /// A pooled connection older than this is closed when it comes back to the pool
    /// (`None` = no limit): spreads connections across servers after a failover or a
    /// scale-out behind a pooler, and bounds per-backend memory growth. Default 30 min.
    pub max_lifetime: Option<Duration>,
    /// While adopting a duroxide-pg schema (see README "Adopting a running duroxide-pg
    /// deployment"), run the background task that moves instances over (default). Every
    /// process may run it; processes that should not touch duroxide-pg's tables turn it
    /// off. Env `DUROXIDE_PG_ADOPTION_MOVER`.
    pub adoption_mover: bool,
    /// How often an idle mover looks for instances left in the duroxide-pg tables
    /// (default 1 s; a busy one continues at once).
    pub adoption_interval: Duration,
    /// Decoded history events kept in memory, over all cached instances, so that the
    /// next turn of an instance this process ran reads only the events it has not seen
    /// (`0` = no cache: every turn reads the whole execution). Least recently run
    /// instances are dropped first. A decoded event takes about its JSON size plus ~200
    /// bytes. Default 50,000.
    pub history_cache_events: usize,
    /// In-process hand-over (default on): an ack that makes work runnable claims it in
    /// the same call for a fetch of this provider that is already waiting for it (an
    /// orchestration ack hands its activities to waiting worker fetches, a worker ack
    /// hands the instance's next turn to a waiting orchestration fetch), so a sequential
    /// step needs no fetch round trip. Needs `long_poll`. `false` = every item is
    /// fetched.
    pub handover: bool,
    /// Fan-in grace: a completion that makes its instance runnable while other
    /// activities of that instance are still queued or running makes it runnable this
    /// much later instead, so the completions of a fan-out that finish together run in
    /// one orchestration turn rather than one turn each (fewer claims, acks and reads
    /// per orchestration). The instance's last outstanding completion ends the grace at
    /// once, so a fan-in waiting for all of its activities is not delayed; what waits up
    /// to this long is a turn that needs only some of them (`select`, the first of
    /// several results). `Duration::ZERO` = off. Default 20 ms. Env
    /// `DUROXIDE_PG_FAN_IN_GRACE_MS`.
    pub fan_in_grace: Duration,
    /// How long the history an orchestration ack committed answers the
    /// `read(instance)` that duroxide 0.1.32's worker makes before each activity the ack
    /// handed over (one read per activity; the worker reads it for the orchestration's
    /// name and version), and the history a worker fetch read with the activity it
    /// claimed (histories of at most 100 events and 8 KB) answers that read for it. Such a read
    /// costs no round trip; it returns the history as of that ack or claim, so it misses
    /// only a turn another process acked after it (see README "In-process hand-over").
    /// `Duration::ZERO` = every read asks the database, and fetches read no history. Default
    /// 200 ms, at most [`MAX_HANDOVER_HISTORY_WINDOW`]. Env
    /// `DUROXIDE_PG_HANDOVER_HISTORY_WINDOW_MS`.
    pub handover_history_window: Duration,

    // ---- Connection poolers (PgBouncer, managed poolers); see README "Poolers and
    // managed PostgreSQL" and [`PoolerMode`]. ----
    /// What sits between the provider and PostgreSQL at the connection URL (default
    /// [`PoolerMode::Off`]: PostgreSQL itself, or a session-mode pooler).
    pub pooler: PoolerMode,
    /// A URL reaching PostgreSQL WITHOUT the pooler (session semantics), e.g. port 5432
    /// next to a PgBouncer on 6432. Used for LISTEN (long polling), migrations and
    /// [`PostgresProvider::pool`](crate::PostgresProvider::pool); provider calls keep
    /// using the main URL. Behind a transaction pooler without it, fetches short-poll
    /// and migrations run in one transaction under a transaction-level advisory lock.
    /// The password source (if any) applies to it too.
    #[doc(alias = "listen_url")]
    pub direct_url: Option<String>,
}

/// What sits between the provider and PostgreSQL at the main connection URL.
///
/// In [`Transaction`](PoolerMode::Transaction) mode (PgBouncer `pool_mode =
/// transaction`, Azure flexible server's built-in PgBouncer, Neon's and Supabase's
/// poolers, RDS Proxy) the provider keeps no state on a server session between calls:
///
/// * every call runs as `BEGIN` (plus `SET LOCAL statement_timeout`/`lock_timeout` when
///   configured), the statement, `COMMIT`, so the pooler keeps one server connection for
///   the whole call. Statements are unnamed and never cached (works with PgBouncer's
///   default `max_prepared_statements = 0`): two more round trips per call than
///   [`Off`](PoolerMode::Off), which keeps named statements cached per connection;
/// * no startup `options` parameter (PgBouncer refuses the connection with
///   "unsupported startup parameter: options") and no `extra_float_digits`;
/// * LISTEN and migrations use [`ProviderOptions::direct_url`] when given (see there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PoolerMode {
    /// Direct connections (or a session-mode pooler): session state is kept.
    #[default]
    Off,
    /// A transaction-mode pooler: a server connection is only ours inside a transaction.
    Transaction,
}

impl PoolerMode {
    /// The name used in configuration (`off` / `transaction`).
    pub const fn as_str(self) -> &'static str {
        match self {
            PoolerMode::Off => "off",
            PoolerMode::Transaction => "transaction",
        }
    }
}

impl fmt::Display for PoolerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PoolerMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "session" | "false" | "0" => Ok(PoolerMode::Off),
            "transaction" | "pgbouncer" | "true" | "1" => Ok(PoolerMode::Transaction),
            other => Err(ConfigError::new(format!(
                "unknown pooler mode {other:?}: expected \"off\" or \"transaction\""
            ))),
        }
    }
}

impl Default for ProviderOptions {
    fn default() -> Self {
        Self {
            schema: DEFAULT_SCHEMA.to_string(),
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(30),
            dispatch_lane: true,
            adaptive_limit: true,
            statement_timeout: None,
            lock_timeout: None,
            auto_migrate: true,
            fetch_path: None,
            application_name: "duroxide-pg-hybrid".to_string(),
            long_poll: true,
            fallback_poll_interval: Duration::from_secs(10),
            password_source: None,
            idle_timeout: Some(Duration::from_secs(5 * 60)),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            adoption_mover: true,
            adoption_interval: Duration::from_secs(1),
            history_cache_events: 50_000,
            handover: true,
            fan_in_grace: Duration::from_millis(20),
            handover_history_window: Duration::from_millis(200),
            pooler: PoolerMode::Off,
            direct_url: None,
        }
    }
}

impl fmt::Debug for ProviderOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderOptions")
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("dispatch_lane", &self.dispatch_lane)
            .field("adaptive_limit", &self.adaptive_limit)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("auto_migrate", &self.auto_migrate)
            .field("fetch_path", &self.fetch_path)
            .field("application_name", &self.application_name)
            .field("long_poll", &self.long_poll)
            .field("fallback_poll_interval", &self.fallback_poll_interval)
            .field("password_source", &self.password_source)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("adoption_mover", &self.adoption_mover)
            .field("adoption_interval", &self.adoption_interval)
            .field("history_cache_events", &self.history_cache_events)
            .field("handover", &self.handover)
            .field("fan_in_grace", &self.fan_in_grace)
            .field("handover_history_window", &self.handover_history_window)
            .field("pooler", &self.pooler)
            .field("direct_url", &self.direct_url.as_deref().map(redact_url))
            .finish()
    }
}

/// Environment variables read by [`ProviderOptions::from_env`].
pub mod env {
    /// Connection URL (`postgres://` or `postgresql://`).
    pub const DATABASE_URL: &str = "DATABASE_URL";
    /// Schema name.
    pub const SCHEMA: &str = "DUROXIDE_PG_SCHEMA";
    /// Pool size.
    pub const MAX_CONNECTIONS: &str = "DUROXIDE_PG_MAX_CONNECTIONS";
    /// `hybrid` or `procedure`.
    pub const FETCH_PATH: &str = "DUROXIDE_PG_FETCH_PATH";
    /// `true`/`false`: apply migrations on connect.
    pub const AUTO_MIGRATE: &str = "DUROXIDE_PG_AUTO_MIGRATE";
    /// [`ProviderOptions::adoption_mover`](super::ProviderOptions::adoption_mover).
    pub const ADOPTION_MOVER: &str = "DUROXIDE_PG_ADOPTION_MOVER";
    /// Pool acquire timeout in milliseconds.
    pub const ACQUIRE_TIMEOUT_MS: &str = "DUROXIDE_PG_ACQUIRE_TIMEOUT_MS";
    /// Server statement timeout in milliseconds.
    pub const STATEMENT_TIMEOUT_MS: &str = "DUROXIDE_PG_STATEMENT_TIMEOUT_MS";
    /// `true`/`false`: long polling with LISTEN/NOTIFY.
    pub const LONG_POLL: &str = "DUROXIDE_PG_LONG_POLL";
    /// Fallback poll interval of long polling, in milliseconds.
    pub const FALLBACK_POLL_MS: &str = "DUROXIDE_PG_FALLBACK_POLL_MS";
    /// Pool idle timeout in milliseconds (`0` = keep idle connections forever).
    pub const IDLE_TIMEOUT_MS: &str = "DUROXIDE_PG_IDLE_TIMEOUT_MS";
    /// Pool connection max lifetime in milliseconds (`0` = no limit).
    pub const MAX_LIFETIME_MS: &str = "DUROXIDE_PG_MAX_LIFETIME_MS";
    /// History cache size in events (`0` = off).
    pub const HISTORY_CACHE_EVENTS: &str = "DUROXIDE_PG_HISTORY_CACHE_EVENTS";
    /// `true` / `false`: dispatch calls first when the pool is busy
    /// (`ProviderOptions::dispatch_lane`).
    pub const DISPATCH_LANE: &str = "DUROXIDE_PG_DISPATCH_LANE";
    /// `true` / `false`: fewer connections at once while statements queue in the server
    /// (`ProviderOptions::adaptive_limit`).
    pub const ADAPTIVE_LIMIT: &str = "DUROXIDE_PG_ADAPTIVE_LIMIT";
    /// `true` / `false`: in-process hand-over (`ProviderOptions::handover`).
    pub const HANDOVER: &str = "DUROXIDE_PG_HANDOVER";
    /// Fan-in grace in milliseconds (`ProviderOptions::fan_in_grace`, `0` = off).
    pub const FAN_IN_GRACE_MS: &str = "DUROXIDE_PG_FAN_IN_GRACE_MS";
    /// Milliseconds (`ProviderOptions::handover_history_window`, `0` = off).
    pub const HANDOVER_HISTORY_WINDOW_MS: &str = "DUROXIDE_PG_HANDOVER_HISTORY_WINDOW_MS";
    /// `off` / `transaction`: what sits at `DATABASE_URL` (see `PoolerMode`).
    pub const POOLER: &str = "DUROXIDE_PG_POOLER";
    /// URL reaching PostgreSQL without the pooler (LISTEN, migrations).
    pub const DIRECT_URL: &str = "DUROXIDE_PG_DIRECT_URL";
    /// Another name for [`DIRECT_URL`] (what it is most often needed for); used when
    /// `DUROXIDE_PG_DIRECT_URL` is not set.
    pub const LISTEN_URL: &str = "DUROXIDE_PG_LISTEN_URL";
}

impl ProviderOptions {
    /// Reads options from the environment (variables in [`mod@env`]); unset variables keep
    /// their defaults. Returns the options and `DATABASE_URL`.
    ///
    /// # Errors
    /// A variable that is set but malformed, a missing `DATABASE_URL`, or options that
    /// fail [`validate`](Self::validate).
    pub fn from_env() -> Result<(String, Self), ConfigError> {
        let url = std::env::var(env::DATABASE_URL)
            .map_err(|_| ConfigError::new(format!("{} is not set", env::DATABASE_URL)))?;
        let opts = Self::default().with_env_overrides()?;
        Ok((url, opts))
    }

    /// Applies the `DUROXIDE_PG_*` variables that are set on top of `self`.
    ///
    /// # Errors
    /// A set variable that does not parse, or options that fail validation.
    pub fn with_env_overrides(mut self) -> Result<Self, ConfigError> {
        if let Some(v) = read_env(env::SCHEMA) {
            self.schema = v;
        }
        if let Some(v) = read_env(env::MAX_CONNECTIONS) {
            self.max_connections = parse_env(env::MAX_CONNECTIONS, &v)?;
        }
        if let Some(v) = read_env(env::FETCH_PATH) {
            self.fetch_path = Some(v.parse()?);
        }
        if let Some(v) = read_env(env::AUTO_MIGRATE) {
            self.auto_migrate = parse_bool(env::AUTO_MIGRATE, &v)?;
        }
        if let Some(v) = read_env(env::ADOPTION_MOVER) {
            self.adoption_mover = parse_bool(env::ADOPTION_MOVER, &v)?;
        }
        if let Some(v) = read_env(env::ACQUIRE_TIMEOUT_MS) {
            self.acquire_timeout = Duration::from_millis(parse_env(env::ACQUIRE_TIMEOUT_MS, &v)?);
        }
        if let Some(v) = read_env(env::STATEMENT_TIMEOUT_MS) {
            self.statement_timeout = Some(Duration::from_millis(parse_env(
                env::STATEMENT_TIMEOUT_MS,
                &v,
            )?));
        }
        if let Some(v) = read_env(env::LONG_POLL) {
            self.long_poll = parse_bool(env::LONG_POLL, &v)?;
        }
        if let Some(v) = read_env(env::FALLBACK_POLL_MS) {
            self.fallback_poll_interval =
                Duration::from_millis(parse_env(env::FALLBACK_POLL_MS, &v)?);
        }
        if let Some(v) = read_env(env::IDLE_TIMEOUT_MS) {
            let ms: u64 = parse_env(env::IDLE_TIMEOUT_MS, &v)?;
            self.idle_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(v) = read_env(env::MAX_LIFETIME_MS) {
            let ms: u64 = parse_env(env::MAX_LIFETIME_MS, &v)?;
            self.max_lifetime = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(v) = read_env(env::HISTORY_CACHE_EVENTS) {
            self.history_cache_events = parse_env(env::HISTORY_CACHE_EVENTS, &v)?;
        }
        if let Some(v) = read_env(env::DISPATCH_LANE) {
            self.dispatch_lane = parse_bool(env::DISPATCH_LANE, &v)?;
        }
        if let Some(v) = read_env(env::ADAPTIVE_LIMIT) {
            self.adaptive_limit = parse_bool(env::ADAPTIVE_LIMIT, &v)?;
        }
        if let Some(v) = read_env(env::HANDOVER) {
            self.handover = parse_bool(env::HANDOVER, &v)?;
        }
        if let Some(v) = read_env(env::FAN_IN_GRACE_MS) {
            self.fan_in_grace = Duration::from_millis(parse_env(env::FAN_IN_GRACE_MS, &v)?);
        }
        if let Some(v) = read_env(env::HANDOVER_HISTORY_WINDOW_MS) {
            self.handover_history_window =
                Duration::from_millis(parse_env(env::HANDOVER_HISTORY_WINDOW_MS, &v)?);
        }
        if let Some(v) = read_env(env::POOLER) {
            self.pooler = v.parse()?;
        }
        if let Some(v) = read_env(env::DIRECT_URL).or_else(|| read_env(env::LISTEN_URL)) {
            self.direct_url = Some(v);
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the options without touching the database.
    ///
    /// # Errors
    /// An invalid schema name, a pool of size 0, `min_connections > max_connections`, or
    /// a `fan_in_grace` above [`MAX_FAN_IN_GRACE`], a `handover_history_window` above
    /// [`MAX_HANDOVER_HISTORY_WINDOW`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_schema_name(&self.schema)?;
        if self.max_connections == 0 {
            return Err(ConfigError::new("max_connections must be at least 1"));
        }
        if self.fallback_poll_interval.is_zero() {
            return Err(ConfigError::new(
                "fallback_poll_interval must be greater than zero",
            ));
        }
        if self.fan_in_grace > MAX_FAN_IN_GRACE {
            return Err(ConfigError::new(format!(
                "fan_in_grace ({} ms) exceeds {} ms: it delays turns that need only some of \
                 their activities' results by that much",
                self.fan_in_grace.as_millis(),
                MAX_FAN_IN_GRACE.as_millis()
            )));
        }
        if self.handover_history_window > MAX_HANDOVER_HISTORY_WINDOW {
            return Err(ConfigError::new(format!(
                "handover_history_window ({} ms) exceeds {} ms: reads in it are answered with \
                 the history of a past ack",
                self.handover_history_window.as_millis(),
                MAX_HANDOVER_HISTORY_WINDOW.as_millis()
            )));
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "idle_timeout must be greater than zero (use None to keep idle connections)",
            ));
        }
        if self.max_lifetime.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "max_lifetime must be greater than zero (use None for no limit)",
            ));
        }
        if let Some(url) = &self.direct_url {
            url.parse::<sqlx::postgres::PgConnectOptions>()
                .map_err(|e| {
                    ConfigError::new(format!("invalid direct_url {}: {e}", redact_url(url)))
                })?;
        }
        if self.min_connections > self.max_connections {
            return Err(ConfigError::new(format!(
                "min_connections ({}) exceeds max_connections ({})",
                self.min_connections, self.max_connections
            )));
        }
        Ok(())
    }

    /// The fetch path these options resolve to: the explicit option, else
    /// `DUROXIDE_PG_FETCH_PATH`, else the compiled default.
    ///
    /// # Errors
    /// `DUROXIDE_PG_FETCH_PATH` is set to something other than `hybrid`/`procedure`.
    pub fn resolved_fetch_path(&self) -> Result<FetchPath, ConfigError> {
        if let Some(p) = self.fetch_path {
            return Ok(p);
        }
        match read_env(env::FETCH_PATH) {
            Some(v) => v.parse(),
            None => Ok(FetchPath::compiled_default()),
        }
    }
}

fn read_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(format!("{name}={value:?} is not a valid number")))
}

fn parse_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(format!(
            "{name}={value:?} is not a boolean"
        ))),
    }
}

/// Renders a connection URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return redact_query_password(url);
    };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_string(),
    };
    redact_query_password(&format!(
        "{}{}@{}",
        &url[..scheme_end + 3],
        redacted_userinfo,
        &rest[at + 1..]
    ))
}

fn redact_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_string();
    };
    let params: Vec<String> = url[q + 1..]
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{}?{}", &url[..q], params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgresql://db/x?user=a&password=p&sslmode=require"),
            "postgresql://db/x?user=a&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
    }

    #[test]
    fn parses_fetch_paths() {
        assert_eq!("hybrid".parse::<FetchPath>().unwrap(), FetchPath::Hybrid);
        assert_eq!(
            " Procedure ".parse::<FetchPath>().unwrap(),
            FetchPath::Procedure
        );
        let err = "fast".parse::<FetchPath>().unwrap_err();
        assert!(err.to_string().contains("fast"), "{err}");
    }

    #[test]
    fn validate_rejects_bad_values() {
        let bad = ProviderOptions {
            max_connections: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = ProviderOptions {
            schema: "a;b".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = ProviderOptions {
            min_connections: 5,
            max_connections: 2,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = ProviderOptions {
            idle_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("idle_timeout")
        );
        let bad = ProviderOptions {
            max_lifetime: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_lifetime")
        );
    }

    #[test]
    fn pooler_options_parse_and_validate() {
        assert_eq!(
            "Transaction".parse::<PoolerMode>().unwrap(),
            PoolerMode::Transaction
        );
        assert_eq!(
            "pgbouncer".parse::<PoolerMode>().unwrap(),
            PoolerMode::Transaction
        );
        assert_eq!("off".parse::<PoolerMode>().unwrap(), PoolerMode::Off);
        assert!("statement".parse::<PoolerMode>().is_err());
        let bad = ProviderOptions {
            direct_url: Some("postgres://u:pw@db:notaport/x".into()),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("direct_url") && !err.contains("pw@"), "{err}");
        let shown = format!(
            "{:?}",
            ProviderOptions {
                direct_url: Some("postgres://u:s3cret@db:5432/x".into()),
                ..Default::default()
            }
        );
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn pool_lifetimes_default_below_load_balancer_idle_cuts() {
        let o = ProviderOptions::default();
        assert_eq!(o.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(o.max_lifetime, Some(Duration::from_secs(1800)));
        assert!(o.validate().is_ok());
    }
}
