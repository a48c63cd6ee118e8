//! Fault paths of issue 11 ("nothing run twice, nobody left waiting"), through the testkit
//! proxy where the fault is on the wire:
//!
//! * a reply lost after the commit (PgBouncer's `08P01 server conn crashed?`): an enqueue
//!   is delivered once, a turn claim is not sent twice (retryable error instead), a worker
//!   claim sent again returns the item it leased, a worker ack
//!   and an orchestration ack that committed report success (the latter handing over
//!   again what its lost reply handed over); an enqueue that claimed the turn for a waiting fetch
//!   of its process gives that turn back when resent (attempt not counted);
//! * a request that never reached the server is sent again (`renew_work_item_lock`);
//! * a connection a load balancer silently dropped while idle costs no failed call;
//! * a bulk delete of 1,000 trees of 11 stays within the server's lock table; a full
//!   lock table is classified (permanent for deletes, retryable for runtime calls);
//! * an undecodable worker row is poisoned by the runtime after `max_attempts`.
//! * a short poll does not answer "no work" while the only runnable instance is held by
//!   a claim in flight that then rolls back.
//! * the resend ledger drops ids past their 15 minutes and keeps recent ones.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    activity_item, database_url, new_provider, new_provider_with, start_item, test_options,
};
use duroxide::providers::{InstanceFilter, Provider, ProviderAdmin, TagFilter, WorkItem};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions, UnregisteredBackoffConfig};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::errors::db_error;
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{FetchPath, PostgresProvider, ProviderOptions};
use duroxide_pg_hybrid_testkit::proxy::{Proxy, rewrite_url};
use sqlx::Connection;

const LOCK: Duration = Duration::from_secs(30);

/// A proxy in front of the test server and a provider on `schema` connected through it
/// (short polling, so nothing but the calls under test crosses the proxy).
async fn proxied(
    schema: &str,
    customize: impl FnOnce(&mut ProviderOptions),
) -> (Proxy, PostgresProvider) {
    let upstream = rewrite_url(&database_url(), "127.0.0.1:1".parse().unwrap())
        .unwrap()
        .1;
    let proxy = Proxy::start(upstream, Duration::ZERO).await.unwrap();
    let (url, _) = rewrite_url(&database_url(), proxy.addr()).unwrap();
    let mut options = test_options(schema, FetchPath::Hybrid);
    options.long_poll = false;
    options.min_connections = 1;
    customize(&mut options);
    let p = common::connect_waiting(&url, options).await.unwrap();
    (proxy, p)
}

async fn scalar(p: &PostgresProvider, sql: &str) -> i64 {
    let sql = sql.replace("{s}", &quote_ident(p.schema()));
    sqlx::query_scalar(&sql)
        .fetch_one(p.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn ok_or_retryable<T: std::fmt::Debug>(
    what: &str,
    r: &Result<T, duroxide::providers::ProviderError>,
) {
    if let Err(e) = r {
        assert!(
            e.is_retryable(),
            "{what}: must succeed or fail retryable: {e}"
        );
    }
}

// ---- exactly once under resends -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_a_committed_enqueue_delivers_once() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |_| {}).await;

    proxy.faults().swallow_next_reply_with_08p01();
    let r = p.enqueue_for_orchestrator(start_item("once-o"), None).await;
    assert!(!proxy.faults().armed(), "the fault fired: {r:?}");
    ok_or_retryable("enqueue_for_orchestrator", &r);
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.orchestrator_queue WHERE instance_id = 'once-o'"
        )
        .await,
        1,
        "a resent enqueue delivered the message twice"
    );

    proxy.faults().swallow_next_reply_with_08p01();
    let r = p.enqueue_for_worker(activity_item("once-w", 1)).await;
    assert!(!proxy.faults().armed(), "the fault fired: {r:?}");
    ok_or_retryable("enqueue_for_worker", &r);
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.worker_queue WHERE instance_id = 'once-w'"
        )
        .await,
        1,
        "a resent enqueue queued the activity twice"
    );
    // Delayed enqueues take the same path.
    proxy.faults().swallow_next_reply_with_08p01();
    let r = p
        .enqueue_for_orchestrator(start_item("once-d"), Some(Duration::from_secs(60)))
        .await;
    ok_or_retryable("delayed enqueue", &r);
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.orchestrator_queue WHERE instance_id = 'once-d'"
        )
        .await,
        1
    );
    p.close().await;
    let _ = direct;
}

