//! Shared helpers for the integration tests: the database URL, a conformance/stress
//! factory that hands out providers on fresh schemas, and schema clean-up that also runs
//! when a test panics.
//!
//! Every provider made here lives in its own schema `t_<16 hex>` and is tagged with
//! `application_name = "dpgh-test <schema>"`. When the owner (a [`PgFactory`] or a
//! [`SchemaGuard`]) is dropped, its pools are closed, any connection still carrying the
//! tag is terminated, and the schemas are dropped with `DROP SCHEMA ... CASCADE`. Set
//! `DUROXIDE_PG_TEST_KEEP_SCHEMAS=1` to keep them for inspection.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex, Once, PoisonError, Weak};
use std::time::Duration;

use duroxide::provider_stress_tests::parallel_orchestrations::ProviderStressFactory;
use duroxide::provider_validations::ProviderFactory;
use duroxide::providers::{Provider, WorkItem};
use duroxide::{Event, EventKind};
use duroxide_pg_hybrid::options::redact_url;
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{FetchPath, PoolerMode, PostgresProvider, ProviderOptions};
use sqlx::{Connection, PgConnection};

/// Used when `DATABASE_URL` is not set. TLS is off: on loopback it buys nothing, and
/// each new TLS connection costs tens of milliseconds of CPU (the CA bundle is loaded per
/// connection), which slows the suite down 2-3x and upsets its timing-sensitive tests.
pub const DEFAULT_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";

/// Pool size of every test provider. `scripts/test.sh` runs 8 test threads, so the suite
/// needs roughly 8 x 5 connections plus one short-lived clean-up connection per test.
pub const TEST_POOL_SIZE: u32 = 5;

/// Connections each test provider opens at creation (`min_connections`): the hybrid fetch
/// path reads on up to four connections at once.
pub const WARM_CONNECTIONS: u32 = 4;

/// Options for the short-polling tests: fetches return at once instead of waiting up to
/// `poll_timeout` for a notification.
pub fn short_polling(options: &mut ProviderOptions) {
    options.long_poll = false;
}

/// Lock timeout the conformance tests pass to `fetch_*` (and sleep on).
pub const TEST_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// How fast an empty fetch must return (the provider short-polls; includes a round trip).
pub const SHORT_POLL_THRESHOLD: Duration = Duration::from_millis(500);

/// Keep test schemas instead of dropping them (for debugging a failure).
pub const KEEP_SCHEMAS_ENV: &str = "DUROXIDE_PG_TEST_KEEP_SCHEMAS";

/// `DATABASE_URL`, else [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

/// Runs `call` again (for up to 30 s) while it fails because the server is at
/// `max_connections` (53300): a call that opens a connection can meet a full server under
/// a full parallel test run, which is transient and not what the calling test is about.
pub async fn retry_while_server_full<T, F, Fut>(
    mut call: F,
) -> Result<T, duroxide::providers::ProviderError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, duroxide::providers::ProviderError>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if e.message.contains("53300") && attempt < 60 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// `PostgresProvider::connect_with`, waiting for a connection slot while the server is
/// full (`retry_while_server_full`).
pub async fn connect_waiting(
    url: &str,
    options: ProviderOptions,
) -> Result<PostgresProvider, duroxide::providers::ProviderError> {
    retry_while_server_full(|| PostgresProvider::connect_with(url, options.clone())).await
}

/// Set (to anything) to run the providers this module creates through the PgBouncer at
/// `PGBOUNCER_URL` (`scripts/with-pgbouncer.sh`): `PoolerMode::Transaction`, calls
/// through PgBouncer, `direct_url` = [`database_url()`] for LISTEN and migrations.
/// Clean-up and the factory hooks keep using the direct URL.
pub const VIA_PGBOUNCER_ENV: &str = "DUROXIDE_PG_TEST_VIA_PGBOUNCER";

