//! In-process hand-over (`src/handover.rs`): an ack claims the work it makes runnable for
//! a fetch of the same provider that is already waiting, and the fetch returns it
//! without a round trip of its own.
//!
//! * an orchestration ack hands its activity to a waiting worker fetch, and a worker ack
//!   or a client enqueue hands the instance's next turn to a waiting orchestration fetch
//!   (both paths); the
//!   handed item is leased like a fetched one: renew, abandon, attempt count and lock
//!   expiry (with the waiter's lease length) behave the same;
//! * a waiter that is gone when the ack's reply arrives gets nothing, and the lease is
//!   released at once without counting an attempt;
//! * `handover: false` turns it off;
//! * tag filters, sessions and capability filters are respected: a waiter that could not
//!   fetch the item is not handed it.
//!
//! Hand-overs are counted through the provider's metrics (`duroxide_pg_handovers_total`),
//! so each test runs on a current-thread runtime with a local metrics recorder.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use common::{
    ack_with, activity_item, completion, counter, database_url, fan_out, first_turn, new_provider,
    new_provider_with, orchestration_metadata, start_item, started_event, with_metrics,
};
use duroxide::EventKind;
use duroxide::providers::{
    DispatcherCapabilityFilter, ExecutionMetadata, Provider, SemverRange, SessionFetchConfig,
    TagFilter, WorkItem,
};
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};
use duroxide_pg_hybrid_testkit::proxy::{Proxy, rewrite_url};
use metrics_util::debugging::Snapshotter;

const LOCK: Duration = Duration::from_secs(30);
const NOW: Duration = Duration::ZERO;
const WAIT: Duration = Duration::from_secs(10);

fn handovers(s: &Snapshotter, queue: &str) -> u64 {
    counter(s, "duroxide_pg_handovers_total", &[("queue", queue)])
}

fn released(s: &Snapshotter, queue: &str) -> u64 {
    counter(
        s,
        "duroxide_pg_handovers_released_total",
        &[("queue", queue)],
    )
}

/// (lock_token IS NULL, attempt_count) of the instance's worker row.
async fn worker_row(p: &PostgresProvider, instance: &str) -> (bool, i32) {
    let q = quote_ident(p.schema());
    sqlx::query_as(&format!(
        "SELECT lock_token IS NULL, attempt_count FROM {q}.worker_queue WHERE instance_id = $1"
    ))
    .bind(instance)
    .fetch_one(p.pool())
    .await
    .unwrap()
}

/// (instance lease held, max attempt_count) of the instance's queued messages.
async fn orchestrator_rows(p: &PostgresProvider, instance: &str) -> (bool, i32) {
    let q = quote_ident(p.schema());
    sqlx::query_as(&format!(
        "SELECT EXISTS (SELECT 1 FROM {q}.instance_locks WHERE instance_id = $1), \
                (SELECT coalesce(max(attempt_count), 0) FROM {q}.orchestrator_queue \
                 WHERE instance_id = $1)"
    ))
    .bind(instance)
    .fetch_one(p.pool())
    .await
    .unwrap()
}

/// Lets a spawned fetch do its first (empty) claim and start waiting.
async fn until_waiting() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