/// The enqueue claimed the instance's turn for a fetch of its own provider that waits
/// (hand-over), and its reply is lost: the resend finds the item queued and gives the
/// turn back at once, attempt not counted, and the waiting fetch then claims it itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_an_enqueue_that_handed_a_turn_over_gives_the_turn_back() {
    let (direct, guard) = new_provider(FetchPath::Procedure).await;
    let (proxy, p) = proxied(guard.schema(), |o| {
        o.long_poll = true;
        o.fetch_path = Some(FetchPath::Procedure);
    })
    .await;
    let p = Arc::new(p);
    let o = p.clone();
    let waiter = tokio::spawn(async move {
        o.fetch_orchestration_item(LOCK, Duration::from_secs(10), None)
            .await
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.faults().swallow_next_reply_with_08p01();
    p.enqueue_for_orchestrator(start_item("once-h"), None)
        .await
        .expect("the resend of an enqueue that committed reports success");
    assert!(!proxy.faults().armed(), "the fault fired");
    let (item, _, attempts) = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("the waiting fetch gets the turn");
    assert_eq!(item.instance, "once-h");
    assert_eq!(item.messages.len(), 1);
    assert_eq!(attempts, 1, "the turn given back did not count an attempt");
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.orchestrator_queue WHERE instance_id = 'once-h'"
        )
        .await,
        1,
        "queued once"
    );
    p.close().await;
    let _ = direct;
}

