//! Helpers shared by the fault tests: SQL run at clean-up (also when a test panics), a
//! recording `Provider` wrapper that attributes every failed activity ack to the
//! activity it belonged to, and small query helpers.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use duroxide::providers::{
    DispatcherCapabilityFilter, ExecutionMetadata, OrchestrationItem, Provider, ProviderAdmin,
    ProviderError, ScheduledActivityIdentifier, SessionFetchConfig, TagFilter, WorkItem,
};
use duroxide::{Event, SystemStats};
use duroxide_pg_hybrid::PostgresProvider;
use sqlx::{Connection, PgConnection};

/// SQL statements run, in order, when the guard is dropped (whether the test passed or
/// panicked), on a fresh connection from a thread of its own. Failures are printed, not
/// raised.
pub struct CleanupSql {
    url: String,
    statements: Mutex<Vec<String>>,
}

impl CleanupSql {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            statements: Mutex::default(),
        }
    }

    /// Adds a statement (run after the ones added before).
    pub fn push(&self, sql: impl Into<String>) {
        self.statements
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sql.into());
    }

    /// Terminates connections tagged `application_name`, then drops `schema`.
    pub fn drop_schema(&self, schema: &str, application_name: &str) {
        self.push(terminate_sql(application_name));
        self.push(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            duroxide_pg_hybrid::schema::quote_ident(schema)
        ));
    }
}

/// Terminates every other connection whose `application_name` is `tag`.
pub fn terminate_sql(tag: &str) -> String {
    format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{}' \
         AND pid <> pg_backend_pid()",
        tag.replace('\'', "''")
    )
}

impl Drop for CleanupSql {
    fn drop(&mut self) {
        let statements = std::mem::take(
            self.statements
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if statements.is_empty() || std::env::var_os("DUROXIDE_PG_TEST_KEEP_SCHEMAS").is_some() {
            return;
        }
        let url = self.url.clone();
        let outcome = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut conn = match tokio::time::timeout(
                    Duration::from_secs(15),
                    PgConnection::connect(&url),
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return eprintln!("warning: clean-up could not connect: {e}"),
                    Err(_) => return eprintln!("warning: clean-up timed out connecting"),
                };
                let _ = sqlx::query("SET lock_timeout = '30s'")
                    .execute(&mut conn)
                    .await;
                for sql in statements {
                    if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                        eprintln!("warning: clean-up statement failed: {sql}: {e}");
                    }
                }
                let _ = conn.close().await;
            });
        })
        .join();
        if outcome.is_err() {
            eprintln!("warning: clean-up thread panicked");
        }
    }
}

/// A plain connection (no provider tag), retried for a while: the shared test server may
/// briefly be at `max_connections` (53300) while many tests run.
pub async fn connect_retry(url: &str) -> PgConnection {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match PgConnection::connect(url).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("connect failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!(
                "cannot connect to {}: {e}",
                duroxide_pg_hybrid::options::redact_url(url)
            ),
        }
    }
}

/// `SELECT count(*)` of a query, on a fresh connection (not one of the provider's).
pub async fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Counters of a [`Recording`] provider.
#[derive(Default)]
pub struct Recorded {
    /// Lock token -> input of the activity it leased.
    tokens: Mutex<HashMap<String, String>>,
    /// Activity input -> failed `ack_work_item` calls for it.
    failed_activity_acks: Mutex<HashMap<String, u32>>,
    /// Activity input -> times it was handed to a worker (each delivery is one lease).
    deliveries: Mutex<HashMap<String, u32>>,
    pub work_ack_permanent_errors: AtomicU64,
    pub orchestration_fetch_errors: AtomicU64,
    pub orchestration_ack_errors: AtomicU64,
    pub orchestration_ack_permanent_errors: AtomicU64,
    pub work_fetch_errors: AtomicU64,
    pub work_ack_errors: AtomicU64,
    pub work_redeliveries: AtomicU64,
    pub abandon_errors: AtomicU64,
    pub renew_errors: AtomicU64,
    pub other_errors: AtomicU64,
}

