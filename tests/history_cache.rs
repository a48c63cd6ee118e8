//! The history cache (`src/history_cache.rs`): a turn of an execution this provider ran
//! before reads only the events it has not seen, on both fetch paths, and never serves a
//! stale or partial history; `read(instance)` uses it the same way.
//!
//! Turns are driven through the `Provider` API (fetch, then an ack that appends events
//! and sends the instance a message so that it runs again), so every history is known
//! exactly and compared event by event. What a fetch read is measured in bytes from the
//! server, counted by the testkit proxy: events carry ~1 KB payloads, so a full read of
//! 40 events is over 40 KB while the other reads of a turn are a few hundred bytes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{database_url, new_provider_with, start_item, test_options};
use duroxide::providers::{
    ExecutionMetadata, KvEntry, OrchestrationItem, Provider, ProviderAdmin, WorkItem,
};
use duroxide::{Event, EventKind};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};
use duroxide_pg_hybrid_testkit::proxy::{Proxy, ProxySnapshot};

const LOCK: Duration = Duration::from_secs(30);
const NOW: Duration = Duration::ZERO;
/// Fixed event timestamp, so that two incarnations can write byte-identical rows.
const TS: u64 = 1_700_000_000_000;
/// Bytes a turn may read besides its new events (claim, messages, metadata, KV, and a
/// statement's description the first time a pooled connection runs it).
const TURN_OVERHEAD: u64 = 6_000;
/// Payload bytes of one event: a lower bound of its size on the wire.
const EVENT_BYTES: u64 = 1_000;
/// An upper bound of one event's size on the wire (payload plus JSON and framing).
const EVENT_WIRE_MAX: u64 = 1_500;

fn payload(tag: &str) -> String {
    format!("{tag}:{}", "x".repeat(EVENT_BYTES as usize))
}

fn event(instance: &str, execution: u64, id: u64, data: String) -> Event {
    let kind = if id == 1 {
        EventKind::OrchestrationStarted {
            name: "O".into(),
            version: "1.0.0".into(),
            input: "in".into(),
            parent_instance: None,
            parent_id: None,
            parent_execution_id: None,
            carry_forward_events: None,
            initial_custom_status: None,
        }
    } else {
        EventKind::ExternalEvent {
            name: "e".into(),
            data,
        }
    };
    let mut e = Event::with_event_id(id, instance, execution, None, kind);
    e.timestamp_ms = TS;
    e
}

/// Events `from..=to` of `instance`'s execution, payloads tagged `tag`.
fn events(instance: &str, execution: u64, from: u64, to: u64, tag: &str) -> Vec<Event> {
    (from..=to)
        .map(|id| event(instance, execution, id, payload(&format!("{tag}{id}"))))
        .collect()
}

fn poke(instance: &str) -> WorkItem {
    WorkItem::ExternalRaised {
        instance: instance.to_string(),
        name: "poke".to_string(),
        data: "x".to_string(),
    }
}

fn running() -> ExecutionMetadata {
    ExecutionMetadata {
        orchestration_name: Some("O".into()),
        orchestration_version: Some("1.0.0".into()),
        ..Default::default()
    }
}

/// A second provider process on the same schema (direct connection).
async fn another_process(schema: &str, path: FetchPath) -> Arc<PostgresProvider> {
    Arc::new(
        common::connect_waiting(&database_url(), test_options(schema, path))
            .await
            .unwrap(),
    )
}

/// Sends `instance` a message and fetches its turn (it must be the one claimed: tests
/// keep one instance runnable at a time); returns the item, the lock token, and the bytes
/// the fetch read from the server when `proxy` is given.
async fn fetch(
    p: &PostgresProvider,
    proxy: Option<&Proxy>,
    instance: &str,
) -> (OrchestrationItem, String, u64) {
    let (item, token, traffic) = fetch_measured(p, proxy, instance).await;
    (item, token, traffic.bytes_s2c)
}

/// [`fetch`], returning what crossed the proxy during the fetch (zero without one).
async fn fetch_measured(
    p: &PostgresProvider,
    proxy: Option<&Proxy>,
    instance: &str,
) -> (OrchestrationItem, String, ProxySnapshot) {
    p.enqueue_for_orchestrator(poke(instance), None)
        .await
        .unwrap();
    let before = proxy.map(Proxy::snapshot);
    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("expected a turn of {instance}"));
    let traffic = match (proxy, before) {
        (Some(px), Some(b)) => px.snapshot().since(&b),
        _ => ProxySnapshot::default(),
    };
    assert_eq!(item.instance, instance);
    assert!(item.history_error.is_none(), "{:?}", item.history_error);
    (item, token, traffic)
}

