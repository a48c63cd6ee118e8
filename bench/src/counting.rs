//! A `Provider` that delegates every call to another one and counts the calls, so the
//! provider-bound throughput scenario can report provider calls per orchestration for
//! every provider alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duroxide::providers::{
    DispatcherCapabilityFilter, ExecutionMetadata, OrchestrationItem, Provider, ProviderAdmin,
    ProviderError, ScheduledActivityIdentifier, SessionFetchConfig, TagFilter, WorkItem,
};
use duroxide::{Event, SystemStats};

pub struct Counting {
    inner: Arc<dyn Provider>,
    pub calls: Arc<AtomicU64>,
    /// Calls per method; fetches split by outcome (`fetch_orchestration_item:empty`).
    pub by_method: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    /// Wall time per method (calls, total µs) as the runtime sees it: round trips,
    /// server time, waits for a pooled connection, and for fetches the long-poll wait.
    pub wall: Arc<Mutex<BTreeMap<&'static str, (u64, u64)>>>,
}

impl Counting {
    pub fn new(inner: Arc<dyn Provider>) -> Self {
        Self {
            inner,
            calls: Arc::default(),
            by_method: Arc::default(),
            wall: Arc::default(),
        }
    }

    async fn timed<T>(&self, method: &'static str, f: impl std::future::Future<Output = T>) -> T {
        let start = std::time::Instant::now();
        let r = f.await;
        let us = start.elapsed().as_micros() as u64;
        let mut wall = self
            .wall
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = wall.entry(method).or_default();
        e.0 += 1;
        e.1 += us;
        r
    }

    fn count(&self, method: &'static str) -> &dyn Provider {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.note(method);
        self.inner.as_ref()
    }

    fn note(&self, method: &'static str) {
        *self
            .by_method
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(method)
            .or_default() += 1;
    }

    /// Counts a fetch that returned nothing.
    fn note_empty<T>(&self, method: &'static str, r: &Result<Option<T>, ProviderError>) {
        if matches!(r, Ok(None)) {
            self.note(method);
        }
    }
}

#[async_trait::async_trait]
impl Provider for Counting {
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
            .timed(
                "fetch_orchestration_item",
                self.count("fetch_orchestration_item")
                    .fetch_orchestration_item(lock_timeout, poll_timeout, filter),
            )
            .await;
        self.note_empty("fetch_orchestration_item:empty", &r);
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
        self.timed(
            "ack_orchestration_item",
            self.count("ack_orchestration_item").ack_orchestration_item(
                lock_token,
                execution_id,
                history_delta,
                worker_items,
                orchestrator_items,
                metadata,
                cancelled_activities,
            ),
        )
        .await
    }

    async fn abandon_orchestration_item(
        &self,
        lock_token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        self.count("abandon_orchestration_item")
            .abandon_orchestration_item(lock_token, delay, ignore_attempt)
            .await
    }

    async fn read(&self, instance: &str) -> Result<Vec<Event>, ProviderError> {
        self.timed("read", self.count("read").read(instance)).await
    }

    async fn read_with_execution(
        &self,
        instance: &str,
        execution_id: u64,
    ) -> Result<Vec<Event>, ProviderError> {
        self.count("read_with_execution")
            .read_with_execution(instance, execution_id)
            .await
    }

    async fn append_with_execution(
        &self,
        instance: &str,
        execution_id: u64,
        new_events: Vec<Event>,
    ) -> Result<(), ProviderError> {
        self.count("append_with_execution")
            .append_with_execution(instance, execution_id, new_events)
            .await
    }

    async fn enqueue_for_worker(&self, item: WorkItem) -> Result<(), ProviderError> {
        self.count("enqueue_for_worker")
            .enqueue_for_worker(item)
            .await
    }

    async fn fetch_work_item(
        &self,
        lock_timeout: Duration,
        poll_timeout: Duration,
        session: Option<&SessionFetchConfig>,
        tag_filter: &TagFilter,
    ) -> Result<Option<(WorkItem, String, u32)>, ProviderError> {
        let r = self
            .timed(
                "fetch_work_item",
                self.count("fetch_work_item").fetch_work_item(
                    lock_timeout,
                    poll_timeout,
                    session,
                    tag_filter,
                ),
            )
            .await;
        self.note_empty("fetch_work_item:empty", &r);
        r
    }

    async fn ack_work_item(
        &self,
        token: &str,
        completion: Option<WorkItem>,
    ) -> Result<(), ProviderError> {
        self.timed(
            "ack_work_item",
            self.count("ack_work_item").ack_work_item(token, completion),
        )
        .await
    }

    async fn renew_work_item_lock(
        &self,
        token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        self.count("renew_work_item_lock")
            .renew_work_item_lock(token, extend_for)
            .await
    }

    async fn renew_session_lock(
        &self,
        owner_ids: &[&str],
        extend_for: Duration,
        idle_timeout: Duration,
    ) -> Result<usize, ProviderError> {
        self.count("renew_session_lock")
            .renew_session_lock(owner_ids, extend_for, idle_timeout)
            .await
    }

    async fn cleanup_orphaned_sessions(
        &self,
        idle_timeout: Duration,
    ) -> Result<usize, ProviderError> {
        self.count("cleanup_orphaned_sessions")
            .cleanup_orphaned_sessions(idle_timeout)
            .await
    }

    async fn abandon_work_item(
        &self,
        token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        self.count("abandon_work_item")
            .abandon_work_item(token, delay, ignore_attempt)
            .await
    }

    async fn renew_orchestration_item_lock(
        &self,
        token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        self.count("renew_orchestration_item_lock")
            .renew_orchestration_item_lock(token, extend_for)
            .await
    }

    async fn enqueue_for_orchestrator(
        &self,
        item: WorkItem,
        delay: Option<Duration>,
    ) -> Result<(), ProviderError> {
        self.timed(
            "enqueue_for_orchestrator",
            self.count("enqueue_for_orchestrator")
                .enqueue_for_orchestrator(item, delay),
        )
        .await
    }

    fn as_management_capability(&self) -> Option<&dyn ProviderAdmin> {
        self.inner.as_management_capability()
    }

    async fn get_custom_status(
        &self,
        instance: &str,
        last_seen_version: u64,
    ) -> Result<Option<(Option<String>, u64)>, ProviderError> {
        self.timed(
            "get_custom_status",
            self.count("get_custom_status")
                .get_custom_status(instance, last_seen_version),
        )
        .await
    }

    async fn get_kv_value(
        &self,
        instance: &str,
        key: &str,
    ) -> Result<Option<String>, ProviderError> {
        self.count("get_kv_value").get_kv_value(instance, key).await
    }

    async fn get_kv_all_values(
        &self,
        instance: &str,
    ) -> Result<HashMap<String, String>, ProviderError> {
        self.count("get_kv_all_values")
            .get_kv_all_values(instance)
            .await
    }

    async fn get_instance_stats(
        &self,
        instance: &str,
    ) -> Result<Option<SystemStats>, ProviderError> {
        self.count("get_instance_stats")
            .get_instance_stats(instance)
            .await
    }
}