/// A turn claim whose reply is lost is sent again with the same token and returns the
/// claim its first attempt committed: the same instance, one lease, one attempt counted,
/// and an ack with the returned token completes the turn. (Before, the call failed and
/// the instance stayed leased until the lease ran out.)
async fn a_lost_turn_claim_reply_is_answered_by_its_resend(path: FetchPath) {
    let (direct, guard) = new_provider(path).await;
    let (proxy, p) = proxied(guard.schema(), |o| o.fetch_path = Some(path)).await;
    direct
        .enqueue_for_orchestrator(start_item("claim-o"), None)
        .await
        .unwrap();
    direct
        .enqueue_for_orchestrator(start_item("claim-other"), None)
        .await
        .unwrap();

    proxy.faults().swallow_next_reply_with_08p01();
    let (item, lock_token, attempts) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .expect("the resent claim answers")
        .expect("the claim the first attempt made");
    assert!(!proxy.faults().armed(), "the fault fired ({path:?})");
    assert_eq!(attempts, 1, "one attempt counted ({path:?})");
    assert_eq!(item.messages.len(), 1, "{path:?}");
    assert_eq!(item.history_error, None, "{path:?}");
    assert_eq!(
        scalar(&p, "SELECT count(*) FROM {s}.instance_locks").await,
        1,
        "one lease, not a second instance claimed by the resend ({path:?})"
    );
    let leased: String = sqlx::query_scalar(&format!(
        "SELECT instance_id FROM {}.instance_locks WHERE lock_token = $1",
        quote_ident(p.schema())
    ))
    .bind(&lock_token)
    .fetch_one(p.pool())
    .await
    .unwrap();
    assert_eq!(
        leased, item.instance,
        "the returned token is the live lease's"
    );
    assert_eq!(
        scalar(
            &p,
            "SELECT max(attempt_count)::BIGINT FROM {s}.orchestrator_queue WHERE lock_token IS NOT NULL"
        )
        .await,
        1
    );
    p.abandon_orchestration_item(&lock_token, None, false)
        .await
        .expect("the returned lease is the live one");
    assert_eq!(
        scalar(&p, "SELECT count(*) FROM {s}.instance_locks").await,
        0,
        "the abandon ended it"
    );
    p.close().await;
    let _ = direct;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_turn_claim_reply_is_answered_by_its_resend_hybrid() {
    a_lost_turn_claim_reply_is_answered_by_its_resend(FetchPath::Hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_turn_claim_reply_is_answered_by_its_resend_procedure() {
    a_lost_turn_claim_reply_is_answered_by_its_resend(FetchPath::Procedure).await;
}

/// The resend rule in SQL: a resend finds the first attempt's lease only while it is
/// live; after it expired, the resend claims as usual under a token of its own, so the
/// expired lease's token (and the batch it tagged) is never taken for the new claim's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_turn_claim_never_reuses_an_expired_leases_token() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    p.enqueue_for_orchestrator(start_item("exp-o"), None)
        .await
        .unwrap();
    let s = quote_ident(p.schema());
    let claim = |resend: bool| {
        format!(
            "SELECT o_instance_id, o_lock_token, o_attempt_count FROM {s}.sp_fetch_and_lock(\
             p_lock_timeout_ms => 30000, p_filter_enabled => FALSE, p_min_major => 0, \
             p_min_minor => 0, p_min_patch => 0, p_max_major => 0, p_max_minor => 0, \
             p_max_patch => 0, p_lock_token => 'lock_first', p_resend => {resend})"
        )
    };
    type Row = (Option<String>, Option<String>, Option<i32>);
    let first: Row = sqlx::query_as(&claim(false))
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(
        first,
        (Some("exp-o".into()), Some("lock_first".into()), Some(1)),
        "the first attempt leases under the caller's token"
    );
    let again: Row = sqlx::query_as(&claim(true))
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(again, first, "a resend while the lease lives returns it");

    // The lease runs out (and the claim state says so).
    for table in ["instance_locks", "pending_instances"] {
        sqlx::query(&format!(
            "UPDATE {s}.{table} SET locked_until_ms = 0{}",
            if table == "pending_instances" {
                ", claimable_at_ms = 0"
            } else {
                ""
            }
        ))
        .execute(p.pool())
        .await
        .unwrap();
    }
    let (instance, token, attempts): Row = sqlx::query_as(&claim(true))
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(instance.as_deref(), Some("exp-o"), "claimed again as usual");
    assert_ne!(
        token.as_deref(),
        Some("lock_first"),
        "under a token of its own"
    );
    assert_eq!(attempts, Some(2), "a second attempt");
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.orchestrator_queue WHERE lock_token = 'lock_first'"
        )
        .await,
        0,
        "the batch is tagged with the new token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_a_worker_claim_returns_its_item() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |_| {}).await;
    direct
        .enqueue_for_worker(activity_item("claim-w", 1))
        .await
        .unwrap();

    // The worker claim carries its token from the caller: its resend gets the item the
    // lost reply carried (same lease, one attempt), not a second one.
    direct
        .enqueue_for_worker(activity_item("claim-w", 2))
        .await
        .unwrap();
    proxy.faults().swallow_next_reply_with_08p01();
    let (item, token, attempts) = p
        .fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
        .await
        .expect("a resent worker claim returns what its first attempt leased")
        .expect("an item");
    assert!(!proxy.faults().armed(), "the fault fired");
    assert!(
        matches!(item, WorkItem::ActivityExecute { id: 1, .. }),
        "{item:?}"
    );
    assert_eq!(attempts, 1);
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.worker_queue WHERE lock_token IS NOT NULL"
        )
        .await,
        1,
        "one item leased"
    );
    assert_eq!(
        scalar(
            &p,
            "SELECT max(attempt_count)::BIGINT FROM {s}.worker_queue WHERE instance_id = 'claim-w'"
        )
        .await,
        1
    );
    p.ack_work_item(&token, None)
        .await
        .expect("the returned lease is the live one");
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_a_committed_worker_ack_reports_success() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |_| {}).await;
    direct
        .enqueue_for_worker(activity_item("ack-w", 2))
        .await
        .unwrap();
    let (_, token, _) = p
        .fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
        .await
        .unwrap()
        .unwrap();
    let completion = WorkItem::ActivityCompleted {
        instance: "ack-w".to_string(),
        execution_id: 1,
        id: 2,
        result: "r".to_string(),
    };
    proxy.faults().swallow_next_reply_with_08p01();
    p.ack_work_item(&token, Some(completion.clone()))
        .await
        .expect("a resent ack that had committed reports success");
    assert!(!proxy.faults().armed(), "the fault fired");
    assert_eq!(scalar(&p, "SELECT count(*) FROM {s}.worker_queue").await, 0);
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.orchestrator_queue WHERE instance_id = 'ack-w'"
        )
        .await,
        1,
        "the completion is delivered once"
    );
    // A second, separate ack of the same token still fails (contract).
    let e = p
        .ack_work_item(&token, Some(completion))
        .await
        .expect_err("a second ack of one token");
    assert!(!e.is_retryable(), "{e}");
    p.close().await;
}