/// The transaction-mode PgBouncer started by `scripts/with-pgbouncer.sh`, if any.
pub fn pgbouncer_url() -> Option<String> {
    std::env::var("PGBOUNCER_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Whether test providers go through PgBouncer (see [`VIA_PGBOUNCER_ENV`]).
pub fn via_pgbouncer() -> bool {
    std::env::var_os(VIA_PGBOUNCER_ENV).is_some()
}

/// The URL test providers connect to: `PGBOUNCER_URL` when [`via_pgbouncer()`], else
/// [`database_url()`].
pub fn provider_url() -> String {
    if via_pgbouncer() {
        pgbouncer_url().unwrap_or_else(|| {
            panic!(
                "{VIA_PGBOUNCER_ENV} is set but PGBOUNCER_URL is not: \
                 run through scripts/with-pgbouncer.sh"
            )
        })
    } else {
        database_url()
    }
}

/// A fresh schema name: `t_` + 16 hex characters of a v4 uuid.
pub fn unique_schema() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{}", &id[..16])
}

/// The `application_name` of a test provider's connections; clean-up terminates
/// connections carrying it before dropping the schema.
fn application_name(schema: &str) -> String {
    format!("dpgh-test {schema}")
}

/// Options for a test provider on `schema` using `path`.
pub fn test_options(schema: &str, path: FetchPath) -> ProviderOptions {
    ProviderOptions {
        schema: schema.to_string(),
        max_connections: TEST_POOL_SIZE,
        // Opened up front, as a long-running process would have them: tests with 1 s
        // locks and 100-200 ms margins would otherwise measure connection set-up.
        min_connections: WARM_CONNECTIONS,
        fetch_path: Some(path),
        application_name: application_name(schema),
        pooler: if via_pgbouncer() {
            PoolerMode::Transaction
        } else {
            PoolerMode::Off
        },
        direct_url: via_pgbouncer().then(database_url),
        ..ProviderOptions::default()
    }
}

/// A provider on `schema` whose calls go through a new counting proxy
/// (`duroxide_pg_hybrid_testkit::proxy`, no added latency), its options from
/// [`test_options`] adjusted by `customize`.
pub async fn proxied_provider(
    schema: &str,
    path: FetchPath,
    customize: impl FnOnce(&mut ProviderOptions),
) -> (
    duroxide_pg_hybrid_testkit::proxy::Proxy,
    Arc<PostgresProvider>,
) {
    use duroxide_pg_hybrid_testkit::proxy::{Proxy, rewrite_url};
    let url = database_url();
    let (_, upstream) = rewrite_url(&url, "127.0.0.1:1".parse().unwrap()).unwrap();
    let proxy = Proxy::start(upstream, Duration::ZERO).await.unwrap();
    let (via_proxy, _) = rewrite_url(&url, proxy.addr()).unwrap();
    let mut options = test_options(schema, path);
    customize(&mut options);
    let provider = connect_waiting(&via_proxy, options).await.unwrap();
    (proxy, Arc::new(provider))
}

/// Installs a `tracing` subscriber writing through the test harness when `RUST_LOG` is
/// set (e.g. `RUST_LOG=duroxide::providers::postgres=debug`). Idempotent.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// Schemas (and the providers using them) that are dropped together when this value is
/// dropped, whether the test passed or panicked.
pub struct SchemaCleanup {
    url: String,
    owned: Mutex<Owned>,
}

#[derive(Default)]
struct Owned {
    schemas: Vec<String>,
    /// Weak: a provider the test no longer holds is dropped at once, closing its
    /// connections (tests such as race_replay create one provider per scenario; keeping
    /// them all alive would exhaust the server's connections).
    providers: Vec<Weak<PostgresProvider>>,
}

impl SchemaCleanup {
    fn new(url: String) -> Self {
        Self {
            url,
            owned: Mutex::default(),
        }
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, Owned> {
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops `schemas` of the shared database when the returned value is dropped (test
    /// passed or panicked), for tests that create schemas themselves.
    pub fn for_schemas(schemas: &[String]) -> Self {
        let cleanup = Self::new(database_url());
        cleanup.owned().schemas.extend(schemas.iter().cloned());
        cleanup
    }

    /// Creates a provider on a new schema. The schema is registered before connecting, so
    /// a migration that fails half-way is cleaned up too.
    async fn create_with(
        &self,
        path: FetchPath,
        customize: impl FnOnce(&mut ProviderOptions),
    ) -> Arc<PostgresProvider> {
        self.create_at(&provider_url(), path, customize).await
    }

    /// Like `create_with`, connecting to `url`.
    async fn create_at(
        &self,
        url: &str,
        path: FetchPath,
        customize: impl FnOnce(&mut ProviderOptions),
    ) -> Arc<PostgresProvider> {
        let schema = unique_schema();
        self.owned().schemas.push(schema.clone());
        let mut options = test_options(&schema, path);
        customize(&mut options);
        let provider = connect_waiting(url, options).await.unwrap_or_else(|e| {
            panic!(
                "cannot create a test provider on schema {schema} at {}: {e}\n\
                 (is PostgreSQL running? run the tests through scripts/with-postgres.sh)",
                redact_url(url)
            )
        });
        let provider = Arc::new(provider);
        self.owned().providers.push(Arc::downgrade(&provider));
        provider
    }
}

impl Drop for SchemaCleanup {
    fn drop(&mut self) {
        let Owned { schemas, providers } =
            std::mem::take(self.owned.get_mut().unwrap_or_else(PoisonError::into_inner));
        // `close()` marks the provider's own pool, its migration pool and its LISTEN
        // task closed at once (the returned future only waits for the connections to
        // finish closing, which would need the test's runtime). Tasks a failed test
        // leaked now get `PoolClosed` instead of new connections.
        for p in providers.iter().filter_map(Weak::upgrade) {
            let _closing = p.close();
        }
        drop(providers);
        if schemas.is_empty() || std::env::var_os(KEEP_SCHEMAS_ENV).is_some() {
            return;
        }
        // Drop may run inside the test's runtime (even while unwinding), where blocking on
        // async work is not allowed: use a thread with its own small runtime.
        let url = self.url.clone();
        let outcome = std::thread::spawn(move || -> Result<(), BoxError> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(drop_schemas(&url, &schemas))
                .map_err(|e| format!("dropping test schemas {schemas:?}: {e}").into())
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: test clean-up failed: {e}"),
            Err(_) => eprintln!("warning: test clean-up thread panicked"),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn drop_schemas(url: &str, schemas: &[String]) -> Result<(), BoxError> {
    let mut conn = tokio::time::timeout(Duration::from_secs(15), PgConnection::connect(url))
        .await
        .map_err(|_| "timed out connecting")??;
    // Connections a panicking test left behind (e.g. a runtime that was never shut down)
    // could hold locks that DROP SCHEMA would wait on.
    // Not through PgBouncer: its server connections carry the application_name of the
    // client they served last, and terminating them would break other tests' calls.
    let tags: Vec<String> = if via_pgbouncer() {
        Vec::new()
    } else {
        schemas.iter().map(|s| application_name(s)).collect()
    };
    if let Err(e) = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
    )
    .bind(&tags)
    .execute(&mut conn)
    .await
    {
        eprintln!("warning: could not terminate leftover test connections: {e}");
    }
    sqlx::query("SET lock_timeout = '30s'")
        .execute(&mut conn)
        .await?;
    for schema in schemas {
        sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(schema)
        ))
        .execute(&mut conn)
        .await?;
    }
    conn.close().await?;
    Ok(())
}

/// Conformance and stress factory: every `create_provider()` returns a provider on a new,
/// empty schema using the configured fetch path. The special hooks act on the provider
/// created last. All schemas are dropped when the factory is dropped.
pub struct PgFactory {
    path: FetchPath,
    customize: fn(&mut ProviderOptions),
    last: Mutex<Option<Arc<PostgresProvider>>>,
    cleanup: SchemaCleanup,
}

impl PgFactory {
    /// A factory for `path` against [`database_url()`].
    pub fn new(path: FetchPath) -> Self {
        Self::with_options(path, |_| {})
    }

    /// A factory whose providers' options are adjusted by `customize` (schema, pool size
    /// and application name are already set; changing the schema defeats the clean-up).
    pub fn with_options(path: FetchPath, customize: fn(&mut ProviderOptions)) -> Self {
        init_tracing();
        Self {
            path,
            customize,
            last: Mutex::new(None),
            cleanup: SchemaCleanup::new(database_url()),
        }
    }

    /// The fetch path of the providers this factory creates.
    pub fn fetch_path(&self) -> FetchPath {
        self.path
    }

    /// Creates a provider on a fresh schema (the typed form of `create_provider`).
    pub async fn create_pg_provider(&self) -> Arc<PostgresProvider> {
        let provider = self.cleanup.create_with(self.path, self.customize).await;
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(provider.clone());
        provider
    }

    /// The provider created last; panics if none was created yet.
    pub fn last_provider(&self) -> Arc<PostgresProvider> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .expect("the test called a factory hook before create_provider()")
    }
}

#[async_trait::async_trait]
impl ProviderFactory for PgFactory {
    async fn create_provider(&self) -> Arc<dyn Provider> {
        self.create_pg_provider().await
    }

    fn lock_timeout(&self) -> Duration {
        TEST_LOCK_TIMEOUT
    }

    fn short_poll_threshold(&self) -> Duration {
        SHORT_POLL_THRESHOLD
    }

    async fn corrupt_instance_history(&self, instance: &str) {
        let provider = self.last_provider();
        let sql = format!(
            "UPDATE {}.history SET event_data = $2 WHERE instance_id = $1",
            quote_ident(provider.schema())
        );
        sqlx::query(&sql)
            .bind(instance)
            .bind("NOT_VALID_JSON{{{")
            .execute(provider.pool())
            .await
            .unwrap_or_else(|e| panic!("corrupt_instance_history({instance}): {e}"));
    }

    async fn get_max_attempt_count(&self, instance: &str) -> u32 {
        let provider = self.last_provider();
        let sql = format!(
            "SELECT MAX(attempt_count) FROM {}.orchestrator_queue WHERE instance_id = $1",
            quote_ident(provider.schema())
        );
        let max: Option<i32> = sqlx::query_scalar(&sql)
            .bind(instance)
            .fetch_one(provider.pool())
            .await
            .unwrap_or_else(|e| panic!("get_max_attempt_count({instance}): {e}"));
        max.map_or(0, |m| {
            u32::try_from(m).expect("attempt_count is never negative")
        })
    }
}

#[async_trait::async_trait]
impl ProviderStressFactory for PgFactory {
    async fn create_provider(&self) -> Arc<dyn Provider> {
        self.create_pg_provider().await
    }
}

/// Drops the schema of a provider made by [`new_provider`] when dropped (also on panic).
pub struct SchemaGuard {
    schema: String,
    cleanup: SchemaCleanup,
}

impl SchemaGuard {
    /// The guarded schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}

/// A provider on a fresh schema for tests outside the conformance suite. Keep the guard
/// alive for as long as the provider is used.
pub async fn new_provider(path: FetchPath) -> (Arc<PostgresProvider>, SchemaGuard) {
    new_provider_with(path, |_| {}).await
}

/// Like [`new_provider`], with a chance to adjust the options (schema and application
/// name are already set; changing the schema defeats the clean-up).
pub async fn new_provider_with(
    path: FetchPath,
    customize: impl FnOnce(&mut ProviderOptions),
) -> (Arc<PostgresProvider>, SchemaGuard) {
    init_tracing();
    let cleanup = SchemaCleanup::new(database_url());
    let provider = cleanup.create_with(path, customize).await;
    let schema = provider.schema().to_string();
    (provider, SchemaGuard { schema, cleanup })
}

/// Like [`new_provider_with`], connecting to `url` (e.g. [`pgbouncer_url()`]); the
/// schema is still cleaned up through [`database_url()`].
pub async fn new_provider_at(
    url: &str,
    path: FetchPath,
    customize: impl FnOnce(&mut ProviderOptions),
) -> (Arc<PostgresProvider>, SchemaGuard) {
    init_tracing();
    let cleanup = SchemaCleanup::new(database_url());
    let provider = cleanup.create_at(url, path, customize).await;
    let schema = provider.schema().to_string();
    (provider, SchemaGuard { schema, cleanup })
}

/// A `StartOrchestration` of orchestration "O" version 1.0.0, execution 1.
pub fn start_item(instance: &str) -> WorkItem {
    WorkItem::StartOrchestration {
        instance: instance.to_string(),
        orchestration: "O".to_string(),
        input: "in".to_string(),
        version: Some("1.0.0".to_string()),
        parent_instance: None,
        parent_id: None,
        parent_execution_id: None,
        execution_id: 1,
    }
}

/// An untagged, session-less `ActivityExecute` "A" of execution 1.
pub fn activity_item(instance: &str, id: u64) -> WorkItem {
    WorkItem::ActivityExecute {
        instance: instance.to_string(),
        execution_id: 1,
        id,
        name: "A".to_string(),
        input: "in".to_string(),
        session_id: None,
        tag: None,
    }
}

/// Event 1 of execution 1: `OrchestrationStarted` of orchestration "O" 1.0.0, the start
/// [`start_item`] asks for.
pub fn started_event(instance: &str) -> Event {
    Event::with_event_id(
        1,
        instance,
        1,
        None,
        EventKind::OrchestrationStarted {
            name: "O".to_string(),
            version: "1.0.0".to_string(),
            input: "in".to_string(),
            parent_instance: None,
            parent_id: None,
            parent_execution_id: None,
            carry_forward_events: None,
            initial_custom_status: None,
        },
    )
}

/// Metadata of a turn of orchestration "O" 1.0.0, running.
pub fn orchestration_metadata() -> duroxide::providers::ExecutionMetadata {
    duroxide::providers::ExecutionMetadata {
        orchestration_name: Some("O".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        status: Some("Running".to_string()),
        ..Default::default()
    }
}

/// The completion of activity `id` of `instance`'s first execution (result `r<id>`).
pub fn completion(instance: &str, id: u64) -> WorkItem {
    WorkItem::ActivityCompleted {
        instance: instance.to_string(),
        execution_id: 1,
        id,
        result: format!("r{id}"),
    }
}

/// Acks `token`'s turn (execution 1, [`orchestration_metadata`]) scheduling `activities`.
pub async fn ack_with(p: &PostgresProvider, token: &str, activities: Vec<WorkItem>) {
    ack_events(p, token, vec![], activities).await;
}

/// Acks `token`'s turn (execution 1, [`orchestration_metadata`]) appending `events` and
/// scheduling `activities`.
pub async fn ack_events(
    p: &PostgresProvider,
    token: &str,
    events: Vec<Event>,
    activities: Vec<WorkItem>,
) {
    p.ack_orchestration_item(
        token,
        1,
        events,
        activities,
        vec![],
        orchestration_metadata(),
        vec![],
    )
    .await
    .unwrap();
}

/// Runs `f` on a current-thread runtime with a local metrics recorder (the provider's
/// counters of this test only).
pub fn with_metrics<F, Fut>(f: F)
where
    F: FnOnce(metrics_util::debugging::Snapshotter) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(f(snapshotter)));
}

/// Sum of counter `name` over the series carrying every label of `labels`.
pub fn counter(
    s: &metrics_util::debugging::Snapshotter,
    name: &str,
    labels: &[(&str, &str)],
) -> u64 {
    s.snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            let k = key.key();
            k.name() == name
                && labels
                    .iter()
                    .all(|(n, v)| k.labels().any(|l| l.key() == *n && l.value() == *v))
        })
        .map(|(_, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(c) => c,
            _ => 0,
        })
        .sum()
}

/// Enqueues `instance`'s start and claims its first turn (30 s lease): the lock token.
pub async fn first_turn(p: &PostgresProvider, instance: &str) -> String {
    p.enqueue_for_orchestrator(start_item(instance), None)
        .await
        .unwrap();
    let (_, token, _) = p
        .fetch_orchestration_item(Duration::from_secs(30), Duration::ZERO, None)
        .await
        .unwrap()
        .expect("the start is claimable");
    token
}

/// Starts `instance`, acks its first turn with `n` activities (ids 1..=n) and leases
/// them all (30 s): their worker lock tokens, in id order.
pub async fn fan_out(p: &PostgresProvider, instance: &str, n: u64) -> Vec<String> {
    const LOCK: Duration = Duration::from_secs(30);
    let token = first_turn(p, instance).await;
    ack_with(
        p,
        &token,
        (1..=n).map(|id| activity_item(instance, id)).collect(),
    )
    .await;
    let mut tokens = Vec::new();
    for _ in 0..n {
        let (_, t, _) = p
            .fetch_work_item(
                LOCK,
                Duration::ZERO,
                None,
                &duroxide::providers::TagFilter::DefaultOnly,
            )
            .await
            .unwrap()
            .expect("an activity");
        tokens.push(t);
    }
    tokens
}
