//! Long polling (LISTEN/NOTIFY): work is picked up the moment it exists, timers wake a
//! waiting fetch at their visible_at, the deadline is honoured, waiters do not stampede,
//! dropped waiters strand nothing, and a lost LISTEN connection recovers.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    activity_item, completion, database_url, fan_out, first_turn, new_provider, new_provider_with,
    start_item, test_options,
};
use duroxide::providers::{Provider, SessionFetchConfig, TagFilter, WorkItem};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};
use duroxide_pg_hybrid_testkit::proxy::{Proxy, rewrite_url};
use sqlx::Connection;

const LOCK: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(30);

async fn second_provider(schema: &str, path: FetchPath) -> PostgresProvider {
    common::connect_waiting(&database_url(), test_options(schema, path))
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
    let token = first_turn(&p, "lp-ack").await;

    let w = p.clone();
    let worker = tokio::spawn(async move {
        w.fetch_work_item(LOCK, LONG, None, &TagFilter::DefaultOnly)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked = Instant::now();
    p.ack_orchestration_item(
        &token,
        1,
        vec![],
        vec![activity_item("lp-ack", 2)],
        vec![],
        metadata(),
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

/// Metadata of a first turn of orchestration "O" 1.0.0.
fn metadata() -> duroxide::providers::ExecutionMetadata {
    duroxide::providers::ExecutionMetadata {
        orchestration_name: Some("O".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        ..Default::default()
    }
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

/// Leases held in the schema (orchestration and worker).
async fn leases(p: &PostgresProvider) -> i64 {
    let q = duroxide_pg_hybrid::schema::quote_ident(p.schema());
    sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) FROM {q}.instance_locks) + \
                (SELECT count(*) FROM {q}.worker_queue WHERE lock_token IS NOT NULL)"
    ))
    .fetch_one(p.pool())
    .await
    .unwrap()
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
    assert_eq!(leases(&p).await, 0, "a dropped waiter holds no lease");
    other
        .enqueue_for_orchestrator(start_item("lp-drop"), None)
        .await
        .unwrap();
    let (item, token, _) = tokio::time::timeout(Duration::from_secs(2), b)
        .await
        .expect("the remaining waiter must be woken")
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(item.instance, "lp-drop");
    assert_eq!(
        leases(&p).await,
        1,
        "only the waiter that got the item holds a lease"
    );
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();
    assert_eq!(leases(&p).await, 0);
}

/// The hand-on path: the waiter a notification chose is dropped before it could claim
/// (its runtime is busy, then shuts the task down). Its wake-up goes to the other
/// waiter, which gets the item long before the 10 s fallback poll, and no lease is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_chosen_waiter_hands_its_wake_up_on() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    // Start the listener from this runtime, then wait for it to listen.
    assert!(
        p.fetch_work_item(LOCK, Duration::from_millis(300), None, &TagFilter::Any)
            .await
            .unwrap()
            .is_none()
    );
    // Waiter A lives on a runtime of its own, so the test can keep it from running.
    let side = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = {
        let p = p.clone();
        side.spawn(async move { p.fetch_work_item(LOCK, LONG, None, &TagFilter::Any).await })
    };
    let side_thread = std::thread::spawn(move || {
        side.block_on(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // A is registered first, so the notification below chooses it; block the
            // runtime so A cannot act on it.
            std::thread::sleep(Duration::from_millis(1500));
        });
        side
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B registers after A.
    let b = {
        let p = p.clone();
        tokio::spawn(async move { p.fetch_work_item(LOCK, LONG, None, &TagFilter::Any).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let enqueued = Instant::now();
    other
        .enqueue_for_worker(activity_item("lp-handon", 1))
        .await
        .unwrap();
    // The side runtime is blocked now; A is woken but cannot run. Abort it: it is dropped
    // (with its wake-up) once the runtime runs again, and the wake-up goes to B.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !b.is_finished(),
        "B must not have been chosen (A registered first)"
    );
    a.abort();
    let a_cancelled = tokio::task::spawn_blocking(move || {
        let side = side_thread.join().unwrap();
        let a = side.block_on(a);
        drop(side);
        a.unwrap_err().is_cancelled()
    })
    .await
    .unwrap();
    assert!(a_cancelled, "A was dropped before it claimed");
    let (item, token, _) = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("B must get the handed-on wake-up, not wait for the fallback poll")
        .unwrap()
        .unwrap()
        .expect("B gets the item");
    assert_eq!(item, activity_item("lp-handon", 1));
    assert!(
        enqueued.elapsed() < Duration::from_secs(5),
        "{:?}",
        enqueued.elapsed()
    );
    assert_eq!(leases(&p).await, 1, "only B's lease");
    p.ack_work_item(&token, None).await.unwrap();
    assert_eq!(leases(&p).await, 0);
}

/// The LISTEN connection is killed; the provider reconnects, re-polls, and a waiter still
/// receives work enqueued afterwards promptly.
/// Terminates the LISTEN connection of the providers on `schema` (through `via`, a
/// provider whose connections are not killed); how many were terminated.
async fn kill_listener(via: &PostgresProvider, schema: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(format!("dpgh-test {schema}"))
    .fetch_one(via.pool())
    .await
    .unwrap()
}

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
    assert!(
        kill_listener(&other, guard.schema()).await >= 1,
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

// ---- targeted wake-ups, delayed work, listener set-up ------------------------------------

/// Polls the instance status every 20 ms until it is terminal; returns when it was seen.
async fn completed_within(client: &Client, instance: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        match client.get_orchestration_status(instance).await.unwrap() {
            OrchestrationStatus::Completed { output, .. } => {
                assert_eq!(output, "done", "{instance}");
                return t.elapsed();
            }
            OrchestrationStatus::Failed { details, .. } => panic!("{instance} failed: {details:?}"),
            _ => {}
        }
        assert!(
            t.elapsed() < limit,
            "{instance} did not complete within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn echo_activities() -> ActivityRegistry {
    ActivityRegistry::builder()
        .register("Echo", |_ctx: ActivityContext, input: String| async move {
            Ok(input)
        })
        .build()
}

/// Two activities in a row on one session, one default runtime: the second one is
/// claimable only by the worker slot that owns the session, so its notification must
/// wake that slot (it used to wake some other slot, and the owner slept for the 10 s
/// fallback poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_activities_in_a_row_complete_within_a_second() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "TwoOnSession",
            |ctx: OrchestrationContext, _in: String| async move {
                ctx.schedule_activity_on_session("Echo", "one", "sess-1")
                    .await?;
                ctx.schedule_activity_on_session("Echo", "two", "sess-1")
                    .await?;
                Ok("done".to_string())
            },
        )
        .build();
    let rt = Runtime::start_with_options(
        p.clone(),
        echo_activities(),
        orchestrations,
        RuntimeOptions::default(),
    )
    .await;
    let client = Client::new(p.clone());
    // Let every dispatcher reach its long poll first (the situation of a running system).
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .start_orchestration("lp-session", "TwoOnSession", "")
        .await
        .unwrap();
    let took = completed_within(&client, "lp-session", Duration::from_secs(15)).await;
    rt.shutdown(None).await;
    assert!(
        took < Duration::from_secs(1),
        "two session activities took {took:?}"
    );
}

/// Runtime A (orchestrations + untagged worker) and runtime B (no orchestrations, worker
/// for tag "gpu") on one provider: the gpu activity must wake B's worker, not one of A's
/// (which cannot take it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tagged_activity_wakes_the_runtime_that_takes_the_tag() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    let orchestrations = || {
        OrchestrationRegistry::builder()
            .register(
                "PlainThenGpu",
                |ctx: OrchestrationContext, _in: String| async move {
                    ctx.schedule_activity("Echo", "cpu").await?;
                    ctx.schedule_activity("Echo", "gpu").with_tag("gpu").await?;
                    Ok("done".to_string())
                },
            )
            .build()
    };
    let a = Runtime::start_with_options(
        p.clone(),
        echo_activities(),
        orchestrations(),
        RuntimeOptions::default(),
    )
    .await;
    let b = Runtime::start_with_options(
        p.clone(),
        echo_activities(),
        orchestrations(),
        RuntimeOptions {
            orchestration_concurrency: 0,
            worker_tag_filter: TagFilter::tags(["gpu"]),
            ..RuntimeOptions::default()
        },
    )
    .await;
    let client = Client::new(p.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .start_orchestration("lp-tags", "PlainThenGpu", "")
        .await
        .unwrap();
    let took = completed_within(&client, "lp-tags", Duration::from_secs(15)).await;
    a.shutdown(None).await;
    b.shutdown(None).await;
    assert!(
        took < Duration::from_secs(1),
        "untagged then gpu activity took {took:?}"
    );
}

/// A session item wakes the waiter of the session's owner even when others wait first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_item_wakes_its_owner() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    let owner = |id: &str| SessionFetchConfig {
        owner_id: id.to_string(),
        lock_timeout: Duration::from_secs(30),
    };
    let session_item = |id: u64| WorkItem::ActivityExecute {
        instance: "lp-sess".to_string(),
        execution_id: 1,
        id,
        name: "A".to_string(),
        input: "in".to_string(),
        session_id: Some("s-1".to_string()),
        tag: None,
    };
    other.enqueue_for_worker(session_item(1)).await.unwrap();
    let (_, token, _) = p
        .fetch_work_item(
            LOCK,
            Duration::ZERO,
            Some(&owner("owner-b")),
            &TagFilter::Any,
        )
        .await
        .unwrap()
        .expect("owner-b claims the session");
    p.ack_work_item(&token, None).await.unwrap();
    // Three non-owners wait first, then the owner.
    let mut others = Vec::new();
    for i in 0..3 {
        let p = p.clone();
        let cfg = owner(&format!("owner-x{i}"));
        others.push(tokio::spawn(async move {
            p.fetch_work_item(LOCK, Duration::from_secs(3), Some(&cfg), &TagFilter::Any)
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = {
        let p = p.clone();
        let cfg = owner("owner-b");
        tokio::spawn(async move {
            p.fetch_work_item(LOCK, LONG, Some(&cfg), &TagFilter::Any)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enqueued = Instant::now();
    other.enqueue_for_worker(session_item(2)).await.unwrap();
    let (item, _, _) = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("the owner must be woken")
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        enqueued.elapsed() < Duration::from_secs(1),
        "{:?}",
        enqueued.elapsed()
    );
    assert_eq!(item, session_item(2));
    for o in others {
        assert!(o.await.unwrap().unwrap().is_none());
    }
}

/// A fetch already waiting (nothing queued, so no database wake-up time) learns about a
/// delayed item another provider enqueues, and claims it when it becomes visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_enqueue_by_another_provider_wakes_a_waiting_fetch() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    let w = p.clone();
    let fetch = tokio::spawn(async move { w.fetch_orchestration_item(LOCK, LONG, None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enqueued = Instant::now();
    other
        .enqueue_for_orchestrator(start_item("lp-delayed"), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let (item, _, _) = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .expect("the delayed item must be claimed long before the fallback poll")
        .unwrap()
        .unwrap()
        .unwrap();
    let took = enqueued.elapsed();
    assert_eq!(item.instance, "lp-delayed");
    assert!(
        took >= Duration::from_millis(950),
        "claimed before it was visible: {took:?}"
    );
    assert!(
        // Woken by its notification, not by the 10 s fallback poll (the margin is for a
        // loaded CI machine).
        took < Duration::from_millis(1600),
        "claimed {took:?} after a 1 s delay"
    );
}

/// The same for a delayed abandon: the waiting fetch's database wake-up time was the
/// lease's expiry (30 s away); the abandon makes the item visible in 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_abandon_by_another_provider_wakes_a_waiting_fetch() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    other
        .enqueue_for_worker(activity_item("lp-abandon", 1))
        .await
        .unwrap();
    let (_, token, _) = other
        .fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
        .await
        .unwrap()
        .unwrap();
    let w = p.clone();
    let fetch =
        tokio::spawn(async move { w.fetch_work_item(LOCK, LONG, None, &TagFilter::Any).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let abandoned = Instant::now();
    other
        .abandon_work_item(&token, Some(Duration::from_secs(1)), false)
        .await
        .unwrap();
    let (item, _, attempts) = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .expect("the abandoned item must be claimed long before the fallback poll")
        .unwrap()
        .unwrap()
        .unwrap();
    let took = abandoned.elapsed();
    assert_eq!(item, activity_item("lp-abandon", 1));
    assert_eq!(attempts, 2);
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(
        // Woken by its notification, not by the 10 s fallback poll (the margin is for a
        // loaded CI machine).
        took < Duration::from_millis(1600),
        "claimed {took:?} after a 1 s delay"
    );
}

/// Connections are refused while the first long poll starts (the LISTEN set-up fails);
/// once the server is reachable again the provider listens after all, and a new item is
/// picked up within a second instead of at the fallback poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_set_up_is_retried_after_a_failed_first_attempt() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    let proxy = Proxy::start(
        rewrite_url(&database_url(), "127.0.0.1:1".parse().unwrap())
            .unwrap()
            .1,
        Duration::ZERO,
    )
    .await
    .unwrap();
    let (url, _) = rewrite_url(&database_url(), proxy.addr()).unwrap();
    let tag = format!("dpgh-lp-proxy {}", guard.schema());
    let mut options = test_options(guard.schema(), FetchPath::Hybrid);
    options.application_name = tag.clone();
    options.min_connections = 0;
    let proxied = common::connect_waiting(&url, options).await.unwrap();
    proxy.faults().set_refusing(true);
    proxy.faults().sever_all();
    let first = proxied
        .fetch_work_item(LOCK, Duration::from_millis(300), None, &TagFilter::Any)
        .await;
    assert!(
        matches!(&first, Err(e) if e.is_retryable()),
        "the first fetch must fail (retryable) while connections are refused: {first:?}"
    );
    proxy.faults().set_refusing(false);
    // The listener comes up on its own (no further fetch needed to trigger it).
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
        )
        .bind(&tag)
        .fetch_one(other.pool())
        .await
        .unwrap();
        if listening > 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the provider never started listening"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pool has no connection since the faults (min_connections 0): open one first,
    // as a running process would have, so the long poll below does not meet a server
    // that a parallel test run keeps full (53300) when it opens its own.
    common::retry_while_server_full(|| {
        proxied.fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
    })
    .await
    .expect("a fetch through the proxy once it accepts connections again");
    let w = proxied.clone();
    let fetch =
        tokio::spawn(async move { w.fetch_work_item(LOCK, LONG, None, &TagFilter::Any).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enqueued = Instant::now();
    other
        .enqueue_for_worker(activity_item("lp-deaf", 1))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), fetch)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(got.is_some());
    let took = enqueued.elapsed();
    assert!(took < Duration::from_secs(1), "picked up after {took:?}");
    proxied.close().await;
    let _ = p;
}

/// A fetch waits; another provider's ack writes a timer due in 1 s; the timer's turn
/// starts within 1.1 s (not at the fallback poll). Needs `ack_orchestration_item` to
/// announce its delayed items with `notify_delayed('orchestrator', <earliest visible_at>)`
/// (the lead's migration; see the issue 11 report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_written_timer_wakes_a_waiting_fetch_of_another_provider() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
    let token = first_turn(&other, "lp-ack-timer").await;
    let w = p.clone();
    let fetch = tokio::spawn(async move { w.fetch_orchestration_item(LOCK, LONG, None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let acked = Instant::now();
    let timer = WorkItem::TimerFired {
        instance: "lp-ack-timer".to_string(),
        execution_id: 1,
        id: 2,
        fire_at_ms: now_ms + 1000,
    };
    other
        .ack_orchestration_item(
            &token,
            1,
            vec![],
            vec![],
            vec![timer.clone()],
            metadata(),
            vec![],
        )
        .await
        .unwrap();
    let (item, _, _) = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .expect("the timer's turn must start long before the fallback poll")
        .unwrap()
        .unwrap()
        .unwrap();
    let took = acked.elapsed();
    assert_eq!(item.messages, vec![timer]);
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        // Woken by its notification, not by the 10 s fallback poll (the margin is for a
        // loaded CI machine).
        took < Duration::from_millis(1600),
        "the timer's turn started after {took:?}"
    );
}

/// The orchestrator channel of `p`'s schema, listened to on a connection of its own.
async fn orchestrator_listener(p: &PostgresProvider) -> sqlx::postgres::PgListener {
    queue_listener(p, "orchestrator").await
}

/// `queue`'s channel of `p`'s schema (as `notify_channel` names it), listened to on a
/// connection of its own.
async fn queue_listener(p: &PostgresProvider, queue: &str) -> sqlx::postgres::PgListener {
    let q = duroxide_pg_hybrid::schema::quote_ident(p.schema());
    let channel: String = sqlx::query_scalar(&format!("SELECT {q}.notify_channel($1)"))
        .bind(queue)
        .fetch_one(p.pool())
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect(&database_url())
        .await
        .unwrap();
    listener.listen(&channel).await.unwrap();
    listener
}

/// What the worker notification says, on the channel listeners use: items without tag or
/// session as one entry (its shortcut), others grouped by tag and session.
#[tokio::test]
async fn worker_notifications_group_items_by_tag_and_session() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, |_| {}).await;
    let q = duroxide_pg_hybrid::schema::quote_ident(p.schema());
    let mut listener = queue_listener(&p, "worker").await;
    let mut sent = Vec::new();
    for (tags, sessions) in [
        (vec![None, None, None], vec![None, None, None]),
        (
            vec![None, Some("gpu"), Some("gpu"), None],
            vec![None, None, None, Some("s1")],
        ),
    ] {
        sqlx::query(&format!(
            "SELECT {q}.notify_worker_items($1::text[], $2::text[])"
        ))
        .bind(&tags)
        .bind(&sessions)
        .execute(p.pool())
        .await
        .unwrap();
        let got = notifications_within(&mut listener, Duration::from_millis(300)).await;
        let [payload] = got.as_slice() else {
            panic!("one notification per call: {got:?}");
        };
        let json = payload.strip_prefix("w:").expect(payload);
        let mut groups: Vec<(Option<String>, Option<String>, u64)> =
            serde_json::from_str(json).expect(payload);
        groups.sort();
        sent.push(groups);
    }
    let s = |v: &str| Some(v.to_string());
    assert_eq!(sent[0], vec![(None, None, 3)]);
    assert_eq!(
        sent[1],
        vec![(None, None, 1), (None, s("s1"), 1), (s("gpu"), None, 2)]
    );
}

/// Notifications that arrive on `listener` within `window`.
async fn notifications_within(
    listener: &mut sqlx::postgres::PgListener,
    window: Duration,
) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(n) = tokio::time::timeout_at(deadline, listener.recv()).await {
        got.push(n.unwrap().payload().to_string());
    }
    got
}

/// A fan-out's completions wake one orchestration fetch, not one each. Without a fan-in
/// grace the first makes the idle instance claimable and wakes a fetch; the next ones
/// find it claimable already and send nothing. With one, the first tells waiters when
/// the grace ends (`at:`), the next ones before the last send nothing, and the last ends
/// the grace and wakes one fetch. Either way the fetch takes all of them in one turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_completion_of_a_fan_out_wakes_a_fetch() {
    for path in [FetchPath::Hybrid, FetchPath::Procedure] {
        for grace in [Duration::ZERO, Duration::from_secs(1)] {
            let (p, _guard) = new_provider_with(path, |o| {
                o.handover = false;
                o.fan_in_grace = grace;
            })
            .await;
            let tokens = fan_out(&p, "fan", 3).await;

            let mut listener = orchestrator_listener(&p).await;
            p.ack_work_item(&tokens[0], Some(completion("fan", 1)))
                .await
                .unwrap();
            let first = notifications_within(&mut listener, Duration::from_millis(500)).await;
            if grace.is_zero() {
                assert_eq!(
                    first,
                    vec!["1".to_string()],
                    "{path}: the first completion wakes one fetch"
                );
            } else {
                assert!(
                    matches!(first.as_slice(), [n] if n.starts_with("at:")),
                    "{path}: the first completion announces the grace's end: {first:?}"
                );
            }
            for (i, t) in tokens[1..].iter().enumerate() {
                p.ack_work_item(t, Some(completion("fan", i as u64 + 2)))
                    .await
                    .unwrap();
            }
            let rest = notifications_within(&mut listener, Duration::from_millis(500)).await;
            let expected: Vec<String> = if grace.is_zero() {
                vec![]
            } else {
                vec!["1".to_string()]
            };
            assert_eq!(
                rest, expected,
                "{path}, grace {grace:?}: later completions' wake-ups"
            );

            let (item, _, _) = p
                .fetch_orchestration_item(LOCK, Duration::ZERO, None)
                .await
                .unwrap()
                .expect("the instance is claimable");
            assert_eq!(
                item.messages,
                (1..=3).map(|id| completion("fan", id)).collect::<Vec<_>>(),
                "{path}"
            );
        }
    }
}

/// A completion for an instance whose turn is running wakes no fetch (it would find the
/// instance leased): the turn's ack wakes one for it. Waiters learn the lease's end
/// instead, so when the turn's holder is gone the completion is claimed once the lease
/// runs out, by a fetch of another process that was waiting before the lease began (so
/// its own empty claim never saw that lease) and whose fallback poll is far away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_for_a_running_turn_wakes_nobody_until_the_turn_ends() {
    for path in [FetchPath::Hybrid, FetchPath::Procedure] {
        let (p, guard) = new_provider(path).await;
        let tokens = fan_out(&p, "busy", 2).await;
        p.ack_work_item(&tokens[0], Some(completion("busy", 1)))
            .await
            .unwrap();
        let (_, turn, _) = p
            .fetch_orchestration_item(LOCK, Duration::ZERO, None)
            .await
            .unwrap()
            .expect("the first completion's turn");

        // The turn runs: the second completion sends only the lease's end.
        let mut listener = orchestrator_listener(&p).await;
        p.ack_work_item(&tokens[1], Some(completion("busy", 2)))
            .await
            .unwrap();
        let during = notifications_within(&mut listener, Duration::from_millis(500)).await;
        assert!(
            matches!(during.as_slice(), [n] if n.starts_with("at:")),
            "{path}: a completion during the turn woke fetches: {during:?}"
        );
        // The turn's ack wakes one fetch for it.
        p.ack_orchestration_item(&turn, 1, vec![], vec![], vec![], metadata(), vec![])
            .await
            .unwrap();
        let after = notifications_within(&mut listener, Duration::from_millis(500)).await;
        assert_eq!(
            after,
            vec!["1".to_string()],
            "{path}: the ack wakes a fetch"
        );
        let (item, turn, _) = p
            .fetch_orchestration_item(LOCK, Duration::ZERO, None)
            .await
            .unwrap()
            .expect("the second completion");
        assert_eq!(item.messages, vec![completion("busy", 2)], "{path}");
        p.ack_orchestration_item(
            &turn,
            1,
            vec![],
            vec![activity_item("busy", 3)],
            vec![],
            metadata(),
            vec![],
        )
        .await
        .unwrap();
        let (_, w3, _) = p
            .fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::DefaultOnly)
            .await
            .unwrap()
            .unwrap();

        // Another process waits now, idle, with its fallback poll 20 s away.
        let other = Arc::new(second_provider(guard.schema(), path).await);
        let o = other.clone();
        let waiter = tokio::spawn(async move {
            o.fetch_orchestration_item(LOCK, Duration::from_secs(20), None)
                .await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // This process takes a turn (an event handed to its own waiting fetch, so the
        // other process hears of nothing) and dies in it: a 2 s lease nobody acks.
        let p2 = p.clone();
        let local = tokio::spawn(async move {
            p2.fetch_orchestration_item(Duration::from_secs(2), Duration::from_secs(5), None)
                .await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.enqueue_for_orchestrator(
            WorkItem::ExternalRaised {
                instance: "busy".to_string(),
                name: "E".to_string(),
                data: "e".to_string(),
            },
            None,
        )
        .await
        .unwrap();
        let (held, _lost_token, _) = local
            .await
            .unwrap()
            .unwrap()
            .expect("the event's turn, handed over");
        assert_eq!(held.messages.len(), 1, "{path}");
        let leased_at = Instant::now();
        p.ack_work_item(&w3, Some(completion("busy", 3)))
            .await
            .unwrap();
        let (item, t, attempts) = waiter
            .await
            .unwrap()
            .unwrap()
            .expect("claimed when the dead turn's lease ran out");
        let took = leased_at.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "{path}: claimed {took:?} after the lease began (lease 2 s, fallback poll 20 s)"
        );
        assert_eq!(attempts, 2, "{path}: the dead turn's attempt counts");
        assert_eq!(item.messages.len(), 2, "{path}: {:?}", item.messages);
        other
            .ack_orchestration_item(&t, 1, vec![], vec![], vec![], metadata(), vec![])
            .await
            .unwrap();
        other.close().await;
    }
}

/// The case that makes skipping those wake-ups safe: a message committed while a turn of
/// its instance ends, by a writer that wakes nobody. The ack's lease-end refresh finds
/// the message's claim-state lock, so it wakes a fetch itself; a fetch waiting with a
/// fallback poll of ten minutes claims the message within a second of its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_committed_as_its_instance_turn_ends_is_claimed_without_its_own_wake_up() {
    for path in [FetchPath::Hybrid, FetchPath::Procedure] {
        let (p, guard) = new_provider_with(path, |o| o.long_poll = false).await;
        let waiter = common::connect_waiting(&database_url(), {
            let mut o = test_options(guard.schema(), path);
            o.fallback_poll_interval = Duration::from_secs(600);
            o
        })
        .await
        .unwrap();
        let token = first_turn(&p, "late").await;

        // The writer: its INSERT (and the claim-state trigger's lock) in an open
        // transaction, and no NOTIFY.
        let q = duroxide_pg_hybrid::schema::quote_ident(p.schema());
        let mut writer = sqlx::PgConnection::connect(&database_url()).await.unwrap();
        sqlx::query("BEGIN").execute(&mut writer).await.unwrap();
        sqlx::query(&format!(
            "INSERT INTO {q}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms) \
             VALUES ('late', 'ActivityCompleted', $1, {q}.now_ms(), {q}.now_ms())"
        ))
        .bind(serde_json::to_string(&completion("late", 7)).unwrap())
        .execute(&mut writer)
        .await
        .unwrap();

        let fetch = tokio::spawn(async move {
            let r = waiter.fetch_orchestration_item(LOCK, LONG, None).await;
            (r, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.ack_orchestration_item(&token, 1, vec![], vec![], vec![], metadata(), vec![])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
        let committed = Instant::now();

        let (r, returned) = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .unwrap_or_else(|_| panic!("{path}: the waiting fetch was never woken"))
            .unwrap();
        let (item, _, _) = r.unwrap().expect("the waiter claims the message");
        assert_eq!(item.messages, vec![completion("late", 7)], "{path}");
        assert!(
            returned.saturating_duration_since(committed) < Duration::from_secs(1),
            "{path}: claimed {:?} after the commit",
            returned.saturating_duration_since(committed)
        );
    }
}

/// Fan-outs on two processes (one per fetch path, hand-over off) with idle dispatchers
/// between rounds, a fallback poll of ten minutes, a dispatcher poll of two and leases
/// of one: every orchestration completes within seconds, so every completion that
/// skipped its own wake-up (all but the first of each fan-out) was picked up by a
/// wake-up someone else sent. (With the worker ack's wake-up removed altogether, the
/// first round does not complete.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_outs_on_two_processes_never_wait_for_the_fallback_poll() {
    let (_first, guard) = new_provider(FetchPath::Hybrid).await;
    let mut providers = Vec::new();
    for path in [FetchPath::Hybrid, FetchPath::Procedure] {
        let mut o = test_options(guard.schema(), path);
        o.fallback_poll_interval = Duration::from_secs(600);
        // Without hand-over: a worker ack must wake the orchestration fetch through a
        // notification (hand-over would give the last completion's turn to a waiting
        // fetch of its own process directly).
        o.handover = false;
        let p = common::connect_waiting(&database_url(), o).await.unwrap();
        providers.push(Arc::new(p));
    }
    let orchestrations = || {
        OrchestrationRegistry::builder()
            .register(
                "FanOut",
                |ctx: OrchestrationContext, _in: String| async move {
                    // Spread over 40-200 ms: the orchestration dispatchers are waiting
                    // when the completions arrive, one by one.
                    let calls: Vec<_> = (1..=5)
                        .map(|i| ctx.schedule_activity("Sleep", (i * 40).to_string()))
                        .collect();
                    for r in ctx.join(calls).await {
                        r?;
                    }
                    Ok("done".to_string())
                },
            )
            .build()
    };
    // Long leases too: a waiting fetch also wakes when a lease it saw ends, which would
    // hide a missing wake-up behind the default 5 s lease.
    let options = RuntimeOptions {
        dispatcher_long_poll_timeout: Duration::from_secs(120),
        orchestrator_lock_timeout: Duration::from_secs(60),
        ..RuntimeOptions::default()
    };
    let activities = || {
        ActivityRegistry::builder()
            .register("Sleep", |_ctx: ActivityContext, ms: String| async move {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                Ok(ms)
            })
            .build()
    };
    let mut runtimes = Vec::new();
    for p in &providers {
        runtimes.push(
            Runtime::start_with_options(p.clone(), activities(), orchestrations(), options.clone())
                .await,
        );
    }
    let clients: Vec<Client> = providers.iter().map(|p| Client::new(p.clone())).collect();
    for round in 0..3 {
        // Idle first: every dispatcher is in its long poll when the round starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ids: Vec<String> = (0..12).map(|i| format!("fan-{round}-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            clients[i % 2]
                .start_orchestration(id, "FanOut", "")
                .await
                .unwrap();
            if i % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for id in &ids {
            completed_within(&clients[0], id, Duration::from_secs(10)).await;
        }
    }
    for rt in runtimes {
        rt.shutdown(None).await;
    }
}

// ---- the quiet orchestrator queue (notify.rs) --------------------------------------------

fn orchestrator_claims(s: &metrics_util::debugging::Snapshotter, outcome: &str) -> u64 {
    common::counter(
        s,
        "duroxide_pg_claims_total",
        &[("queue", "orchestrator"), ("outcome", outcome)],
    )
}

fn quiet_waits(s: &metrics_util::debugging::Snapshotter) -> u64 {
    common::counter(s, "duroxide_pg_quiet_waits_total", &[])
}

/// Whether an orchestration fetch of `p` waiting up to `wait` returned nothing.
async fn nothing_fetched(
    p: &PostgresProvider,
    wait: Duration,
    filter: Option<&duroxide::providers::DispatcherCapabilityFilter>,
) -> bool {
    p.fetch_orchestration_item(LOCK, wait, filter)
        .await
        .unwrap()
        .is_none()
}

/// An empty orchestration claim's answer holds until something could have changed it:
/// a fetch that starts meanwhile waits without claiming, and is still woken by another
/// process's enqueue and by the wake-up time the claim returned; another capability
/// filter, a listener reconnect and a notification each make the next fetch claim.
#[test]
fn an_empty_claims_answer_holds_until_a_notification() {
    common::with_metrics(|m| async move {
        let (p, guard) = new_provider(FetchPath::Hybrid).await;
        let other = second_provider(guard.schema(), FetchPath::Hybrid).await;
        let short = Duration::from_millis(300);
        // The first wait starts the listener; its start-up wake makes the fetch claim
        // again, now with notifications arriving, and that empty answer is kept.
        assert!(nothing_fetched(&p, Duration::from_millis(1_500), None).await);
        let (empty, quiet) = (orchestrator_claims(&m, "empty"), quiet_waits(&m));
        assert!(nothing_fetched(&p, short, None).await);
        assert_eq!(
            orchestrator_claims(&m, "empty"),
            empty,
            "no claim: nothing changed"
        );
        assert_eq!(quiet_waits(&m), quiet + 1);

        // Another process's enqueue wakes a fetch that skipped its claim.
        let w = p.clone();
        let fetch =
            tokio::spawn(
                async move { w.fetch_orchestration_item(LOCK, LONG, None).await.unwrap() },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!fetch.is_finished());
        let enqueued = Instant::now();
        other
            .enqueue_for_orchestrator(start_item("qh-1"), None)
            .await
            .unwrap();
        let (item, token, _) = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .unwrap()
            .unwrap()
            .expect("woken by the enqueue's notification");
        assert_eq!(item.instance, "qh-1");
        assert!(enqueued.elapsed() < Duration::from_secs(1));
        assert_eq!(quiet_waits(&m), quiet + 2);
        p.abandon_orchestration_item(&token, Some(Duration::from_secs(60)), true)
            .await
            .unwrap();

        // The notification (and the abandon's `at:`) moved the epoch: the next fetch
        // claims, and its empty answer carries the abandoned start's time.
        let empty = orchestrator_claims(&m, "empty");
        assert!(nothing_fetched(&p, short, None).await);
        assert!(
            orchestrator_claims(&m, "empty") > empty,
            "claimed after a notification"
        );

        // Another capability filter: the kept answer is not its answer.
        let empty = orchestrator_claims(&m, "empty");
        let filter = duroxide::providers::DispatcherCapabilityFilter {
            supported_duroxide_versions: vec![duroxide::providers::SemverRange {
                min: semver::Version::new(0, 1, 0),
                max: semver::Version::new(0, 1, 99),
            }],
        };
        assert!(nothing_fetched(&p, short, Some(&filter)).await);
        assert!(
            orchestrator_claims(&m, "empty") > empty,
            "own filter, own claim"
        );

        // A delayed start (visible in 1.5 s, announced by `at:`): a claim learns its
        // time, and a fetch that then skips its claim still wakes at that time.
        other
            .enqueue_for_orchestrator(start_item("qh-2"), Some(Duration::from_millis(1_500)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        assert!(nothing_fetched(&p, short, None).await);
        let quiet = quiet_waits(&m);
        let (item, _, _) = p
            .fetch_orchestration_item(LOCK, LONG, None)
            .await
            .unwrap()
            .expect("claimed when it became visible");
        assert_eq!(item.instance, "qh-2");
        assert_eq!(quiet_waits(&m), quiet + 1, "waited on the kept answer");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "woke at the start's time, not the fallback poll ({:?})",
            t.elapsed()
        );

        // A listener reconnect: notifications may have been missed, so the next fetch
        // claims (after the reconnect's own wake-up).
        assert!(nothing_fetched(&p, short, None).await);
        assert!(kill_listener(&other, guard.schema()).await >= 1);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let empty = orchestrator_claims(&m, "empty");
        assert!(nothing_fetched(&p, short, None).await);
        assert!(
            orchestrator_claims(&m, "empty") > empty,
            "claimed after a reconnect"
        );
        p.close().await;
        other.close().await;
    });
}
