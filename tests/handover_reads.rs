//! The history an orchestration ack committed answers the `read(instance)` duroxide
//! 0.1.32's worker makes before each activity the ack handed over
//! (`src/handover_reads.rs`, `ProviderOptions::handover_history_window`): one read per
//! handed activity, without a round trip, equal to what the database returns; every
//! other read asks the database (a second read, a read after the window, with the
//! window at zero, after this process acked the instance again or appended to it).
//!
//! Round trips are counted by the testkit's proxy between the provider and PostgreSQL;
//! the database's answer is read through a second provider that does not go through it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{activity_item, completion, new_provider};
use common::{start_item, started_event};
use duroxide::providers::{Provider, TagFilter, WorkItem};
use duroxide::{Event, EventKind};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider, ProviderOptions};
use duroxide_pg_hybrid_testkit::proxy::Proxy;

const LOCK: Duration = Duration::from_secs(30);
const NOW: Duration = Duration::ZERO;
const WAIT: Duration = Duration::from_secs(10);

fn scheduled(instance: &str, id: u64) -> Event {
    Event::with_event_id(
        id,
        instance,
        1,
        None,
        EventKind::ActivityScheduled {
            name: "A".to_string(),
            input: "in".to_string(),
            session_id: None,
            tag: None,
        },
    )
}

fn completed(instance: &str, id: u64, of: u64) -> Event {
    Event::with_event_id(
        id,
        instance,
        1,
        Some(of),
        EventKind::ActivityCompleted {
            result: format!("r{of}"),
        },
    )
}

fn json(h: &[Event]) -> String {
    serde_json::to_string(h).unwrap()
}

/// `p.read(instance)`: the history and the round trips it took.
async fn read_counted(proxy: &Proxy, p: &PostgresProvider, instance: &str) -> (Vec<Event>, u64) {
    let before = proxy.snapshot();
    let h = p.read(instance).await.unwrap();
    (h, proxy.snapshot().since(&before).bursts)
}

/// Claims the next turn and acks it with `delta`, scheduling `activities`, while one
/// worker fetch of `p` waits: the worker item and lock token the fetch got (handed over
/// when hand-over is on).
async fn ack_while_worker_waits(
    p: &Arc<PostgresProvider>,
    delta: Vec<Event>,
    activities: Vec<WorkItem>,
) -> (WorkItem, String) {
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .expect("a turn is claimable");
    let w = p.clone();
    let waiter = tokio::spawn(async move {
        w.fetch_work_item(LOCK, WAIT, None, &TagFilter::DefaultOnly)
            .await
            .unwrap()
    });
    // Let the fetch make its first (empty) claim and start waiting.
    tokio::time::sleep(Duration::from_millis(600)).await;
    common::ack_events(p, &token, delta, activities).await;
    let (item, token, _) = waiter
        .await
        .unwrap()
        .expect("the activity reached the fetch");
    (item, token)
}

/// Acks `instance`'s next turn with `delta` and nothing else.
async fn ack_turn(p: &PostgresProvider, delta: Vec<Event>) {
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .expect("a turn is claimable");
    common::ack_events(p, &token, delta, vec![]).await;
}

