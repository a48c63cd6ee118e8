//! Claims that no queue can stall (issue #10): the claim picks runnable instances from
//! the per-instance claim state, so work nobody can run now (events for instances that do
//! not exist, instances pinned outside a dispatcher's version range, messages pouring into
//! an instance whose turn is in progress) costs a claim nothing and never hides other work.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{database_url, new_provider, new_provider_with, start_item, started_event};
use duroxide::providers::{
    DispatcherCapabilityFilter, ExecutionMetadata, Provider, SemverRange, WorkItem,
};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};
use futures::StreamExt;
use sqlx::{Connection, PgConnection};

const LOCK: Duration = Duration::from_secs(30);

fn external(instance: &str, n: usize) -> WorkItem {
    WorkItem::ExternalRaised {
        instance: instance.to_string(),
        name: "Nudge".to_string(),
        data: format!("{n}"),
    }
}

fn metadata(pin: Option<semver::Version>) -> ExecutionMetadata {
    ExecutionMetadata {
        orchestration_name: Some("O".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        status: Some("Running".to_string()),
        pinned_duroxide_version: pin,
        ..Default::default()
    }
}

/// Creates an instance (start, one turn acked with `pin`), so it exists and is pinned.
/// Safe to run concurrently: the turn claimed is acked whichever start it is, so every
/// call creates one of the instances started.
async fn create_instance(p: &PostgresProvider, instance: &str, pin: Option<semver::Version>) {
    p.enqueue_for_orchestrator(start_item(instance), None)
        .await
        .unwrap();
    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::from_secs(5), None)
        .await
        .unwrap()
        .expect("a start just enqueued is claimable");
    p.ack_orchestration_item(
        &token,
        1,
        vec![started_event(&item.instance)],
        vec![],
        vec![],
        metadata(pin),
        vec![],
    )
    .await
    .unwrap();
}

/// Enqueues `items` one after the other (for tests where the order matters).
async fn enqueue_in_order(p: &PostgresProvider, items: impl IntoIterator<Item = WorkItem>) {
    for item in items {
        p.enqueue_for_orchestrator(item, None).await.unwrap();
    }
}