/// Acks a turn of `execution` appending `new` events.
async fn ack(p: &PostgresProvider, token: &str, execution: u64, new: Vec<Event>) {
    p.ack_orchestration_item(token, execution, new, vec![], vec![], running(), vec![])
        .await
        .unwrap();
}

/// Acks `token`'s turn of execution 1 appending `end`, ending the execution with
/// ContinuedAsNew and sending the instance its ContinueAsNew message.
async fn continue_as_new(p: &PostgresProvider, token: &str, instance: &str, end: Vec<Event>) {
    p.ack_orchestration_item(
        token,
        1,
        end,
        vec![],
        vec![WorkItem::ContinueAsNew {
            instance: instance.into(),
            orchestration: "O".into(),
            input: "again".into(),
            version: Some("1.0.0".into()),
            parent_instance: None,
            parent_id: None,
            parent_execution_id: None,
            carry_forward_events: vec![],
            initial_custom_status: None,
        }],
        ExecutionMetadata {
            status: Some("ContinuedAsNew".into()),
            output: Some("again".into()),
            ..running()
        },
        vec![],
    )
    .await
    .unwrap();
}

/// Acks `token`'s turn of execution 1 appending `first`, then events setting KV key `k` to
/// `value` and completing the execution (ids following on): the value lands in
/// `kv_store`. `metadata` gets status and output.
async fn complete_with_kv(
    p: &PostgresProvider,
    token: &str,
    instance: &str,
    first: Vec<Event>,
    value: &str,
    metadata: ExecutionMetadata,
) {
    let next = first.last().map_or(1, |e| e.event_id() + 1);
    let mut appended = first;
    appended.push(Event::with_event_id(
        next,
        instance,
        1,
        None,
        EventKind::KeyValueSet {
            key: "k".into(),
            value: value.into(),
            last_updated_at_ms: TS,
        },
    ));
    appended.push(Event::with_event_id(
        next + 1,
        instance,
        1,
        None,
        EventKind::OrchestrationCompleted {
            output: "done".into(),
        },
    ));
    let metadata = ExecutionMetadata {
        status: Some("Completed".into()),
        output: Some("done".into()),
        ..metadata
    };
    p.ack_orchestration_item(token, 1, appended, vec![], vec![], metadata, vec![])
        .await
        .unwrap();
}

/// Starts `instance` through `p` with events 1..=n of execution 1.
async fn create(p: &PostgresProvider, instance: &str, n: u64, tag: &str) -> Vec<Event> {
    p.enqueue_for_orchestrator(start_item(instance), None)
        .await
        .unwrap();
    let (item, token, _) = fetch(p, None, instance).await;
    assert!(item.history.is_empty());
    let written = events(instance, 1, 1, n, tag);
    ack(p, &token, 1, written.clone()).await;
    written
}