#[test]
fn activity_is_handed_to_a_waiting_worker_fetch_and_behaves_like_a_fetched_one() {
    with_metrics(|m| async move {
        let (p, _guard) = new_provider(FetchPath::Hybrid).await;
        let token = first_turn(&p, "ho-w").await;
        let w = p.clone();
        // The waiter's lease is 2 s: the handed item must carry it.
        let waiter = tokio::spawn(async move {
            w.fetch_work_item(Duration::from_secs(2), WAIT, None, &TagFilter::DefaultOnly)
                .await
        });
        until_waiting().await;
        ack_with(&p, &token, vec![activity_item("ho-w", 2)]).await;
        let (item, wtoken, attempts) = waiter.await.unwrap().unwrap().expect("handed over");
        assert!(matches!(item, WorkItem::ActivityExecute { id: 2, .. }));
        assert_eq!(attempts, 1);
        assert_eq!(handovers(&m, "worker"), 1, "taken by the ack, not fetched");
        let q = quote_ident(p.schema());
        let left: i64 = sqlx::query_scalar(&format!(
            "SELECT locked_until_ms - {q}.now_ms() FROM {q}.worker_queue WHERE lock_token = $1"
        ))
        .bind(&wtoken)
        .fetch_one(p.pool())
        .await
        .unwrap();
        assert!(
            (1_000..=2_000).contains(&left),
            "lease of the waiter's length, {left} ms left"
        );

        // Renew and abandon like a fetched item; the attempt counts as a fetch's does.
        p.renew_work_item_lock(&wtoken, Duration::from_secs(1))
            .await
            .unwrap();
        p.abandon_work_item(&wtoken, None, false).await.unwrap();
        let (_, t2, a2) = p
            .fetch_work_item(Duration::from_secs(1), NOW, None, &TagFilter::DefaultOnly)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a2, 2);
        // Lock expiry: taken again after the lease ends, attempt counted.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let (_, t3, a3) = p
            .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a3, 3);
        assert!(p.ack_work_item(&t2, None).await.is_err(), "expired lease");
        p.ack_work_item(&t3, Some(completion("ho-w", 2)))
            .await
            .unwrap();
        p.close().await;
    });
}