async fn handed_activity_reads_the_acked_history(path: FetchPath) {
    let (direct, guard) = new_provider(path).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let i = "hr-1";

    // First turn: the ack starts the execution and hands activity 2 over.
    p.enqueue_for_orchestrator(start_item(i), None)
        .await
        .unwrap();
    let (item, w2) = ack_while_worker_waits(
        &p,
        vec![started_event(i), scheduled(i, 2)],
        vec![activity_item(i, 2)],
    )
    .await;
    assert!(matches!(item, WorkItem::ActivityExecute { id: 2, .. }));
    let (h, trips) = read_counted(&proxy, &p, i).await;
    assert_eq!(
        trips, 0,
        "{path}: the handed activity's read asked the database"
    );
    let db = direct.read(i).await.unwrap();
    assert_eq!(db.len(), 2);
    assert_eq!(json(&h), json(&db), "{path}: what the database holds");
    // One read per handed activity: the next one asks the database.
    let (h, trips) = read_counted(&proxy, &p, i).await;
    assert!(trips >= 1, "{path}: a second read must ask the database");
    assert_eq!(json(&h), json(&db));

    // Second turn, after the cache's entry of the first (its fetch reads only what
    // follows): the completion, and activity 4 handed over.
    p.ack_work_item(&w2, Some(completion(i, 2))).await.unwrap();
    let (_, w4) = ack_while_worker_waits(
        &p,
        vec![completed(i, 3, 2), scheduled(i, 4)],
        vec![activity_item(i, 4)],
    )
    .await;
    let (h, trips) = read_counted(&proxy, &p, i).await;
    assert_eq!(trips, 0, "{path}: the second turn's handed activity read");
    let db = direct.read(i).await.unwrap();
    assert_eq!(db.len(), 4);
    assert_eq!(
        json(&h),
        json(&db),
        "{path}: cached history + the ack's events"
    );

    // A read still owed when this process acks the instance again: that ack's history,
    // read from the database.
    p.ack_work_item(&w4, Some(completion(i, 4))).await.unwrap();
    let (_, w6) = ack_while_worker_waits(
        &p,
        vec![completed(i, 5, 4), scheduled(i, 6)],
        vec![activity_item(i, 6)],
    )
    .await;
    p.enqueue_for_orchestrator(
        WorkItem::ExternalRaised {
            instance: i.to_string(),
            name: "e".to_string(),
            data: "d".to_string(),
        },
        None,
    )
    .await
    .unwrap();
    ack_turn(&p, vec![scheduled(i, 7)]).await;
    let (h, trips) = read_counted(&proxy, &p, i).await;
    assert!(
        trips >= 1,
        "{path}: after its own ack the read asks the database"
    );
    assert_eq!(h.len(), 7, "{path}: the later ack's event is read");
    assert_eq!(json(&h), json(&direct.read(i).await.unwrap()));
    p.ack_work_item(&w6, Some(completion(i, 6))).await.unwrap();
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_activity_reads_the_acked_history_hybrid() {
    handed_activity_reads_the_acked_history(FetchPath::Hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_activity_reads_the_acked_history_procedure() {
    handed_activity_reads_the_acked_history(FetchPath::Procedure).await;
}

/// With the window at zero every read asks the database; after the window a read sees
/// what another process appended meanwhile; an append through this provider drops what
/// it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_outside_the_window_ask_the_database() {
    let path = FetchPath::Procedure;
    let (direct, guard) = new_provider(path).await;

    let (proxy, off) = common::proxied_provider(guard.schema(), path, |o| {
        o.handover_history_window = Duration::ZERO;
    })
    .await;
    off.enqueue_for_orchestrator(start_item("hr-off"), None)
        .await
        .unwrap();
    ack_while_worker_waits(
        &off,
        vec![started_event("hr-off"), scheduled("hr-off", 2)],
        vec![activity_item("hr-off", 2)],
    )
    .await;
    let (h, trips) = read_counted(&proxy, &off, "hr-off").await;
    assert!(trips >= 1, "window 0: the read asks the database");
    assert_eq!(h.len(), 2);
    off.close().await;

    let (proxy, p) = common::proxied_provider(guard.schema(), path, |o| {
        o.handover_history_window = Duration::from_millis(100);
    })
    .await;
    for i in ["hr-late", "hr-append"] {
        p.enqueue_for_orchestrator(start_item(i), None)
            .await
            .unwrap();
        ack_while_worker_waits(
            &p,
            vec![started_event(i), scheduled(i, 2)],
            vec![activity_item(i, 2)],
        )
        .await;
    }
    // Another process appends to hr-late; the window closes before the read.
    direct
        .append_with_execution("hr-late", 1, vec![scheduled("hr-late", 3)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (h, trips) = read_counted(&proxy, &p, "hr-late").await;
    assert!(trips >= 1, "after the window the read asks the database");
    assert_eq!(h.len(), 3, "the other process's event is read");
    // An append through this provider within the window drops what it kept.
    p.enqueue_for_orchestrator(start_item("hr-own"), None)
        .await
        .unwrap();
    ack_while_worker_waits(
        &p,
        vec![started_event("hr-own"), scheduled("hr-own", 2)],
        vec![activity_item("hr-own", 2)],
    )
    .await;
    p.append_with_execution("hr-own", 1, vec![scheduled("hr-own", 3)])
        .await
        .unwrap();
    let (h, trips) = read_counted(&proxy, &p, "hr-own").await;
    assert!(
        trips >= 1,
        "after its own append the read asks the database ({trips} trips, {} events)",
        h.len()
    );
    assert_eq!(h.len(), 3);
    p.close().await;
}

#[test]
fn a_window_above_the_limit_is_rejected() {
    let o = ProviderOptions {
        handover_history_window: duroxide_pg_hybrid::MAX_HANDOVER_HISTORY_WINDOW
            + Duration::from_millis(1),
        ..ProviderOptions::default()
    };
    let e = o.validate().unwrap_err();
    assert!(e.to_string().contains("handover_history_window"), "{e}");
}

/// `events` appended to `instance` and its activity `activity` queued through `direct`,
/// then fetched (and acked) by `p`: the history `p.read` returned between the two, and
/// its round trips.
async fn fetch_then_read(
    direct: &PostgresProvider,
    proxy: &Proxy,
    p: &PostgresProvider,
    instance: &str,
    events: Vec<Event>,
    activity: u64,
) -> (Vec<Event>, u64) {
    direct
        .append_with_execution(instance, 1, events)
        .await
        .unwrap();
    direct
        .enqueue_for_worker(activity_item(instance, activity))
        .await
        .unwrap();
    let (_, w, _) = p
        .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
        .await
        .unwrap()
        .expect("the queued activity");
    let read = read_counted(proxy, p, instance).await;
    p.ack_work_item(&w, Some(completion(instance, activity)))
        .await
        .unwrap();
    read
}

/// An activity a worker fetch claims itself (no hand-over) brings its instance's history
/// along when it is short: duroxide's read before the activity costs no round trip and
/// returns what the database holds; the next read asks the database. A history with more
/// events or bytes than the fetch brings, one without the activity's scheduling event, or
/// the window at zero, leaves the read to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_activity_reads_the_history_its_claim_read() {
    let path = FetchPath::Hybrid;
    let (direct, guard) = new_provider(path).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), path, |_| {}).await;
    let (proxy_off, off) = common::proxied_provider(guard.schema(), path, |o| {
        o.handover_history_window = Duration::ZERO;
    })
    .await;

    // Short: the first turn, acked by another process (nothing handed to `p`).
    let i = "hr-fetched";
    direct
        .enqueue_for_orchestrator(start_item(i), None)
        .await
        .unwrap();
    let (_, token, _) = direct
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .expect("the start");
    common::ack_events(
        &direct,
        &token,
        vec![started_event(i), scheduled(i, 2), scheduled(i, 3)],
        vec![activity_item(i, 2), activity_item(i, 3)],
    )
    .await;
    let db = direct.read(i).await.unwrap();
    assert_eq!(db.len(), 3);
    let (item, w2, _) = p
        .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
        .await
        .unwrap()
        .expect("an activity");
    assert!(matches!(item, WorkItem::ActivityExecute { .. }));
    let (h, trips) = read_counted(&proxy, &p, i).await;
    assert_eq!(trips, 0, "the fetched activity's read asked the database");
    assert_eq!(json(&h), json(&db), "what the database holds");
    let (h, trips) = read_counted(&proxy, &p, i).await;
    assert!(trips >= 1, "a second read must ask the database");
    assert_eq!(json(&h), json(&db));

    // The window at zero: the fetch brings nothing, the read asks the database.
    let (_, w3, _) = off
        .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
        .await
        .unwrap()
        .expect("the other activity");
    let (h, trips) = read_counted(&proxy_off, &off, i).await;
    assert!(trips >= 1, "window 0: the read asks the database");
    assert_eq!(json(&h), json(&db));
    p.ack_work_item(&w2, Some(completion(i, 2))).await.unwrap();
    off.ack_work_item(&w3, Some(completion(i, 3)))
        .await
        .unwrap();

    // Long: more events than a fetch brings along.
    let long = "hr-long";
    let mut events = vec![started_event(long)];
    events.extend((2..=150).map(|id| scheduled(long, id)));
    let (h, trips) = fetch_then_read(&direct, &proxy, &p, long, events, 150).await;
    assert!(trips >= 1, "a long history is read when asked");
    assert_eq!(h.len(), 150);

    // Heavy: few events, but more bytes than a fetch brings along.
    let heavy = "hr-heavy";
    let big = |id: u64| {
        Event::with_event_id(
            id,
            heavy,
            1,
            None,
            EventKind::ActivityScheduled {
                name: "A".to_string(),
                input: "x".repeat(5_000),
                session_id: None,
                tag: None,
            },
        )
    };
    let events = vec![started_event(heavy), big(2), big(3)];
    let (h, trips) = fetch_then_read(&direct, &proxy, &p, heavy, events, 3).await;
    assert!(trips >= 1, "a heavy history is read when asked");
    assert_eq!(h.len(), 3);

    // A history without the activity's scheduling event (read before the turn that
    // scheduled it committed, as far as the fetch can tell) is not kept.
    let early = "hr-early";
    let events = vec![started_event(early), scheduled(early, 2)];
    let (h, trips) = fetch_then_read(&direct, &proxy, &p, early, events, 7).await;
    assert!(
        trips >= 1,
        "a history without the scheduling event is not kept"
    );
    assert_eq!(h.len(), 2);
    p.close().await;
    off.close().await;
}
