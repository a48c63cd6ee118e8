//! Long polling (LISTEN/NOTIFY): work is picked up the moment it exists, timers wake a
//! waiting fetch at their visible_at, the deadline is honoured, waiters do not stampede,
//! dropped waiters strand nothing, and a lost LISTEN connection recovers.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    activity_item, database_url, new_provider, new_provider_with, start_item, test_options,
};
use duroxide::providers::{Provider, TagFilter, WorkItem};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};

const LOCK: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(30);

async fn second_provider(schema: &str, path: FetchPath) -> PostgresProvider {
    PostgresProvider::connect_with(&database_url(), test_options(schema, path))
        .await
        .unwrap()
}

/// A worker blocked in a 30 s long poll gets an item enqueued by another provider
/// instance (another process, as far as the database is concerned) within a second.
async fn enqueue_wakes_waiting_worker(path: FetchPath) {
    let (waiter, guard) = new_provider(path).await;
    let other = second_provider(guard.schema(), path).await;
    let w = waiter.clone();
    let fetch = tokio::spawn(async move {
        let t = Instant::now();
        let r = w
            .fetch_work_item(LOCK, LONG, None, &TagFilter::DefaultOnly)
            .await
            .unwrap();
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fetch.is_finished(), "an empty long poll must wait");
    let enqueued = Instant::now();
    other
        .enqueue_for_worker(activity_item("lp-1", 1))
        .await
        .unwrap();
    let (got, _) = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .unwrap()
        .unwrap();
    let latency = enqueued.elapsed();
    let (item, _, attempts) = got.expect("the waiting worker must receive the item");
    assert_eq!(item, activity_item("lp-1", 1));
    assert_eq!(attempts, 1);
    assert!(
        latency < Duration::from_secs(1),
        "picked up after {latency:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_wakes_waiting_worker_hybrid() {
    enqueue_wakes_waiting_worker(FetchPath::Hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_wakes_waiting_worker_procedure() {
    enqueue_wakes_waiting_worker(FetchPath::Procedure).await;
}

/// A delayed orchestrator item (a timer) is claimed at its visible_at by a fetch that is
/// already waiting, without any further write to wake it.
async fn timer_wakes_waiting_fetch(path: FetchPath) {
    let (p, _guard) = new_provider(path).await;
    let delay = Duration::from_millis(1500);
    p.enqueue_for_orchestrator(start_item("lp-timer"), Some(delay))
        .await
        .unwrap();
    let t = Instant::now();
    let got = p.fetch_orchestration_item(LOCK, LONG, None).await.unwrap();
    let waited = t.elapsed();
    let (item, _, _) = got.expect("the timer item must be claimed when it becomes visible");
    assert_eq!(item.instance, "lp-timer");
    assert!(
        waited >= Duration::from_millis(1400),
        "claimed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1500 + 500),
        "claimed too late: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_wakes_waiting_fetch_hybrid() {
    timer_wakes_waiting_fetch(FetchPath::Hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_wakes_waiting_fetch_procedure() {
    timer_wakes_waiting_fetch(FetchPath::Procedure).await;
}

/// The ack of a turn wakes a waiting worker for the activity it scheduled, and a waiting
/// orchestrator fetch for the completion a worker acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_wakes_the_next_dispatcher() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    p.enqueue_for_orchestrator(start_item("lp-ack"), None)
        .await
        .unwrap();
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .unwrap();

    let w = p.clone();
    let worker = tokio::spawn(async move {
        w.fetch_work_item(LOCK, LONG, None, &TagFilter::DefaultOnly)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked = Instant::now();
    let metadata = duroxide::providers::ExecutionMetadata {
        orchestration_name: Some("O".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        ..Default::default()
    };
    p.ack_orchestration_item(
        &token,
        1,
        vec![],
        vec![activity_item("lp-ack", 2)],
        vec![],
        metadata,
        vec![],
    )
    .await
    .unwrap();
    let (item, wtoken, _) = worker
        .await
        .unwrap()
        .unwrap()
        .expect("worker woken by the ack");
    assert!(acked.elapsed() < Duration::from_secs(1));
    assert_eq!(item, activity_item("lp-ack", 2));

    let o = p.clone();
    let orch = tokio::spawn(async move { o.fetch_orchestration_item(LOCK, LONG, None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let completed = Instant::now();
    let completion = WorkItem::ActivityCompleted {
        instance: "lp-ack".to_string(),
        execution_id: 1,
        id: 2,
        result: "r".to_string(),
    };
    p.ack_work_item(&wtoken, Some(completion.clone()))
        .await
        .unwrap();
    let (item, _, _) = orch
        .await
        .unwrap()
        .unwrap()
        .expect("orchestration woken by the worker ack");
    assert!(completed.elapsed() < Duration::from_secs(1));
    assert_eq!(item.messages, vec![completion]);
}

/// The call started at `t` returned at its deadline: not before, at most 100 ms after.
fn assert_returned_at_deadline(t: Instant, timeout: Duration) {
    let e = t.elapsed();
    assert!(
        e >= timeout && e < timeout + Duration::from_millis(100),
        "{timeout:?} took {e:?}"
    );
}

/// An empty long poll returns None at its deadline: not before, and not much after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_long_poll_honours_deadline() {
    let (p, _guard) = new_provider(FetchPath::Procedure).await;
    for timeout in [Duration::from_millis(300), Duration::from_millis(800)] {
        let t = Instant::now();
        assert!(
            p.fetch_orchestration_item(LOCK, timeout, None)
                .await
                .unwrap()
                .is_none()
        );
        assert_returned_at_deadline(t, timeout);
        let t = Instant::now();
        assert!(
            p.fetch_work_item(LOCK, timeout, None, &TagFilter::Any)
                .await
                .unwrap()
                .is_none()
        );
        assert_returned_at_deadline(t, timeout);
    }
    let t = Instant::now();
    assert!(
        p.fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "poll_timeout 0 must return at once"
    );
}

/// With long polling switched off, a fetch returns at once whatever poll_timeout says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_poll_setting_returns_at_once() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, |o| o.long_poll = false).await;
    assert!(!p.long_poll());
    let t = Instant::now();
    assert!(
        p.fetch_orchestration_item(LOCK, LONG, None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        p.fetch_work_item(LOCK, LONG, None, &TagFilter::Any)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
}

fn notified_worker_wakeups(snapshotter: &metrics_util::debugging::Snapshotter) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == "duroxide_pg_long_poll_wakeups_total"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "reason" && l.value() == "notify")
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "queue" && l.value() == "worker")
        })
        .map(|(_, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(c) => c,
            _ => 0,
        })
        .sum()
}

/// One new item wakes one of many waiters, not all of them; the rest keep waiting.
#[test]
fn one_item_wakes_one_waiter() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let (p, guard) = new_provider(FetchPath::Hybrid).await;
            let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
            let waiters: Vec<_> = (0..6)
                .map(|_| {
                    let p = p.clone();
                    tokio::spawn(async move {
                        p.fetch_work_item(
                            LOCK,
                            Duration::from_secs(4),
                            None,
                            &TagFilter::DefaultOnly,
                        )
                        .await
                    })
                })
                .collect();
            // Let the listener connect (its start-up wake-all rouses everyone once).
            tokio::time::sleep(Duration::from_millis(700)).await;
            let before = notified_worker_wakeups(&snapshotter);
            other
                .enqueue_for_worker(activity_item("lp-herd", 1))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let woken = notified_worker_wakeups(&snapshotter) - before;
            assert_eq!(woken, 1, "one item must wake one waiter, woke {woken}");
            let done = waiters.iter().filter(|w| w.is_finished()).count();
            assert_eq!(done, 1, "exactly one waiter should have returned");
            let mut got = 0;
            for w in waiters {
                if w.await.unwrap().unwrap().is_some() {
                    got += 1;
                }
            }
            assert_eq!(got, 1, "the item is delivered once");
            drop(guard);
        })
    });
}

/// A waiter dropped while waiting (runtime shutdown) leaves nothing behind: another
/// waiter still gets the next item, and no lease is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiter_strands_nothing() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    let a = {
        let p = p.clone();
        tokio::spawn(async move { p.fetch_orchestration_item(LOCK, LONG, None).await })
    };
    let b = {
        let p = p.clone();
        tokio::spawn(async move { p.fetch_orchestration_item(LOCK, LONG, None).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    other
        .enqueue_for_orchestrator(start_item("lp-drop"), None)
        .await
        .unwrap();
    let (item, _, _) = tokio::time::timeout(Duration::from_secs(2), b)
        .await
        .expect("the remaining waiter must be woken")
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(item.instance, "lp-drop");
}

/// The LISTEN connection is killed; the provider reconnects, re-polls, and a waiter still
/// receives work enqueued afterwards promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_connection_loss() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    // Start the listener with a first wait.
    assert!(
        p.fetch_work_item(LOCK, Duration::from_millis(200), None, &TagFilter::Any)
            .await
            .unwrap()
            .is_none()
    );
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(format!("dpgh-test {}", guard.schema()))
    .fetch_one(other.pool())
    .await
    .unwrap();
    assert!(
        killed >= 1,
        "the LISTEN connection should have been found and killed"
    );
    let w = p.clone();
    let fetch =
        tokio::spawn(async move { w.fetch_work_item(LOCK, LONG, None, &TagFilter::Any).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let enqueued = Instant::now();
    other
        .enqueue_for_worker(activity_item("lp-reconnect", 1))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(got.is_some());
    assert!(
        enqueued.elapsed() < Duration::from_secs(1),
        "took {:?} after reconnect",
        enqueued.elapsed()
    );
    let _ = Arc::strong_count(&p);
}