/// Enqueues `items` with 8 client calls in flight at a time.
async fn enqueue_all(p: &Arc<PostgresProvider>, items: Vec<WorkItem>) {
    futures::stream::iter(items)
        .map(|item| {
            let p = p.clone();
            async move { p.enqueue_for_orchestrator(item, None).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// Enqueues `items` in ONE statement (the rows a client enqueue writes; the claim-state
/// trigger runs for them like for any insert). Used for the large backlogs, which would
/// otherwise spend the test's time on round trips.
async fn enqueue_in_bulk(p: &PostgresProvider, items: Vec<WorkItem>) {
    let (instances, json): (Vec<String>, Vec<String>) = items
        .iter()
        .map(|i| match i {
            WorkItem::ExternalRaised { instance, .. } => {
                (instance.clone(), serde_json::to_string(i).unwrap())
            }
            other => panic!("bulk seeding takes ExternalRaised only, got {other:?}"),
        })
        .unzip();
    sqlx::query(&format!(
        "INSERT INTO {s}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms) \
         SELECT i, 'ExternalRaised', j, {s}.now_ms(), {s}.now_ms() FROM unnest($1::TEXT[], $2::TEXT[]) AS x(i, j)",
        s = quote_ident(p.schema())
    ))
    .bind(&instances)
    .bind(&json)
    .execute(p.pool())
    .await
    .unwrap();
}

async fn count(p: &PostgresProvider, sql: &str) -> i64 {
    let sql = sql.replace("{s}", &quote_ident(p.schema()));
    sqlx::query_scalar(&sql).fetch_one(p.pool()).await.unwrap()
}

fn one_activity() -> (ActivityRegistry, OrchestrationRegistry) {
    let activities = ActivityRegistry::builder()
        .register("Echo", |_ctx: ActivityContext, input: String| async move {
            Ok(format!("echo({input})"))
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "OneActivity",
            |ctx: OrchestrationContext, input: String| async move {
                ctx.schedule_activity("Echo", input).await
            },
        )
        .build();
    (activities, orchestrations)
}

/// Starts `n` one-activity orchestrations on a default runtime and waits for all of them.
async fn five_starts_complete(p: Arc<PostgresProvider>, prefix: &str, n: usize) -> Duration {
    let (activities, orchestrations) = one_activity();
    let rt = Runtime::start_with_options(
        p.clone(),
        activities,
        orchestrations,
        RuntimeOptions {
            orchestration_concurrency: 2,
            worker_concurrency: 2,
            ..Default::default()
        },
    )
    .await;
    let client = Client::new(p.clone());
    let started_at = Instant::now();
    for i in 0..n {
        client
            .start_orchestration(&format!("{prefix}-{i}"), "OneActivity", format!("{i}"))
            .await
            .unwrap();
    }
    for i in 0..n {
        let status = client
            .wait_for_orchestration(&format!("{prefix}-{i}"), Duration::from_secs(30))
            .await;
        match status {
            Ok(OrchestrationStatus::Completed { output, .. }) => {
                assert_eq!(output, format!("echo({i})"))
            }
            other => panic!("{prefix}-{i} did not complete: {other:?}"),
        }
    }
    let took = started_at.elapsed();
    rt.shutdown(None).await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_orphan_events_do_not_stall_new_orchestrations() {
    // The claim is one SQL function for both paths; the procedure path gets a smaller
    // backlog to keep the suite short.
    for (path, orphans) in [(FetchPath::Hybrid, 10_000), (FetchPath::Procedure, 1_000)] {
        let (p, _guard) = new_provider(path).await;
        // A few through the client API, the rest in one statement.
        let through_api: Vec<WorkItem> = (0..100)
            .map(|i| external(&format!("no-such-instance-{i}"), i))
            .collect();
        enqueue_all(&p, through_api).await;
        let bulk: Vec<WorkItem> = (100..orphans)
            .map(|i| external(&format!("no-such-instance-{i}"), i))
            .collect();
        enqueue_in_bulk(&p, bulk).await;

        // The orphans wait for their instances outside the claim indexes: a claim finds
        // nothing, and has no reason to look again soon.
        let sql = format!(
            "SELECT o_instance_id, o_next_wake_ms, o_skipped FROM {}.sp_fetch_and_lock(30000, FALSE, 0, 0, 0, 0, 0, 0)",
            quote_ident(p.schema())
        );
        let (id, wake, skipped): (Option<String>, Option<i64>, i32) =
            sqlx::query_as(&sql).fetch_one(p.pool()).await.unwrap();
        assert_eq!((id, wake, skipped), (None, None, 0), "{path}");

        five_starts_complete(p.clone(), "fresh", 5).await;

        // The orphans are kept (the contract keeps events sent before a start) and
        // reported.
        assert_eq!(
            count(
                &p,
                "SELECT count(*) FROM {s}.orchestrator_queue WHERE instance_id LIKE 'no-such-%'"
            )
            .await,
            orphans as i64
        );
        let stats = duroxide_pg_hybrid::inspect::stats(&p).await.unwrap();
        assert_eq!(
            stats.orchestrator.waiting_for_instance, orphans as i64,
            "{path}"
        );
        assert_eq!(
            stats.orchestrator.orphan_instances, orphans as i64,
            "{path}"
        );

        // An orphan's instance starting later receives its event in the first turn.
        p.enqueue_for_orchestrator(start_item("no-such-instance-7"), None)
            .await
            .unwrap();
        let (item, token, _) = p
            .fetch_orchestration_item(LOCK, Duration::ZERO, None)
            .await
            .unwrap()
            .expect("the started instance is claimable with its waiting event");
        assert_eq!(item.instance, "no-such-instance-7");
        assert_eq!(item.messages.len(), 2, "event and start in one batch");
        assert!(
            item.messages
                .iter()
                .any(|m| matches!(m, WorkItem::ExternalRaised { data, .. } if data == "7"))
        );
        p.abandon_orchestration_item(&token, None, true)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_pinned_outside_the_range_do_not_stall_compatible_work() {
    for (path, pinned) in [(FetchPath::Hybrid, 1_000), (FetchPath::Procedure, 100)] {
        let (p, _guard) = new_provider(path).await;
        let future_pin = semver::Version::new(9, 9, 9);
        futures::stream::iter(0..pinned)
            .map(|i| {
                let (p, pin) = (p.clone(), future_pin.clone());
                async move { create_instance(&p, &format!("pinned-{i}"), Some(pin)).await }
            })
            .buffer_unordered(4)
            .collect::<Vec<()>>()
            .await;
        // Each has runnable work that no default runtime may take.
        let events: Vec<WorkItem> = (0..pinned)
            .map(|i| external(&format!("pinned-{i}"), i))
            .collect();
        enqueue_in_bulk(&p, events).await;

        let filter = DispatcherCapabilityFilter::default_for_current_build();
        assert!(
            p.fetch_orchestration_item(LOCK, Duration::ZERO, Some(&filter))
                .await
                .unwrap()
                .is_none(),
            "{path}: nothing is compatible yet"
        );

        five_starts_complete(p.clone(), "compatible", 5).await;

        // The incompatible instances were never leased or counted as attempted.
        assert_eq!(
            count(&p, "SELECT count(*) FROM {s}.orchestrator_queue WHERE instance_id LIKE 'pinned-%' AND (lock_token IS NOT NULL OR attempt_count > 0)").await,
            0,
            "{path}"
        );
        // A runtime whose range covers the pin takes them.
        let wide = DispatcherCapabilityFilter {
            supported_duroxide_versions: vec![SemverRange::new(
                semver::Version::new(9, 0, 0),
                semver::Version::new(9, 9, 9),
            )],
        };
        let (item, _, _) = p
            .fetch_orchestration_item(LOCK, Duration::ZERO, Some(&wide))
            .await
            .unwrap()
            .expect("a wide range claims a pinned instance");
        assert!(item.instance.starts_with("pinned-"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_leased_instance_does_not_slow_other_claims() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    create_instance(&p, "hot", None).await;
    p.enqueue_for_orchestrator(external("hot", 0), None)
        .await
        .unwrap();
    let (hot, hot_token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hot.instance, "hot");

    // A message for the leased instance every millisecond, from another task.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (p, stop) = (p.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.enqueue_for_orchestrator(external("hot", n), None)
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n - 1
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Other instances are claimed on the first try, each one, while the messages pour in.
    for i in 0..50 {
        let id = format!("other-{i}");
        p.enqueue_for_orchestrator(start_item(&id), None)
            .await
            .unwrap();
        let (item, token, _) = p
            .fetch_orchestration_item(LOCK, Duration::ZERO, None)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} not claimed while hot is leased"));
        assert_eq!(item.instance, id);
        p.abandon_orchestration_item(&token, None, true)
            .await
            .unwrap();
        // Leave it out of the next claims.
        sqlx::query(&format!(
            "DELETE FROM {s}.orchestrator_queue WHERE instance_id = $1; ",
            s = quote_ident(p.schema())
        ))
        .bind(&id)
        .execute(p.pool())
        .await
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.await.unwrap();
    assert!(sent > 50, "the sender ran ({sent} messages)");

    // The claim state still says "leased": no message of the burst made the instance
    // claimable (enqueues for a leased instance only take a shared row lock).
    let (until, claimable): (Option<i64>, i64) = sqlx::query_as(&format!(
        "SELECT locked_until_ms, claimable_at_ms FROM {}.pending_instances WHERE instance_id = 'hot'",
        quote_ident(p.schema())
    ))
    .fetch_one(p.pool())
    .await
    .unwrap();
    assert!(until.is_some() && claimable >= until.unwrap());

    // After the ack, the next claim of "hot" takes every message that arrived meanwhile.
    p.ack_orchestration_item(
        &hot_token,
        1,
        vec![],
        vec![],
        vec![],
        metadata(None),
        vec![],
    )
    .await
    .unwrap();
    let (next, _, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("hot is claimable again after its ack");
    assert_eq!(next.instance, "hot");
    assert_eq!(next.messages.len() as i64, sent as i64);
}

/// The reproduction from the issue: a claim with a filter that excludes a pinned,
/// runnable instance runs inside an open transaction; an unfiltered claim meanwhile must
/// still get the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_with_different_filters_never_see_nothing_while_work_exists() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, common::short_polling).await;
    create_instance(&p, "pinned", Some(semver::Version::new(2, 0, 0))).await;
    p.enqueue_for_orchestrator(external("pinned", 1), None)
        .await
        .unwrap();
    let s = quote_ident(p.schema());

    let mut b = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    let (id_b,): (Option<String>,) = sqlx::query_as(&format!(
        "SELECT o_instance_id FROM {s}.sp_fetch_and_lock(30000, TRUE, 0, 0, 0, 1, 0, 0)"
    ))
    .fetch_one(&mut b)
    .await
    .unwrap();
    assert_eq!(id_b, None, "the filter excludes the 2.0.0 pin");

    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("the unfiltered claim gets the instance while B's transaction is open");
    assert_eq!(item.instance, "pinned");
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();

    // A stale pin in the claim state (as an older release leaves it): B's claim corrects
    // it and holds the row until B commits; the unfiltered claim meanwhile finds nothing
    // it can lock, and says to look again soon instead of sleeping.
    sqlx::query("ROLLBACK").execute(&mut b).await.unwrap();
    sqlx::query(&format!(
        "UPDATE {s}.pending_instances SET pinned_major = NULL, pinned_minor = NULL, pinned_patch = NULL"
    ))
    .execute(p.pool())
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    let (id_b, skipped_b): (Option<String>, i32) = sqlx::query_as(&format!(
        "SELECT o_instance_id, o_skipped FROM {s}.sp_fetch_and_lock(30000, TRUE, 0, 0, 0, 1, 0, 0)"
    ))
    .fetch_one(&mut b)
    .await
    .unwrap();
    assert_eq!((id_b, skipped_b), (None, 1));
    let (id_a, now_a, wake_a): (Option<String>, i64, Option<i64>) = sqlx::query_as(&format!(
        "SELECT o_instance_id, o_now_ms, o_next_wake_ms FROM {s}.sp_fetch_and_lock(30000, FALSE, 0, 0, 0, 0, 0, 0)"
    ))
    .fetch_one(p.pool())
    .await
    .unwrap();
    assert_eq!(id_a, None);
    let wake_in = wake_a.expect("a retry time while claimable work is held") - now_a;
    assert!(wake_in <= 20, "retry in {wake_in} ms");
    sqlx::query("COMMIT").execute(&mut b).await.unwrap();
    let (item, _, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("claimable once B committed");
    assert_eq!(item.instance, "pinned");
    // And B's filter still excludes it: the corrected pin keeps it out of B's index range.
    let (id_b,): (Option<String>,) = sqlx::query_as(&format!(
        "SELECT o_instance_id FROM {s}.sp_fetch_and_lock(30000, TRUE, 0, 0, 0, 1, 0, 0)"
    ))
    .fetch_one(&mut b)
    .await
    .unwrap();
    assert_eq!(id_b, None);
}

/// An idle long-polling dispatcher with 10,000 orphans queued sends no more statements
/// than with none: the orphans are outside the claim indexes, so the empty claim has no
/// next wake-up and the dispatcher sleeps until a notification or the fallback interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_dispatcher_cost_does_not_grow_with_orphans() {
    use duroxide_pg_hybrid_testkit::proxy::{Proxy, rewrite_url};
    let mut bursts = Vec::new();
    for orphans in [0usize, 10_000] {
        let (loader, guard) = new_provider(FetchPath::Hybrid).await;
        let items: Vec<WorkItem> = (0..orphans)
            .map(|i| external(&format!("ghost-{i}"), i))
            .collect();
        if !items.is_empty() {
            enqueue_in_bulk(&loader, items).await;
        }

        let url = database_url();
        let (_, upstream) = rewrite_url(&url, "127.0.0.1:1".parse().unwrap()).unwrap();
        let proxy = Proxy::start(upstream, Duration::ZERO).await.unwrap();
        let (via_proxy, _) = rewrite_url(&url, proxy.addr()).unwrap();
        let mut options = common::test_options(guard.schema(), FetchPath::Hybrid);
        options.fallback_poll_interval = Duration::from_secs(1);
        let idle = common::connect_waiting(&via_proxy, options).await.unwrap();
        let filter = DispatcherCapabilityFilter::default_for_current_build();
        // Warm-up (statement preparation, the LISTEN connection), then two seconds of
        // idle long polling.
        let _ = idle
            .fetch_orchestration_item(LOCK, Duration::from_millis(300), Some(&filter))
            .await
            .unwrap();
        let before = proxy.snapshot();
        let got = idle
            .fetch_orchestration_item(LOCK, Duration::from_secs(2), Some(&filter))
            .await
            .unwrap();
        assert!(got.is_none());
        bursts.push(proxy.snapshot().since(&before).bursts);
        idle.close().await;
    }
    // Two seconds at a 1 s fallback interval: a handful of claims, the same either way.
    assert!(
        bursts[0] <= 6,
        "idle without orphans: {} round trips",
        bursts[0]
    );
    assert!(
        bursts[1] <= bursts[0] + 1,
        "idle with 10,000 orphans: {} round trips, without: {}",
        bursts[1],
        bursts[0]
    );
}

/// The contract's orphan rules, applied when messages arrive (no claim ever has to look
/// at them): QueueMessages alone for an instance that does not exist are dropped; events
/// raised before the start wait for it, and so does anything queued with them.
#[tokio::test]
async fn orphan_rules_apply_on_arrival() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, common::short_polling).await;
    let queue_message = |instance: &str| WorkItem::QueueMessage {
        instance: instance.to_string(),
        name: "q".to_string(),
        data: "d".to_string(),
    };
    let rows = |instance: &'static str| {
        let p = p.clone();
        async move {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {}.orchestrator_queue WHERE instance_id = $1",
                quote_ident(p.schema())
            ))
            .bind(instance)
            .fetch_one(p.pool())
            .await
            .unwrap();
            n
        }
    };
    p.enqueue_for_orchestrator(queue_message("ghost"), None)
        .await
        .unwrap();
    assert_eq!(
        rows("ghost").await,
        0,
        "a lone QueueMessage orphan is dropped"
    );
    assert_eq!(
        count(
            &p,
            "SELECT count(*) FROM {s}.pending_instances WHERE instance_id = 'ghost'"
        )
        .await,
        0
    );

    enqueue_in_order(&p, [external("early", 1), queue_message("early")]).await;
    assert_eq!(
        rows("early").await,
        2,
        "an event raised before the start waits, with what follows it"
    );
    // The client enqueue keeps the claim state of a single non-QueueMessage itself (the
    // trigger only for QueueMessages): the waiting instance is outside the claim indexes.
    assert_eq!(
        count(
            &p,
            "SELECT count(*) FROM {s}.pending_instances WHERE instance_id = 'early' AND NOT runnable"
        )
        .await,
        1,
        "an instance that does not exist yet waits outside the claim indexes"
    );

    enqueue_in_order(&p, [start_item("real"), queue_message("real")]).await;
    assert_eq!(
        rows("real").await,
        2,
        "messages for a starting instance are kept"
    );

    p.enqueue_for_orchestrator(start_item("early"), None)
        .await
        .unwrap();
    assert_eq!(
        count(
            &p,
            "SELECT count(*) FROM {s}.pending_instances WHERE instance_id = 'early' AND runnable"
        )
        .await,
        1,
        "its start makes it claimable"
    );
    let mut seen = Vec::new();
    while let Some((item, token, _)) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
    {
        seen.push((item.instance.clone(), item.messages.len()));
        p.ack_orchestration_item(
            &token,
            1,
            vec![started_event(&item.instance)],
            vec![],
            vec![],
            metadata(None),
            vec![],
        )
        .await
        .unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![("early".to_string(), 3), ("real".to_string(), 2)]
    );
}