/// Acks `inst`'s first turn: its start event and activity 1.
async fn first_turn_schedules_one_activity(p: &PostgresProvider, token: &str, inst: &str) {
    common::ack_events(
        p,
        token,
        vec![common::started_event(inst)],
        vec![activity_item(inst, 1)],
    )
    .await;
}

/// An orchestration ack whose reply is lost after it committed: the provider sends it
/// again under the same call id and reports success (history, activity and lease end
/// applied once); a second, separate ack of the token still fails (contract).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_a_committed_orchestration_ack_reports_success() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |_| {}).await;
    let inst = "ack-o";
    let token = common::first_turn(&p, inst).await;
    proxy.faults().swallow_next_reply_with_08p01();
    first_turn_schedules_one_activity(&p, &token, inst).await;
    assert!(!proxy.faults().armed(), "the fault fired");
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.history WHERE instance_id = 'ack-o'"
        )
        .await,
        1,
        "the turn's event is written once"
    );
    assert_eq!(scalar(&p, "SELECT count(*) FROM {s}.worker_queue").await, 1);
    assert_eq!(
        scalar(&p, "SELECT count(*) FROM {s}.instance_locks").await,
        0
    );
    let e = p
        .ack_orchestration_item(
            &token,
            1,
            vec![],
            vec![],
            vec![],
            common::orchestration_metadata(),
            vec![],
        )
        .await
        .expect_err("a second ack of one token");
    assert!(!e.is_retryable(), "{e}");
    p.close().await;
    let _ = direct;
}

/// The same with hand-over: the lost reply carried the activity this ack claimed for a
/// worker fetch of its process that waits. The resend hands the same item over again
/// (still leased under that fetch's token): the waiter gets it at once, attempt 1, not
/// after its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_an_orchestration_ack_that_handed_an_activity_over() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |o| o.long_poll = true).await;
    let p = Arc::new(p);
    let inst = "ack-h";
    let token = common::first_turn(&p, inst).await;
    let w = p.clone();
    let waiter = tokio::spawn(async move {
        w.fetch_work_item(LOCK, Duration::from_secs(10), None, &TagFilter::Any)
            .await
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.faults().swallow_next_reply_with_08p01();
    let started = Instant::now();
    first_turn_schedules_one_activity(&p, &token, inst).await;
    assert!(!proxy.faults().armed(), "the fault fired");
    let (item, _, attempts) = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("the waiting fetch gets the activity");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "handed over after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(item, WorkItem::ActivityExecute { id: 1, .. }),
        "{item:?}"
    );
    assert_eq!(attempts, 1);
    assert_eq!(
        scalar(
            &p,
            "SELECT count(*) FROM {s}.worker_queue WHERE instance_id = 'ack-h'"
        )
        .await,
        1,
        "queued once"
    );
    p.close().await;
    let _ = direct;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_that_never_reached_the_server_is_sent_again() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |_| {}).await;
    direct
        .enqueue_for_worker(activity_item("renew-w", 1))
        .await
        .unwrap();
    let (_, token, _) = p
        .fetch_work_item(
            Duration::from_secs(5),
            Duration::ZERO,
            None,
            &TagFilter::Any,
        )
        .await
        .unwrap()
        .unwrap();
    proxy.faults().drop_next_request();
    p.renew_work_item_lock(&token, Duration::from_secs(60))
        .await
        .expect("a renewal whose request never left must not cancel the activity");
    assert!(!proxy.faults().armed(), "the fault fired");
    let left = scalar(
        &p,
        "SELECT locked_until_ms - {s}.now_ms() FROM {s}.worker_queue WHERE instance_id = 'renew-w'",
    )
    .await;
    assert!(left > 50_000, "the lease was extended: {left} ms left");
    // A claim whose request never left is also sent again (nothing ran).
    direct
        .enqueue_for_orchestrator(start_item("renew-o"), None)
        .await
        .unwrap();
    proxy.faults().drop_next_request();
    let r = p.fetch_orchestration_item(LOCK, Duration::ZERO, None).await;
    assert!(!proxy.faults().armed(), "the fault fired: {r:?}");
    ok_or_retryable("claim after a dropped request", &r);
    p.close().await;
}