fn turn_is_handed_to_a_waiting_orchestration_fetch(path: FetchPath) {
    with_metrics(|m| async move {
        let (p, _guard) = new_provider(path).await;
        let token = first_turn(&p, "ho-o").await;
        ack_with(&p, &token, vec![activity_item("ho-o", 2)]).await;
        let (_, wtoken, _) = p
            .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
            .await
            .unwrap()
            .unwrap();
        let o = p.clone();
        let waiter =
            tokio::spawn(async move { o.fetch_orchestration_item(LOCK, WAIT, None).await });
        until_waiting().await;
        p.ack_work_item(&wtoken, Some(completion("ho-o", 2)))
            .await
            .unwrap();
        let (item, token, attempts) = waiter.await.unwrap().unwrap().expect("handed over");
        assert_eq!(handovers(&m, "orchestrator"), 1, "{path}: taken by the ack");
        assert_eq!(attempts, 1);
        assert_eq!(item.instance, "ho-o");
        assert_eq!(item.orchestration_name, "O");
        assert!(
            matches!(
                item.messages.as_slice(),
                [WorkItem::ActivityCompleted { id: 2, .. }]
            ),
            "{path}: {:?}",
            item.messages
        );
        // Renew and abandon like a fetched turn.
        p.renew_orchestration_item_lock(&token, LOCK).await.unwrap();
        p.abandon_orchestration_item(&token, None, false)
            .await
            .unwrap();
        let (again, token, attempts) = p
            .fetch_orchestration_item(LOCK, NOW, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(attempts, 2);
        assert_eq!(again.messages.len(), 1);
        ack_with(&p, &token, vec![]).await;
        p.close().await;
    });
}

#[test]
fn turn_is_handed_to_a_waiting_orchestration_fetch_hybrid() {
    turn_is_handed_to_a_waiting_orchestration_fetch(FetchPath::Hybrid);
}

#[test]
fn turn_is_handed_to_a_waiting_orchestration_fetch_procedure() {
    turn_is_handed_to_a_waiting_orchestration_fetch(FetchPath::Procedure);
}

/// A provider whose calls go through a proxy adding `rtt` (the schema made by `owner`).
async fn proxied(schema: &str, path: FetchPath, rtt: Duration) -> (Proxy, PostgresProvider) {
    let url = database_url();
    let (_, upstream) = rewrite_url(&url, "127.0.0.1:1".parse().unwrap()).unwrap();
    let proxy = Proxy::start(upstream, rtt).await.unwrap();
    let (via_proxy, _) = rewrite_url(&url, proxy.addr()).unwrap();
    let options = common::test_options(schema, path);
    let provider = common::connect_waiting(&via_proxy, options).await.unwrap();
    (proxy, provider)
}

/// Runs `call` while an orchestration fetch of `p` waits, and drops that fetch while the
/// call is on the wire (a quarter of `rtt` after sending it).
async fn drop_turn_waiter_during<F>(p: &std::sync::Arc<PostgresProvider>, rtt: Duration, call: F)
where
    F: Future<Output = Result<(), duroxide::providers::ProviderError>> + Send + 'static,
{
    let o = p.clone();
    let waiter = tokio::spawn(async move { o.fetch_orchestration_item(LOCK, WAIT, None).await });
    tokio::time::sleep(rtt * 3).await;
    let call = tokio::spawn(call);
    tokio::time::sleep(rtt / 4).await;
    waiter.abort();
    call.await.unwrap().unwrap();
}

/// Waits (5 s at most) until `instance`'s messages are unleased with no attempt counted.
async fn until_turn_released(p: &PostgresProvider, instance: &str) {
    let t = Instant::now();
    while orchestrator_rows(p, instance).await != (false, 0) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the turn handed over for {instance} was not released: {:?}",
            orchestrator_rows(p, instance).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The waiter's fetch is dropped while the ack that claimed for it is on the wire: the
/// reply finds nobody, and the lease goes back at once with the attempt not counted.
#[test]
fn a_waiter_gone_before_the_reply_gets_its_item_released_without_an_attempt() {
    with_metrics(|m| async move {
        let rtt = Duration::from_millis(400);
        let (_owner, guard) = new_provider(FetchPath::Hybrid).await;
        let (_proxy, p) = proxied(guard.schema(), FetchPath::Hybrid, rtt).await;
        let p = std::sync::Arc::new(p);

        // Worker queue: an orchestration ack claims for a worker fetch that is dropped.
        let token = first_turn(&p, "ho-gone").await;
        let w = p.clone();
        let waiter = tokio::spawn(async move {
            w.fetch_work_item(LOCK, WAIT, None, &TagFilter::DefaultOnly)
                .await
        });
        tokio::time::sleep(rtt * 3).await;
        let a = p.clone();
        let ack = tokio::spawn(async move {
            a.ack_orchestration_item(
                &token,
                1,
                vec![],
                vec![activity_item("ho-gone", 2)],
                vec![],
                orchestration_metadata(),
                vec![],
            )
            .await
        });
        tokio::time::sleep(rtt / 4).await;
        waiter.abort();
        ack.await.unwrap().unwrap();
        let t = Instant::now();
        while worker_row(&p, "ho-gone").await != (true, 0) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the handed item was not released: {:?}",
                worker_row(&p, "ho-gone").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(released(&m, "worker"), 1);
        assert_eq!(handovers(&m, "worker"), 0);
        let (_, wtoken, attempts) = p
            .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(attempts, 1, "the released claim did not count");

        // Orchestrator queue: a worker ack claims the turn for a fetch that is dropped.
        let a = p.clone();
        drop_turn_waiter_during(&p, rtt, async move {
            a.ack_work_item(&wtoken, Some(completion("ho-gone", 2)))
                .await
        })
        .await;
        until_turn_released(&p, "ho-gone").await;
        assert_eq!(released(&m, "orchestrator"), 1);
        assert_eq!(handovers(&m, "orchestrator"), 0);
        let (item, _, attempts) = p
            .fetch_orchestration_item(LOCK, NOW, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(attempts, 1, "the released claim did not count");
        assert_eq!(item.messages.len(), 1);

        // A client enqueue claims the turn for a fetch that is dropped.
        let c = p.clone();
        drop_turn_waiter_during(&p, rtt, async move {
            c.enqueue_for_orchestrator(start_item("ho-gone-c"), None)
                .await
        })
        .await;
        until_turn_released(&p, "ho-gone-c").await;
        assert_eq!(released(&m, "orchestrator"), 2);
        assert_eq!(handovers(&m, "orchestrator"), 0);
        let (item, _, attempts) = p
            .fetch_orchestration_item(LOCK, NOW, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(item.instance, "ho-gone-c");
        assert_eq!(attempts, 1, "the released claim did not count");
        p.close().await;
    });
}

#[test]
fn handover_off_by_option() {
    with_metrics(|m| async move {
        let (p, _guard) = new_provider_with(FetchPath::Procedure, |o| o.handover = false).await;
        let token = first_turn(&p, "ho-off").await;
        let w = p.clone();
        let waiter = tokio::spawn(async move {
            w.fetch_work_item(LOCK, WAIT, None, &TagFilter::DefaultOnly)
                .await
        });
        until_waiting().await;
        ack_with(&p, &token, vec![activity_item("ho-off", 2)]).await;
        // Fetched after the notification instead.
        let (_, wtoken, attempts) = waiter.await.unwrap().unwrap().expect("fetched");
        assert_eq!(attempts, 1);
        let o = p.clone();
        let waiter =
            tokio::spawn(async move { o.fetch_orchestration_item(LOCK, WAIT, None).await });
        until_waiting().await;
        p.ack_work_item(&wtoken, Some(completion("ho-off", 2)))
            .await
            .unwrap();
        let (_, token, _) = waiter.await.unwrap().unwrap().expect("fetched");
        ack_with(&p, &token, vec![]).await;
        assert_eq!(handovers(&m, "worker"), 0);
        assert_eq!(handovers(&m, "orchestrator"), 0);
        p.close().await;
    });
}

/// A waiter whose filter does not admit the new work is not handed it: tags, sessions,
/// and the orchestration fetch's capability filter.
#[test]
fn waiters_get_only_what_their_filters_admit() {
    with_metrics(|m| async move {
        let (p, _guard) = new_provider(FetchPath::Hybrid).await;
        let short = Duration::from_millis(1_500);

        // Tags: a "gpu" waiter and an untagged activity.
        let token = first_turn(&p, "ho-tag").await;
        let w = p.clone();
        let gpu = TagFilter::Tags(HashSet::from(["gpu".to_string()]));
        let waiter = tokio::spawn(async move { w.fetch_work_item(LOCK, short, None, &gpu).await });
        until_waiting().await;
        ack_with(&p, &token, vec![activity_item("ho-tag", 2)]).await;
        assert!(waiter.await.unwrap().unwrap().is_none());
        assert_eq!(worker_row(&p, "ho-tag").await, (true, 0), "left queued");

        // Sessions: a waiter that takes no sessions and a session item.
        let session_item = |instance: &str| WorkItem::ActivityExecute {
            instance: instance.to_string(),
            execution_id: 1,
            id: 2,
            name: "A".to_string(),
            input: "in".to_string(),
            session_id: Some("s1".to_string()),
            tag: None,
        };
        let token = first_turn(&p, "ho-sess").await;
        let w = p.clone();
        let waiter = tokio::spawn(async move {
            w.fetch_work_item(LOCK, short, None, &TagFilter::DefaultOnly)
                .await
        });
        until_waiting().await;
        ack_with(&p, &token, vec![session_item("ho-sess")]).await;
        // It may still fetch the untagged "ho-tag" item, never the session item.
        if let Some((item, t, _)) = waiter.await.unwrap().unwrap() {
            assert!(
                matches!(&item, WorkItem::ActivityExecute { instance, .. } if instance == "ho-tag")
            );
            p.abandon_work_item(&t, None, true).await.unwrap();
        }
        assert_eq!(worker_row(&p, "ho-sess").await, (true, 0), "left queued");
        assert_eq!(handovers(&m, "worker"), 0);

        // A waiter that takes sessions gets it, and owns the session as a fetch would.
        let token = first_turn(&p, "ho-sess2").await;
        let w = p.clone();
        let waiter = tokio::spawn(async move {
            let cfg = SessionFetchConfig {
                owner_id: "owner-a".to_string(),
                lock_timeout: LOCK,
            };
            w.fetch_work_item(
                LOCK,
                WAIT,
                Some(&cfg),
                &TagFilter::Tags(HashSet::from(["x".to_string()])),
            )
            .await
        });
        until_waiting().await;
        let tagged_session = WorkItem::ActivityExecute {
            instance: "ho-sess2".to_string(),
            execution_id: 1,
            id: 2,
            name: "A".to_string(),
            input: "in".to_string(),
            session_id: Some("s2".to_string()),
            tag: Some("x".to_string()),
        };
        ack_with(&p, &token, vec![tagged_session]).await;
        let (item, _, _) = waiter.await.unwrap().unwrap().expect("handed over");
        assert!(
            matches!(&item, WorkItem::ActivityExecute { session_id: Some(s), .. } if s == "s2")
        );
        assert_eq!(handovers(&m, "worker"), 1);
        let q = quote_ident(p.schema());
        let owner: String = sqlx::query_scalar(&format!(
            "SELECT worker_id FROM {q}.sessions WHERE session_id = 's2'"
        ))
        .fetch_one(p.pool())
        .await
        .unwrap();
        assert_eq!(owner, "owner-a");

        // Capability filter: the instance is pinned at 9.9.9, the waiter runs 0.1.x.
        let token = first_turn(&p, "ho-pin").await;
        let pinned = ExecutionMetadata {
            pinned_duroxide_version: Some(semver::Version::new(9, 9, 9)),
            ..orchestration_metadata()
        };
        p.ack_orchestration_item(
            &token,
            1,
            vec![],
            vec![activity_item("ho-pin", 2)],
            vec![],
            pinned,
            vec![],
        )
        .await
        .unwrap();
        // The untagged items left above are in the queue too: take the pinned one.
        let wtoken = loop {
            let (item, t, _) = p
                .fetch_work_item(LOCK, NOW, None, &TagFilter::DefaultOnly)
                .await
                .unwrap()
                .unwrap();
            match item {
                WorkItem::ActivityExecute { instance, .. } if instance == "ho-pin" => break t,
                _ => p.ack_work_item(&t, None).await.unwrap(),
            }
        };
        let o = p.clone();
        let waiter = tokio::spawn(async move {
            let filter = DispatcherCapabilityFilter {
                supported_duroxide_versions: vec![SemverRange {
                    min: semver::Version::new(0, 1, 0),
                    max: semver::Version::new(0, 1, 99),
                }],
            };
            o.fetch_orchestration_item(LOCK, short, Some(&filter)).await
        });
        until_waiting().await;
        p.ack_work_item(&wtoken, Some(completion("ho-pin", 2)))
            .await
            .unwrap();
        assert!(waiter.await.unwrap().unwrap().is_none());
        assert_eq!(handovers(&m, "orchestrator"), 0);
        assert_eq!(
            orchestrator_rows(&p, "ho-pin").await,
            (false, 0),
            "left queued"
        );
        p.close().await;
    });
}

/// A completion while other activities of the instance are still outstanding (a fan-out
/// not yet joined) is not handed over: a fetch takes it (and whatever else arrived)
/// later. The last one is.
#[test]
fn only_the_last_outstanding_activity_hands_its_turn_over() {
    with_metrics(|m| async move {
        let (p, _guard) = new_provider(FetchPath::Procedure).await;
        let tokens = fan_out(&p, "ho-fan", 2).await;
        for (n, (t, id)) in tokens.iter().zip([1u64, 2]).enumerate() {
            let o = p.clone();
            let waiter =
                tokio::spawn(async move { o.fetch_orchestration_item(LOCK, WAIT, None).await });
            until_waiting().await;
            p.ack_work_item(t, Some(completion("ho-fan", id)))
                .await
                .unwrap();
            let (item, token, _) = waiter.await.unwrap().unwrap().expect("a turn");
            assert_eq!(item.messages.len(), 1);
            assert_eq!(
                handovers(&m, "orchestrator"),
                n as u64,
                "completion {n}: handed over only when nothing else is outstanding"
            );
            ack_with(&p, &token, vec![]).await;
        }
        p.close().await;
    });
}

fn raised(instance: &str, data: &str) -> WorkItem {
    WorkItem::ExternalRaised {
        instance: instance.to_string(),
        name: "E".to_string(),
        data: data.to_string(),
    }
}

/// Fetches `p`'s next turn in the background, once that fetch waits after an empty claim.
async fn waiting_turn_fetch(
    p: &std::sync::Arc<PostgresProvider>,
) -> tokio::task::JoinHandle<
    Result<
        Option<(duroxide::providers::OrchestrationItem, String, u32)>,
        duroxide::providers::ProviderError,
    >,
> {
    let o = p.clone();
    let waiter = tokio::spawn(async move { o.fetch_orchestration_item(LOCK, WAIT, None).await });
    until_waiting().await;
    waiter
}

/// A client enqueue (a start, then an event) while a fetch of the same provider waits:
/// the enqueue claims the instance's turn for it, with its history on both paths; a
/// delayed enqueue, and one for an instance whose turn is leased elsewhere, are left to
/// the fetches as before.
fn client_enqueue_hands_the_turn_to_a_waiting_fetch(path: FetchPath) {
    with_metrics(|m| async move {
        let (p, _guard) = new_provider(path).await;
        let waiter = waiting_turn_fetch(&p).await;
        p.enqueue_for_orchestrator(start_item("ho-cl"), None)
            .await
            .unwrap();
        let (item, token, attempts) = waiter.await.unwrap().unwrap().expect("handed over");
        assert_eq!(
            handovers(&m, "orchestrator"),
            1,
            "{path}: the start is handed over"
        );
        assert_eq!(attempts, 1);
        assert!(item.history.is_empty(), "{path}: {:?}", item.history);
        assert!(
            matches!(
                item.messages.as_slice(),
                [WorkItem::StartOrchestration { .. }]
            ),
            "{path}: {:?}",
            item.messages
        );
        p.ack_orchestration_item(
            &token,
            1,
            vec![started_event("ho-cl")],
            vec![],
            vec![],
            orchestration_metadata(),
            vec![],
        )
        .await
        .unwrap();

        // An event to the running instance: its turn, history included.
        let waiter = waiting_turn_fetch(&p).await;
        p.enqueue_for_orchestrator(raised("ho-cl", "one"), None)
            .await
            .unwrap();
        let (item, token, attempts) = waiter.await.unwrap().unwrap().expect("handed over");
        assert_eq!(
            handovers(&m, "orchestrator"),
            2,
            "{path}: the event is handed over"
        );
        assert_eq!(attempts, 1);
        assert_eq!(item.orchestration_name, "O");
        assert!(
            matches!(
                item.history.as_slice(),
                [e] if matches!(e.kind, EventKind::OrchestrationStarted { .. })
            ),
            "{path}: {:?}",
            item.history
        );
        assert!(
            matches!(item.messages.as_slice(), [WorkItem::ExternalRaised { data, .. }] if data == "one"),
            "{path}: {:?}",
            item.messages
        );

        // While that turn is leased, an event cannot be handed over: the waiter takes it
        // once the turn ends (the lease-end wakes it), as any fetch would.
        let waiter = waiting_turn_fetch(&p).await;
        p.enqueue_for_orchestrator(raised("ho-cl", "two"), None)
            .await
            .unwrap();
        assert_eq!(
            handovers(&m, "orchestrator"),
            2,
            "{path}: leased, not handed"
        );
        assert!(!waiter.is_finished(), "{path}: nothing claimable yet");
        ack_with(&p, &token, vec![]).await;
        let (item, token, _) = waiter
            .await
            .unwrap()
            .unwrap()
            .expect("fetched after the turn");
        assert!(
            matches!(item.messages.as_slice(), [WorkItem::ExternalRaised { data, .. }] if data == "two"),
            "{path}: {:?}",
            item.messages
        );
        ack_with(&p, &token, vec![]).await;

        // A delayed item is not visible now: nothing is claimed for the waiter.
        let waiter = waiting_turn_fetch(&p).await;
        p.enqueue_for_orchestrator(raised("ho-cl", "late"), Some(Duration::from_millis(700)))
            .await
            .unwrap();
        assert_eq!(
            handovers(&m, "orchestrator"),
            2,
            "{path}: delayed, not handed"
        );
        let (item, token, _) = waiter
            .await
            .unwrap()
            .unwrap()
            .expect("fetched when visible");
        assert_eq!(item.messages.len(), 1);
        ack_with(&p, &token, vec![]).await;
        assert_eq!(released(&m, "orchestrator"), 0);
        p.close().await;
    });
}

#[test]
fn client_enqueue_hands_the_turn_to_a_waiting_fetch_hybrid() {
    client_enqueue_hands_the_turn_to_a_waiting_fetch(FetchPath::Hybrid);
}

#[test]
fn client_enqueue_hands_the_turn_to_a_waiting_fetch_procedure() {
    client_enqueue_hands_the_turn_to_a_waiting_fetch(FetchPath::Procedure);
}