impl Recorded {
    /// Failed activity acks per activity input.
    pub fn failed_activity_acks(&self) -> HashMap<String, u32> {
        self.failed_activity_acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Deliveries (leases) per activity input.
    pub fn deliveries(&self) -> HashMap<String, u32> {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "orchestration fetch errors {}, orchestration ack errors {} ({} permanent), work fetch errors {}, \
             work ack errors {} ({} permanent), work redeliveries {}, abandon errors {}, renew errors {}, \
             other errors {}",
            g(&self.orchestration_fetch_errors),
            g(&self.orchestration_ack_errors),
            g(&self.orchestration_ack_permanent_errors),
            g(&self.work_fetch_errors),
            g(&self.work_ack_errors),
            g(&self.work_ack_permanent_errors),
            g(&self.work_redeliveries),
            g(&self.abandon_errors),
            g(&self.renew_errors),
            g(&self.other_errors),
        )
    }
}

/// A `Provider` that delegates to a [`PostgresProvider`] and records failures, so a
/// test can tell which activity executions duroxide was entitled to repeat (an activity
/// whose `ack_work_item` failed is abandoned and runs again: at-least-once).
pub struct Recording {
    pub inner: Arc<PostgresProvider>,
    pub recorded: Arc<Recorded>,
}

impl Recording {
    pub fn new(inner: Arc<PostgresProvider>) -> Self {
        Self {
            inner,
            recorded: Arc::default(),
        }
    }
}