// ---- the own pool: idle timeout -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_by_a_load_balancer_while_idle_costs_no_failed_call() {
    let (direct, guard) = new_provider(FetchPath::Hybrid).await;
    let (proxy, p) = proxied(guard.schema(), |o| {
        o.idle_timeout = Some(Duration::from_millis(800));
    })
    .await;
    direct
        .enqueue_for_orchestrator(start_item("idle-o"), None)
        .await
        .unwrap();
    assert!(
        p.fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
            .await
            .unwrap()
            .is_none()
    );
    // The "load balancer" drops flows idle for 1.2 s without telling either end.
    proxy
        .faults()
        .set_idle_cut(Some(Duration::from_millis(1200)));
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        proxy
            .faults()
            .fired
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the idle cut dropped the pooled connection"
    );
    proxy.faults().set_idle_cut(None);
    let started = Instant::now();
    let claimed = tokio::time::timeout(
        Duration::from_secs(10),
        p.fetch_orchestration_item(LOCK, Duration::ZERO, None),
    )
    .await
    .expect("a call on a silently dropped connection hangs")
    .expect("the first call after the idle period must not fail")
    .expect("the queued item");
    assert_eq!(claimed.0.instance, "idle-o");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    p.close().await;
}

// ---- bounded, classified failures -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_delete_of_1000_trees_of_11_stays_within_the_lock_table() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    let locks_per_tx: String = sqlx::query_scalar("SHOW max_locks_per_transaction")
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(locks_per_tx, "64", "the test assumes the server default");
    let q = quote_ident(p.schema());
    sqlx::raw_sql(&format!(
        "INSERT INTO {q}.instances (instance_id, orchestration_name, orchestration_version,
                                    parent_instance_id, created_at_ms, updated_at_ms)
         SELECT 'root-' || r, 'O', '1.0.0', NULL, r, r FROM generate_series(1, 1000) r
         UNION ALL
         SELECT 'root-' || r || '-c' || c, 'C', '1.0.0', 'root-' || r, r, r
         FROM generate_series(1, 1000) r, generate_series(1, 10) c;
         INSERT INTO {q}.executions (instance_id, execution_id, status, started_at_ms, completed_at_ms)
         SELECT i.instance_id, 1, 'Completed', 1, 2 FROM {q}.instances i;
         INSERT INTO {q}.history (instance_id, execution_id, event_id, event_type, event_data, created_at_ms)
         SELECT i.instance_id, 1, 1, 'OrchestrationStarted', '{{}}', 1 FROM {q}.instances i;"
    ))
    .execute(p.pool())
    .await
    .unwrap();
    let result = p
        .delete_instance_bulk(InstanceFilter {
            limit: Some(1000),
            ..InstanceFilter::default()
        })
        .await
        .expect("bulk delete of 1,000 roots x 10 children");
    assert_eq!(result.instances_deleted, 11_000);
    assert_eq!(result.executions_deleted, 11_000);
    assert_eq!(result.events_deleted, 11_000);
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {q}.instances"))
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lock_table_is_permanent_for_deletes_and_retryable_for_runtime_calls() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    let raise = || async {
        sqlx::query(
            "DO $$ BEGIN RAISE EXCEPTION 'out of shared memory' \
             USING ERRCODE = '53200', HINT = 'You might need to increase max_locks_per_transaction.'; END $$",
        )
        .execute(p.pool())
        .await
        .expect_err("raised")
    };
    let e = db_error("delete_instance_bulk", None, raise().await);
    assert!(
        !e.is_retryable(),
        "the same delete fails the same way every time: {e}"
    );
    assert!(e.message.contains("max_locks_per_transaction"), "{e}");
    assert!(e.message.contains("fewer instances"), "{e}");
    let e = db_error("delete_instances_atomic", None, raise().await);
    assert!(!e.is_retryable(), "{e}");
    // Caused by another session: clears when its transaction ends; duroxide bounds retries.
    let e = db_error("ack_orchestration_item", Some("i-1"), raise().await);
    assert!(e.is_retryable(), "{e}");
}