async fn second_turn_reads_only_new_events(path: FetchPath) {
    let (direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    for (instance, len) in [("short", 40u64), ("long", 200)] {
        // Written by another process: this one holds nothing of it.
        let mut expected = create(&direct, instance, len, "a").await;

        // The first turn this process reads: all of it.
        let (item, token, full) = fetch(&p, Some(&proxy), instance).await;
        assert_eq!(item.history, expected);
        assert!(
            full > len * EVENT_BYTES,
            "{path:?} {instance}: full read of {len} events was {full} bytes"
        );
        ack(&p, &token, 1, vec![]).await;

        // The other process appends two events; the next turn here reads those only,
        // whatever the history's length.
        let (_, token, _) = fetch(&direct, None, instance).await;
        let new = events(instance, 1, len + 1, len + 2, "b");
        expected.extend(new.clone());
        ack(&direct, &token, 1, new).await;
        let (item, token, incremental) = fetch(&p, Some(&proxy), instance).await;
        assert_eq!(item.history, expected, "{path:?} {instance}");
        assert!(
            incremental < 2 * EVENT_WIRE_MAX + TURN_OVERHEAD,
            "{path:?} {instance}: a turn after 2 new events read {incremental} bytes (full read: {full})"
        );

        // Events this process's ack appended are held: the next turn reads none back.
        let new = events(instance, 1, len + 3, len + 4, "c");
        expected.extend(new.clone());
        ack(&p, &token, 1, new).await;
        let (item, token, own) = fetch(&p, Some(&proxy), instance).await;
        assert_eq!(item.history, expected, "{path:?} {instance}");
        assert!(
            own < TURN_OVERHEAD,
            "{path:?} {instance}: read back its own 2 events: {own} bytes"
        );
        ack(&p, &token, 1, vec![]).await;

        // Nothing new: nothing read but the turn's other data.
        let (item, _, nothing_new) = fetch(&p, Some(&proxy), instance).await;
        assert_eq!(item.history, expected);
        assert!(nothing_new < TURN_OVERHEAD, "{path:?}: {nothing_new} bytes");
    }
}

#[tokio::test]
async fn second_turn_reads_only_new_events_hybrid() {
    second_turn_reads_only_new_events(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn second_turn_reads_only_new_events_procedure() {
    second_turn_reads_only_new_events(FetchPath::Procedure).await;
}

/// Another process runs turns of the instance between two turns of this one: the events
/// it appended are read (and only those), and the history is exactly the stored one.
async fn turns_run_elsewhere_are_read(path: FetchPath) {
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p1) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    // The other process runs the other path: the cache has to work in a mixed fleet.
    let other_path = match path {
        FetchPath::Hybrid => FetchPath::Procedure,
        FetchPath::Procedure => FetchPath::Hybrid,
    };
    let p2 = another_process(guard.schema(), other_path).await;
    let inst = "shared";
    let mut expected = create(&p1, inst, 40, "a").await;
    let (item, token, _) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(item.history, expected);
    let new = events(inst, 1, 41, 42, "p1-");
    expected.extend(new.clone());
    ack(&p1, &token, 1, new).await;

    // Two turns in the other process.
    for (from, to) in [(43, 45), (46, 46)] {
        let (item, token, _) = fetch(&p2, None, inst).await;
        assert_eq!(item.history, expected);
        let new = events(inst, 1, from, to, "p2-");
        expected.extend(new.clone());
        ack(&p2, &token, 1, new).await;
    }

    let (item, _, bytes) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(item.history.len(), 46);
    assert_eq!(
        item.history, expected,
        "{path:?}: events of the other process's turns"
    );
    assert!(
        bytes < 4 * EVENT_WIRE_MAX + TURN_OVERHEAD,
        "{path:?}: read {bytes} bytes for 4 new events"
    );
}

#[tokio::test]
async fn turns_run_elsewhere_are_read_hybrid() {
    turns_run_elsewhere_are_read(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn turns_run_elsewhere_are_read_procedure() {
    turns_run_elsewhere_are_read(FetchPath::Procedure).await;
}

/// The instance is deleted and re-created under the same id by another process, and the
/// new incarnation's row at the cached position is byte-for-byte the old one (same id,
/// same JSON) while an earlier event differs: only the row's creation time tells them
/// apart, and the turn must still read the new incarnation in full.
async fn recreated_instance_is_read_in_full(path: FetchPath) {
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p1) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "phoenix";
    let old = create(&p1, inst, 40, "a").await;
    let (item, token, _) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(item.history, old);
    ack(&p1, &token, 1, vec![]).await; // p1 now holds events 1..=40

    p2.delete_instance(inst, true).await.unwrap();
    // Creation times are the database clock in milliseconds: make sure it moved on.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut new = old.clone();
    new[4] = event(inst, 1, 5, payload("re-created"));
    new.extend(events(inst, 1, 41, 44, "n"));
    p2.enqueue_for_orchestrator(start_item(inst), None)
        .await
        .unwrap();
    let (item, token, _) = fetch(&p2, None, inst).await;
    assert!(item.history.is_empty());
    ack(&p2, &token, 1, new.clone()).await;

    let (item, _, bytes) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(
        item.history[4], new[4],
        "{path:?}: stale event served from the cache"
    );
    assert_eq!(item.history, new, "{path:?}");
    assert!(
        bytes > 44 * EVENT_BYTES,
        "{path:?}: not a full read ({bytes} bytes)"
    );
}

#[tokio::test]
async fn recreated_instance_is_read_in_full_hybrid() {
    recreated_instance_is_read_in_full(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn recreated_instance_is_read_in_full_procedure() {
    recreated_instance_is_read_in_full(FetchPath::Procedure).await;
}

/// Re-created with a shorter history than the one cached: the cached position no longer
/// exists, and the short new history is what the turn gets.
async fn recreated_shorter_instance(path: FetchPath) {
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p1) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "shrunk";
    let old = create(&p1, inst, 40, "a").await;
    let (item, token, _) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(item.history, old);
    ack(&p1, &token, 1, vec![]).await;

    p2.delete_instance(inst, true).await.unwrap();
    let new = create(&p2, inst, 3, "short").await;
    let (item, _, _) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(item.history, new, "{path:?}");
}

#[tokio::test]
async fn recreated_shorter_instance_hybrid() {
    recreated_shorter_instance(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn recreated_shorter_instance_procedure() {
    recreated_shorter_instance(FetchPath::Procedure).await;
}

/// Continue-as-new: the turn that processes it still sees execution 1 (from the cache),
/// and execution 2 gets its own entry: its turns read its events only, incrementally
/// after its first read.
async fn continue_as_new_starts_its_own_entry(path: FetchPath) {
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let inst = "looping";
    let mut first = create(&p, inst, 40, "a").await;
    let (item, token, _) = fetch(&p, Some(&proxy), inst).await;
    assert_eq!(item.history, first);
    // The turn that continues as new: execution 1 ends, a ContinueAsNew message follows.
    let end = events(inst, 1, 41, 41, "end");
    first.extend(end.clone());
    continue_as_new(&p, &token, inst, end).await;

    // The ContinueAsNew turn is claimed on execution 1 and sees its history (1 new event).
    let (item, token, bytes) = fetch(&p, Some(&proxy), inst).await;
    assert_eq!(item.execution_id, 1);
    assert_eq!(item.history, first);
    assert!(
        bytes < EVENT_WIRE_MAX + TURN_OVERHEAD,
        "{path:?}: {bytes} bytes"
    );
    let mut second = events(inst, 2, 1, 40, "second");
    ack(&p, &token, 2, second.clone()).await;

    // Execution 2: read in full once (the entry was execution 1's), then incrementally.
    let (item, token, full) = fetch(&p, Some(&proxy), inst).await;
    assert_eq!(item.execution_id, 2);
    assert_eq!(item.history, second, "{path:?}: execution 2's history only");
    assert!(full > 40 * EVENT_BYTES, "{path:?}: {full} bytes");
    let new = events(inst, 2, 41, 41, "more");
    second.extend(new.clone());
    ack(&p, &token, 2, new).await;
    let (item, _, bytes) = fetch(&p, Some(&proxy), inst).await;
    assert_eq!(item.execution_id, 2);
    assert_eq!(item.history, second);
    assert!(
        bytes < EVENT_WIRE_MAX + TURN_OVERHEAD,
        "{path:?}: {bytes} bytes"
    );
}

#[tokio::test]
async fn continue_as_new_starts_its_own_entry_hybrid() {
    continue_as_new_starts_its_own_entry(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn continue_as_new_starts_its_own_entry_procedure() {
    continue_as_new_starts_its_own_entry(FetchPath::Procedure).await;
}

/// A turn item's fields that do not depend on who fetched it or how often.
fn turn_view(item: &OrchestrationItem) -> (String, String, u64, Vec<Event>, Vec<(String, String)>) {
    let mut kv: Vec<(String, String)> = item
        .kv_snapshot
        .iter()
        .map(|(k, e): (&String, &KvEntry)| {
            (k.clone(), format!("{}@{}", e.value, e.last_updated_at_ms))
        })
        .collect();
    kv.sort();
    (
        item.orchestration_name.clone(),
        item.version.clone(),
        item.execution_id,
        item.history.clone(),
        kv,
    )
}

/// The same turn as a process without a history cache sees it: fetched there, then
/// given back (abandoned at once) for the process under test.
async fn fresh_view(
    fresh: &PostgresProvider,
    instance: &str,
) -> (String, String, u64, Vec<Event>, Vec<(String, String)>) {
    let (item, token, _) = fetch(fresh, None, instance).await;
    fresh
        .abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();
    turn_view(&item)
}

/// Hybrid path: the claim returns the batch and the instance's name, so a turn reads
/// its history and KV snapshot, and a turn of an execution this process ran before reads
/// only its new events (the KV snapshot is the previous turn's). Once another process
/// ends the execution with KV values (`kv_store` changes only then), the next turn reads
/// KV again, and the item is what a process without a cache gets.
#[tokio::test]
async fn hybrid_turn_with_entry_reads_new_events_only() {
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let fresh = Arc::new(
        common::connect_waiting(&database_url(), {
            let mut o = test_options(guard.schema(), FetchPath::Procedure);
            o.history_cache_events = 0;
            o
        })
        .await
        .unwrap(),
    );
    let inst = "kv-carrier";
    let mut expected = create(&fresh, inst, 3, "a").await;

    // No entry yet: the claim, then history and KV.
    let (item, token, full) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(item.history, expected);
    assert_eq!(full.statements, 3, "claim + history + KV: {full:?}");
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();
    let (item, token, _) = fetch(&p, Some(&proxy), inst).await;
    let new = events(inst, 1, 4, 4, "b");
    expected.extend(new.clone());
    ack(&p, &token, 1, new).await;
    assert_eq!(item.history.len(), 3);

    // With the entry: the claim, then the new events.
    let before = fresh_view(&fresh, inst).await;
    let (item, token, cached) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(cached.statements, 2, "claim + history: {cached:?}");
    assert_eq!(
        turn_view(&item),
        before,
        "cached turn differs from a fresh read"
    );
    assert_eq!(item.orchestration_name, "O");
    assert_eq!(item.version, "1.0.0");
    assert!(item.kv_snapshot.is_empty());
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();

    // Another process ends execution 1 with a KV value (into kv_store).
    let (_, token, _) = fetch(&fresh, None, inst).await;
    let before_end = vec![event(inst, 1, 5, payload("b"))];
    complete_with_kv(&fresh, &token, inst, before_end, "v1", running()).await;

    // A message after the end: the entry's snapshot is no longer kv_store's.
    let before = fresh_view(&fresh, inst).await;
    assert_eq!(before.4, vec![("k".to_string(), format!("v1@{TS}"))]);
    let (item, token, after_end) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(turn_view(&item), before, "stale KV snapshot served");
    assert_eq!(
        after_end.statements, 3,
        "claim + history, then KV: {after_end:?}"
    );
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();

    // That turn's snapshot is kept with the entry for the next one.
    let before = fresh_view(&fresh, inst).await;
    let (item, _, again) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(turn_view(&item), before);
    assert_eq!(again.statements, 2, "{again:?}");
}

/// Hybrid path: an instance deleted and re-created under the same id, whose new
/// incarnation ended with a KV value, gets its KV snapshot and name read again (the
/// entry's guard no longer matches).
#[tokio::test]
async fn hybrid_recreated_instance_reads_its_kv_and_name() {
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "kv-phoenix";
    create(&p, inst, 3, "a").await;
    let (_, token, _) = fetch(&p, Some(&proxy), inst).await;
    ack(&p, &token, 1, vec![]).await; // p holds events 1..=3 with an empty KV snapshot

    p2.delete_instance(inst, true).await.unwrap();
    p2.enqueue_for_orchestrator(start_item(inst), None)
        .await
        .unwrap();
    let (_, token, _) = fetch(&p2, None, inst).await;
    let mut started = event(inst, 1, 1, String::new());
    if let EventKind::OrchestrationStarted { name, version, .. } = &mut started.kind {
        *name = "O2".into();
        *version = "2.0.0".into();
    }
    complete_with_kv(
        &p2,
        &token,
        inst,
        vec![started],
        "re",
        ExecutionMetadata {
            orchestration_name: Some("O2".into()),
            orchestration_version: Some("2.0.0".into()),
            ..Default::default()
        },
    )
    .await;

    let (item, _, traffic) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(item.orchestration_name, "O2");
    assert_eq!(item.version, "2.0.0");
    assert_eq!(
        item.kv_snapshot.get("k").map(|e| e.value.as_str()),
        Some("re"),
        "stale KV snapshot of the old incarnation"
    );
    assert_eq!(traffic.statements, 3, "claim + history + KV: {traffic:?}");
}

/// An ack that hands its activity to a waiting worker fetch of its process returns the
/// guard of the last event it appended, so the cache holds the history including what
/// the ack wrote: the next turn reads none of it again (hybrid: claim, batch and history
/// statements only), even though the first turn's history was empty. A turn of another
/// process in between is read as usual.
async fn turn_after_a_handover_ack_rereads_nothing(path: FetchPath) {
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "handed-writer";
    p.enqueue_for_orchestrator(start_item(inst), None)
        .await
        .unwrap();
    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .unwrap();
    assert!(item.history.is_empty());
    let w = p.clone();
    let waiter = tokio::spawn(async move {
        w.fetch_work_item(
            LOCK,
            Duration::from_secs(10),
            None,
            &duroxide::providers::TagFilter::DefaultOnly,
        )
        .await
    });
    // Let the worker fetch do its empty claim and start waiting.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut expected = events(inst, 1, 1, 40, "a");
    p.ack_orchestration_item(
        &token,
        1,
        expected.clone(),
        vec![common::activity_item(inst, 2)],
        vec![],
        running(),
        vec![],
    )
    .await
    .unwrap();
    let (_, wtoken, _) = waiter.await.unwrap().unwrap().expect("handed over");
    p.ack_work_item(&wtoken, Some(common::completion(inst, 2)))
        .await
        .unwrap();

    let (item, token, traffic) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(item.history, expected, "{path:?}");
    assert!(
        traffic.bytes_s2c < TURN_OVERHEAD,
        "{path:?}: the turn read back what its process's ack wrote: {traffic:?}"
    );
    if path == FetchPath::Hybrid {
        assert_eq!(traffic.statements, 2, "claim + history: {traffic:?}");
    }
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();

    // Another process appends two events; the next turn here reads those only.
    let (_, token, _) = fetch(&p2, None, inst).await;
    let new = events(inst, 1, 41, 42, "p2-");
    expected.extend(new.clone());
    ack(&p2, &token, 1, new).await;
    let (item, _, traffic) = fetch_measured(&p, Some(&proxy), inst).await;
    assert_eq!(item.history, expected, "{path:?}");
    assert!(
        traffic.bytes_s2c < 2 * EVENT_WIRE_MAX + TURN_OVERHEAD,
        "{path:?}: {traffic:?}"
    );
}

#[tokio::test]
async fn turn_after_a_handover_ack_rereads_nothing_hybrid() {
    turn_after_a_handover_ack_rereads_nothing(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn turn_after_a_handover_ack_rereads_nothing_procedure() {
    turn_after_a_handover_ack_rereads_nothing(FetchPath::Procedure).await;
}

/// The cache holds at most `history_cache_events` events: caching a second 60-event
/// history evicts the first (least recently used), whose next turn reads in full, while
/// the second's reads only what is new. `0` turns the cache off.
async fn eviction_bound(path: FetchPath) {
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p) =
        common::proxied_provider(guard.schema(), path, |o| o.history_cache_events = 100).await;
    let a = create(&p, "a", 60, "a").await;
    let b = create(&p, "b", 60, "b").await;
    for (inst, hist) in [("a", &a), ("b", &b)] {
        let (item, token, _) = fetch(&p, Some(&proxy), inst).await;
        assert_eq!(&item.history, hist);
        ack(&p, &token, 1, vec![]).await;
    }
    // "a" was evicted when "b" (60 + 60 > 100) was stored.
    let (item, token, a_bytes) = fetch(&p, Some(&proxy), "a").await;
    assert_eq!(item.history, a);
    assert!(
        a_bytes > 60 * EVENT_BYTES,
        "{path:?}: a was not evicted ({a_bytes} bytes)"
    );
    ack(&p, &token, 1, vec![]).await;
    // Storing "a" again evicted "b".
    let (item, _, b_bytes) = fetch(&p, Some(&proxy), "b").await;
    assert_eq!(item.history, b);
    assert!(
        b_bytes > 60 * EVENT_BYTES,
        "{path:?}: b was not evicted ({b_bytes} bytes)"
    );

    let (proxy0, p0) =
        common::proxied_provider(guard.schema(), path, |o| o.history_cache_events = 0).await;
    let c = create(&p0, "c", 40, "c").await;
    for _ in 0..2 {
        let (item, token, bytes) = fetch(&p0, Some(&proxy0), "c").await;
        assert_eq!(item.history, c);
        assert!(
            bytes > 40 * EVENT_BYTES,
            "{path:?}: cache off, yet {bytes} bytes"
        );
        ack(&p0, &token, 1, vec![]).await;
    }
}

#[tokio::test]
async fn eviction_bound_hybrid() {
    eviction_bound(FetchPath::Hybrid).await;
}

#[tokio::test]
async fn eviction_bound_procedure() {
    eviction_bound(FetchPath::Procedure).await;
}

// `read(instance)`: duroxide reads the whole history on every status poll and, in its
// worker, before every activity. With a long history in the cache (this process ran the
// instance, or read it before), only the events after the cached ones are sent; the
// answer is always the stored history, compared here with a whole read by a process that
// holds nothing.

/// Bytes a `read` may take besides its new events (the result row, and a statement's
/// description the first time a pooled connection runs it).
const READ_OVERHEAD: u64 = 2_000;

/// `read` through `p`, and the bytes it took from the server.
async fn read(p: &PostgresProvider, proxy: &Proxy, instance: &str) -> (Vec<Event>, u64) {
    let before = proxy.snapshot();
    let history = p.read(instance).await.unwrap();
    (history, proxy.snapshot().since(&before).bytes_s2c)
}

/// A history of 40 events that `p` ran a turn of (so its cache holds all 40).
async fn cached(p: &PostgresProvider, proxy: &Proxy, instance: &str) -> Vec<Event> {
    let written = create(p, instance, 40, "a").await;
    let (item, token, _) = fetch(p, Some(proxy), instance).await;
    assert_eq!(item.history, written);
    ack(p, &token, 1, vec![]).await;
    written
}

#[tokio::test]
async fn reads_of_a_cached_history_take_only_new_events() {
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p1) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "polled";
    let mut expected = cached(&p1, &proxy, inst).await;

    let (history, bytes) = read(&p1, &proxy, inst).await;
    assert_eq!(history, expected);
    assert!(bytes < READ_OVERHEAD, "nothing new, yet {bytes} bytes");

    // Turns of another process append 3 events: they are read, and only they.
    let (item, token, _) = fetch(&p2, None, inst).await;
    assert_eq!(item.history, expected);
    let new = events(inst, 1, 41, 43, "p2-");
    expected.extend(new.clone());
    ack(&p2, &token, 1, new).await;
    let (history, bytes) = read(&p1, &proxy, inst).await;
    assert_eq!(history, expected, "events appended elsewhere");
    assert_eq!(history, p2.read(inst).await.unwrap(), "a whole read");
    assert!(
        bytes < 3 * EVENT_WIRE_MAX + READ_OVERHEAD,
        "3 new events took {bytes} bytes"
    );

    // The read brought the entry up to date: the next one takes nothing.
    let (history, bytes) = read(&p1, &proxy, inst).await;
    assert_eq!(history, expected);
    assert!(bytes < READ_OVERHEAD, "{bytes} bytes");
    // ... and so does the next turn of this process.
    let (item, _, bytes) = fetch(&p1, Some(&proxy), inst).await;
    assert_eq!(item.history, expected);
    assert!(bytes < TURN_OVERHEAD, "turn after the read: {bytes} bytes");
}

/// Deleted and re-created under the same id, with the row at the cached position byte
/// for byte the old one (only its creation time differs) and an earlier row changed: the
/// read returns the new incarnation, in full. Deleted for good: it returns what a whole
/// read returns (nothing).
#[tokio::test]
async fn a_read_after_delete_and_recreate_is_whole() {
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p1) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "phoenix";
    let old = cached(&p1, &proxy, inst).await;

    p2.delete_instance(inst, true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut new = old.clone();
    new[4] = event(inst, 1, 5, payload("re-created"));
    new.truncate(40);
    p2.enqueue_for_orchestrator(start_item(inst), None)
        .await
        .unwrap();
    let (_, token, _) = fetch(&p2, None, inst).await;
    ack(&p2, &token, 1, new.clone()).await;

    let (history, bytes) = read(&p1, &proxy, inst).await;
    assert_eq!(history[4], new[4], "stale event served from the cache");
    assert_eq!(history, new);
    assert!(bytes > 40 * EVENT_BYTES, "not a whole read ({bytes} bytes)");

    p2.delete_instance(inst, true).await.unwrap();
    let (history, _) = read(&p1, &proxy, inst).await;
    assert!(history.is_empty(), "deleted, yet {} events", history.len());
    assert_eq!(history, p2.read(inst).await.unwrap());
}

/// The cache holds execution 1; the instance continued as new in another process: the
/// read returns execution 2 (the latest), whole, and later reads of it take only what is
/// new.
#[tokio::test]
async fn a_read_after_continue_as_new_returns_the_new_execution() {
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, p1) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let p2 = another_process(guard.schema(), path).await;
    let inst = "looping";
    cached(&p1, &proxy, inst).await;

    let (_, token, _) = fetch(&p2, None, inst).await;
    continue_as_new(&p2, &token, inst, events(inst, 1, 41, 41, "end")).await;
    let (_, token, _) = p2
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .expect("the ContinueAsNew turn");
    let mut second = events(inst, 2, 1, 35, "second");
    ack(&p2, &token, 2, second.clone()).await;

    let (history, bytes) = read(&p1, &proxy, inst).await;
    assert_eq!(history, second, "execution 2 only");
    assert!(bytes > 35 * EVENT_BYTES, "{bytes} bytes");
    let (_, token, _) = fetch(&p2, None, inst).await;
    let new = events(inst, 2, 36, 36, "more");
    second.extend(new.clone());
    ack(&p2, &token, 2, new).await;
    let (history, bytes) = read(&p1, &proxy, inst).await;
    assert_eq!(history, second);
    assert!(bytes < EVENT_WIRE_MAX + READ_OVERHEAD, "{bytes} bytes");
}

/// A process that only reads the instance (a client polling its status) and never ran a
/// turn of it: its first read of a long history is whole, so is its second (which keeps
/// an entry), and from then on it reads only what is new. A short history is never
/// kept.
#[tokio::test]
async fn a_process_that_only_reads_keeps_an_entry_from_its_second_read() {
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let (proxy, reader) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let runner = another_process(guard.schema(), path).await;
    let inst = "watched";
    let mut expected = create(&runner, inst, 40, "a").await;

    for n in 1..=2 {
        let (history, bytes) = read(&reader, &proxy, inst).await;
        assert_eq!(history, expected);
        assert!(bytes > 40 * EVENT_BYTES, "read {n}: {bytes} bytes");
    }
    let (item, token, _) = fetch(&runner, None, inst).await;
    assert_eq!(item.history, expected);
    let new = events(inst, 1, 41, 41, "n");
    expected.extend(new.clone());
    ack(&runner, &token, 1, new).await;
    let (history, bytes) = read(&reader, &proxy, inst).await;
    assert_eq!(history, expected);
    assert!(bytes < EVENT_WIRE_MAX + READ_OVERHEAD, "{bytes} bytes");

    let short = create(&runner, "short", 3, "s").await;
    for n in 1..=3 {
        let (history, bytes) = read(&reader, &proxy, "short").await;
        assert_eq!(history, short);
        // (Event 1, the start, carries no payload.)
        assert!(bytes > 2 * EVENT_BYTES, "short read {n}: {bytes} bytes");
    }
}

/// A running runtime with hand-over off (so the read duroxide's worker makes before each
/// activity goes to the database): 40 sequential activities with ~1 KB results, then the
/// client's wait. With the cache, each of those reads and each turn takes only what is
/// new: the run takes a fraction of the bytes it takes with the cache off, and both
/// complete with the same output.
#[tokio::test]
async fn a_runtime_reads_a_growing_history_incrementally() {
    use duroxide::runtime::registry::ActivityRegistry;
    use duroxide::runtime::{Runtime, RuntimeOptions};
    use duroxide::{ActivityContext, Client, OrchestrationContext, OrchestrationRegistry};

    const STEPS: usize = 40;
    let path = FetchPath::Hybrid;
    let (_direct, guard) = new_provider_with(path, |_| {}).await;
    let mut taken = Vec::new();
    for cache_events in [50_000, 0] {
        let (proxy, p) = common::proxied_provider(guard.schema(), path, |o| {
            o.history_cache_events = cache_events;
            o.handover = false;
        })
        .await;
        let activities = ActivityRegistry::builder()
            .register("Pad", |_ctx: ActivityContext, i: String| async move {
                Ok(format!("{i}:{}", "x".repeat(EVENT_BYTES as usize)))
            })
            .build();
        let orchestrations = OrchestrationRegistry::builder()
            .register(
                "Chain",
                |ctx: OrchestrationContext, _in: String| async move {
                    let mut last = String::new();
                    for i in 0..STEPS {
                        last = ctx.schedule_activity("Pad", i.to_string()).await?;
                    }
                    Ok(last[..2].to_string())
                },
            )
            .build();
        let runtime = Runtime::start_with_options(
            p.clone(),
            activities,
            orchestrations,
            RuntimeOptions::default(),
        )
        .await;
        let client = Client::new(p.clone());
        let before = proxy.snapshot();
        let inst = format!("chain-{cache_events}");
        client
            .start_orchestration(&inst, "Chain", "")
            .await
            .unwrap();
        let status = client
            .wait_for_orchestration(&inst, Duration::from_secs(60))
            .await
            .unwrap();
        taken.push(proxy.snapshot().since(&before).bytes_s2c);
        runtime.shutdown(None).await;
        match status {
            duroxide::OrchestrationStatus::Completed { output, .. } => assert_eq!(output, "39"),
            other => panic!("cache {cache_events}: {other:?}"),
        }
        assert_eq!(
            p.read(&inst).await.unwrap().len(),
            2 + 2 * STEPS,
            "started, {STEPS} scheduled/completed pairs, completed"
        );
    }
    let (with_cache, without) = (taken[0], taken[1]);
    assert!(
        with_cache * 4 < without,
        "cache on took {with_cache} bytes, cache off {without}"
    );
}