fn note<T>(r: &Result<T, ProviderError>, counter: &AtomicU64) {
    if r.is_err() {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl Provider for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn version(&self) -> &str {
        self.inner.version()
    }

    async fn fetch_orchestration_item(
        &self,
        lock_timeout: Duration,
        poll_timeout: Duration,
        filter: Option<&DispatcherCapabilityFilter>,
    ) -> Result<Option<(OrchestrationItem, String, u32)>, ProviderError> {
        let r = self
            .inner
            .fetch_orchestration_item(lock_timeout, poll_timeout, filter)
            .await;
        note(&r, &self.recorded.orchestration_fetch_errors);
        r
    }

    async fn ack_orchestration_item(
        &self,
        lock_token: &str,
        execution_id: u64,
        history_delta: Vec<Event>,
        worker_items: Vec<WorkItem>,
        orchestrator_items: Vec<WorkItem>,
        metadata: ExecutionMetadata,
        cancelled_activities: Vec<ScheduledActivityIdentifier>,
    ) -> Result<(), ProviderError> {
        let r = self
            .inner
            .ack_orchestration_item(
                lock_token,
                execution_id,
                history_delta,
                worker_items,
                orchestrator_items,
                metadata,
                cancelled_activities,
            )
            .await;
        note(&r, &self.recorded.orchestration_ack_errors);
        if matches!(&r, Err(e) if !e.is_retryable()) {
            self.recorded
                .orchestration_ack_permanent_errors
                .fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "permanent orchestration ack error: {}",
                r.as_ref().unwrap_err()
            );
        }
        r
    }

    async fn abandon_orchestration_item(
        &self,
        lock_token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        let r = self
            .inner
            .abandon_orchestration_item(lock_token, delay, ignore_attempt)
            .await;
        note(&r, &self.recorded.abandon_errors);
        r
    }

    async fn read(&self, instance: &str) -> Result<Vec<Event>, ProviderError> {
        let r = self.inner.read(instance).await;
        note(&r, &self.recorded.other_errors);
        r
    }

    async fn read_with_execution(
        &self,
        instance: &str,
        execution_id: u64,
    ) -> Result<Vec<Event>, ProviderError> {
        let r = self.inner.read_with_execution(instance, execution_id).await;
        note(&r, &self.recorded.other_errors);
        r
    }

    async fn append_with_execution(
        &self,
        instance: &str,
        execution_id: u64,
        new_events: Vec<Event>,
    ) -> Result<(), ProviderError> {
        self.inner
            .append_with_execution(instance, execution_id, new_events)
            .await
    }

    async fn enqueue_for_worker(&self, item: WorkItem) -> Result<(), ProviderError> {
        let r = self.inner.enqueue_for_worker(item).await;
        note(&r, &self.recorded.other_errors);
        r
    }

    async fn fetch_work_item(
        &self,
        lock_timeout: Duration,
        poll_timeout: Duration,
        session: Option<&SessionFetchConfig>,
        tag_filter: &TagFilter,
    ) -> Result<Option<(WorkItem, String, u32)>, ProviderError> {
        let r = self
            .inner
            .fetch_work_item(lock_timeout, poll_timeout, session, tag_filter)
            .await;
        note(&r, &self.recorded.work_fetch_errors);
        if let Ok(Some((WorkItem::ActivityExecute { input, .. }, token, attempts))) = &r {
            if *attempts > 1 {
                self.recorded
                    .work_redeliveries
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.recorded
                .tokens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(token.clone(), input.clone());
            *self
                .recorded
                .deliveries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(input.clone())
                .or_insert(0) += 1;
        }
        r
    }

    async fn ack_work_item(
        &self,
        token: &str,
        completion: Option<WorkItem>,
    ) -> Result<(), ProviderError> {
        let r = self.inner.ack_work_item(token, completion).await;
        if let Err(e) = &r {
            if !e.is_retryable() {
                self.recorded
                    .work_ack_permanent_errors
                    .fetch_add(1, Ordering::Relaxed);
                eprintln!("permanent work item ack error: {e}");
            }
            self.recorded
                .work_ack_errors
                .fetch_add(1, Ordering::Relaxed);
            let input = self
                .recorded
                .tokens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(token)
                .cloned();
            if let Some(input) = input {
                *self
                    .recorded
                    .failed_activity_acks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(input)
                    .or_insert(0) += 1;
            }
        }
        r
    }

    async fn renew_work_item_lock(
        &self,
        token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        let r = self.inner.renew_work_item_lock(token, extend_for).await;
        note(&r, &self.recorded.renew_errors);
        r
    }

    async fn renew_session_lock(
        &self,
        owner_ids: &[&str],
        extend_for: Duration,
        idle_timeout: Duration,
    ) -> Result<usize, ProviderError> {
        let r = self
            .inner
            .renew_session_lock(owner_ids, extend_for, idle_timeout)
            .await;
        note(&r, &self.recorded.renew_errors);
        r
    }

    async fn cleanup_orphaned_sessions(
        &self,
        idle_timeout: Duration,
    ) -> Result<usize, ProviderError> {
        let r = self.inner.cleanup_orphaned_sessions(idle_timeout).await;
        note(&r, &self.recorded.other_errors);
        r
    }

    async fn abandon_work_item(
        &self,
        token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        let r = self
            .inner
            .abandon_work_item(token, delay, ignore_attempt)
            .await;
        note(&r, &self.recorded.abandon_errors);
        r
    }

    async fn renew_orchestration_item_lock(
        &self,
        token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        let r = self
            .inner
            .renew_orchestration_item_lock(token, extend_for)
            .await;
        note(&r, &self.recorded.renew_errors);
        r
    }

    async fn enqueue_for_orchestrator(
        &self,
        item: WorkItem,
        delay: Option<Duration>,
    ) -> Result<(), ProviderError> {
        let r = self.inner.enqueue_for_orchestrator(item, delay).await;
        note(&r, &self.recorded.other_errors);
        r
    }

    fn as_management_capability(&self) -> Option<&dyn ProviderAdmin> {
        self.inner.as_management_capability()
    }

    async fn get_custom_status(
        &self,
        instance: &str,
        last_seen_version: u64,
    ) -> Result<Option<(Option<String>, u64)>, ProviderError> {
        self.inner
            .get_custom_status(instance, last_seen_version)
            .await
    }

    async fn get_kv_value(
        &self,
        instance: &str,
        key: &str,
    ) -> Result<Option<String>, ProviderError> {
        self.inner.get_kv_value(instance, key).await
    }

    async fn get_kv_all_values(
        &self,
        instance: &str,
    ) -> Result<HashMap<String, String>, ProviderError> {
        self.inner.get_kv_all_values(instance).await
    }

    async fn get_instance_stats(
        &self,
        instance: &str,
    ) -> Result<Option<SystemStats>, ProviderError> {
        self.inner.get_instance_stats(instance).await
    }
}