// ---- undecodable worker rows ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_worker_row_is_poisoned_after_max_attempts() {
    let (p, guard) = new_provider_with(FetchPath::Hybrid, |_| {}).await;
    let q = quote_ident(guard.schema());
    let orchestrations = || {
        OrchestrationRegistry::builder()
            .register(
                "Risky",
                |ctx: OrchestrationContext, _in: String| async move {
                    let v = ctx.schedule_activity("Work", "x").await?;
                    Ok(format!("ran: {v}"))
                },
            )
            .build()
    };
    let activities = || {
        ActivityRegistry::builder()
            .register("Work", |_ctx: ActivityContext, input: String| async move {
                Ok(input)
            })
            .build()
    };
    // Orchestrations only: the activity row waits in the queue.
    let orchestrator = Runtime::start_with_options(
        p.clone(),
        activities(),
        orchestrations(),
        RuntimeOptions {
            worker_concurrency: 0,
            ..RuntimeOptions::default()
        },
    )
    .await;
    let client = Client::new(p.clone());
    client
        .start_orchestration("poison-w", "Risky", "")
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {q}.worker_queue WHERE instance_id = 'poison-w'"
        ))
        .fetch_one(p.pool())
        .await
        .unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < until, "the activity was never scheduled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query(&format!(
        "UPDATE {q}.worker_queue SET work_item = 'garbage\u{1}' WHERE instance_id = 'poison-w'"
    ))
    .execute(p.pool())
    .await
    .unwrap();
    let worker = Runtime::start_with_options(
        p.clone(),
        activities(),
        orchestrations(),
        RuntimeOptions {
            orchestration_concurrency: 0,
            max_attempts: 2,
            unregistered_backoff: UnregisteredBackoffConfig {
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(100),
            },
            ..RuntimeOptions::default()
        },
    )
    .await;
    let status = client
        .wait_for_orchestration("poison-w", Duration::from_secs(20))
        .await
        .unwrap();
    worker.shutdown(None).await;
    orchestrator.shutdown(None).await;
    // duroxide fails the orchestration with the activity's poison details.
    match status {
        OrchestrationStatus::Failed {
            details:
                duroxide::ErrorDetails::Poison {
                    attempt_count,
                    max_attempts,
                    message_type:
                        duroxide::PoisonMessageType::Activity {
                            instance,
                            activity_id,
                            ..
                        },
                    message,
                },
            ..
        } => {
            assert_eq!((attempt_count, max_attempts), (3, 2));
            assert_eq!((instance.as_str(), activity_id), ("poison-w", 2));
            assert!(message.contains("does not decode"), "{message}");
        }
        other => panic!("poison-w must fail as poison: {other:?}"),
    }
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {q}.worker_queue"))
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "the poisoned row is consumed");
    let _: Arc<PostgresProvider> = p;
}

/// A short poll (poll_timeout 0) that meets the only runnable instance held by another
/// claim in flight looks again instead of answering "no work": that claim may roll back
/// (its caller dropped before COMMIT, as a runtime shutting down does behind a
/// transaction pooler), and then the instance was claimable all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_poll_does_not_report_an_empty_queue_while_a_claim_in_flight_rolls_back() {
    for path in [FetchPath::Hybrid, FetchPath::Procedure] {
        let (p, _guard) = new_provider_with(path, common::short_polling).await;
        p.enqueue_for_orchestrator(start_item("held"), None)
            .await
            .unwrap();

        // The claim in flight: a transaction holding the instance's claim-state row.
        let mut other = sqlx::PgConnection::connect(&database_url()).await.unwrap();
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        let held: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT instance_id FROM {}.pending_instances WHERE instance_id = 'held' FOR NO KEY UPDATE",
            quote_ident(p.schema())
        ))
        .fetch_all(&mut other)
        .await
        .unwrap();
        assert_eq!(
            held.len(),
            1,
            "{path}: the instance has its claim-state row"
        );

        let fetch = {
            let p = p.clone();
            tokio::spawn(
                async move { p.fetch_orchestration_item(LOCK, Duration::ZERO, None).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(4)).await;
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();

        let (item, lock, _) = fetch
            .await
            .unwrap()
            .unwrap()
            .unwrap_or_else(|| panic!("{path}: claimable work reported as no work"));
        assert_eq!(item.instance, "held");
        p.abandon_orchestration_item(&lock, None, true)
            .await
            .unwrap();
    }
}

/// The ledger that makes enqueues and worker acks safe to resend keeps every id for 15
/// minutes and is pruned along the way (by about one call in 16, by client and worker
/// enqueues and by worker acks): ids past their 15 minutes go, recent ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ledger_ids_are_pruned_and_recent_ones_kept() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, common::short_polling).await;
    let expired = "SELECT count(*) FROM {s}.enqueue_ledger WHERE enqueue_id LIKE 'expired-%'";
    // 300 enqueues of each kind after 200 ids past their 15 minutes: a pruning pass (up
    // to 64 ids) in about one of 16, so ~19 passes where 4 clear the 200 (fewer than 4
    // in 300: p < 1e-4).
    for kind in ["client", "worker", "worker ack"] {
        sqlx::query(&format!(
            "INSERT INTO {s}.enqueue_ledger (enqueue_id, created_at_ms)
             SELECT 'expired-' || g, {s}.now_ms() - 900001 - g FROM generate_series(1, 200) g",
            s = quote_ident(p.schema())
        ))
        .execute(p.pool())
        .await
        .unwrap();
        for i in 0..300 {
            if kind == "client" {
                p.enqueue_for_orchestrator(start_item(&format!("ledger-{i}")), None)
                    .await
                    .unwrap();
            } else if kind == "worker" {
                p.enqueue_for_worker(activity_item("ledger-w", i))
                    .await
                    .unwrap();
            } else {
                // The worker ack records its call id (and prunes) in SQL of its own.
                let (_, token, _) = p
                    .fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::Any)
                    .await
                    .unwrap()
                    .expect("one of the worker enqueues' items");
                let completion = WorkItem::ActivityCompleted {
                    instance: "ledger-w".to_string(),
                    execution_id: 1,
                    id: i,
                    result: "r".to_string(),
                };
                p.ack_work_item(&token, Some(completion)).await.unwrap();
            }
        }
        assert_eq!(
            scalar(&p, expired).await,
            0,
            "expired ids pruned by {kind} enqueues"
        );
    }
    assert_eq!(
        scalar(&p, "SELECT count(*) FROM {s}.enqueue_ledger").await,
        900,
        "every recent id is kept"
    );
}

/// An orchestration turn abandoned with a delay makes its whole batch visible again at
/// one time. With a time per row, a fetch woken at the earliest of them (the abandon's
/// `at:` notice names it) could claim part of the batch a millisecond before the rest: a
/// cancel split from the message it came with (duroxide's
/// `continue_as_new_transition_delivery`, "cancel" shape, failed that way once under load).
#[tokio::test]
async fn a_batch_abandoned_with_a_delay_becomes_visible_again_all_at_once() {
    let (p, _guard) = new_provider(FetchPath::Hybrid).await;
    p.enqueue_for_orchestrator(start_item("ab-batch"), None)
        .await
        .unwrap();
    // Enough messages that one UPDATE of all of them spans several milliseconds.
    let q = quote_ident(p.schema());
    let event = serde_json::to_string(&WorkItem::ExternalRaised {
        instance: "ab-batch".to_string(),
        name: "E".to_string(),
        data: "d".to_string(),
    })
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {q}.orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms) \
         SELECT 'ab-batch', 'ExternalRaised', $1, {q}.now_ms(), {q}.now_ms() FROM generate_series(1, 20000)"
    ))
    .bind(&event)
    .execute(p.pool())
    .await
    .unwrap();
    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("the batch");
    assert_eq!(item.messages.len(), 20_001);
    p.abandon_orchestration_item(&token, Some(Duration::from_secs(5)), false)
        .await
        .unwrap();
    let times = scalar(
        &p,
        &format!(
            "SELECT count(DISTINCT visible_at_ms) FROM {q}.orchestrator_queue \
             WHERE instance_id = 'ab-batch'"
        ),
    )
    .await;
    assert_eq!(times, 1, "the batch is visible again at one time");
    p.close().await;
}
