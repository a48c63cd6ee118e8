//! The rules of the live adoption (issue 12, item 3), one by one, on a hand-made
//! duroxide-pg 0.1.38 schema (its tables and ledger, rows written as duroxide-pg writes
//! them), so they run in the default suite without building duroxide-pg. The end-to-end
//! run with real duroxide-pg processes is `tests/adopt_duroxide_pg.rs`.
//!
//! * an instance a duroxide-pg process holds (live lease, or its advisory lock) is not
//!   moved; it moves once the lease ended;
//! * everything comes along: instance row, executions with pinned versions, history, KV
//!   store and delta, custom status, messages with attempt counts, a timer days away with
//!   its fire time, activities not leased; a leased activity stays until its worker is done;
//! * after the move, duroxide-pg's fetch sees a lease that never ends (the fence), a
//!   message a duroxide-pg process writes for the instance lands in this crate's queue,
//!   and a message this crate writes for an instance still in duroxide-pg's tables lands
//!   in duroxide-pg's queue;
//! * a failed batch (a crash mid-way) leaves everything where it was, and the next pass
//!   moves it;
//! * management through this crate's client (listings, info, trees, delete, prune, system
//!   metrics, queue depths) reaches instances the mover has not reached yet: listings and
//!   counts cover both homes (an instance moving counts once), and a
//!   call about one instance moves it (and its descendants) first; a held one is a
//!   retryable error naming it.

mod common;
#[path = "common/incumbent.rs"]
mod incumbent_skeleton;

use std::time::Duration;

use common::{database_url, init_tracing, unique_schema};
use duroxide::providers::{Provider, ProviderAdmin, WorkItem};
use duroxide_pg_hybrid::adopt;
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};
use sqlx::{Connection, PgPool, Row};

struct Fixture {
    _cleanup: common::SchemaCleanup,
    admin: PgPool,
    new: String,
    o: String,
    n: String,
}

/// A hand-made duroxide-pg schema and the name of its companion (not created yet), both
/// dropped with the cleanup, and a pool for the test's own statements.
async fn duroxide_pg_schema() -> (common::SchemaCleanup, PgPool, String, String) {
    init_tracing();
    let old = unique_schema();
    let new = adopt::companion_schema(&old).unwrap();
    let cleanup = common::SchemaCleanup::for_schemas(&[old.clone(), new.clone()]);
    let admin = PgPool::connect(&database_url()).await.unwrap();
    let mut conn = admin.acquire().await.unwrap();
    incumbent_skeleton::create_duroxide_pg_skeleton(&mut conn, &old, 26).await;
    drop(conn);
    (cleanup, admin, old, new)
}

impl Fixture {
    async fn new() -> (Self, PostgresProvider) {
        let url = database_url();
        let (cleanup, admin, old, new) = duroxide_pg_schema().await;
        // No mover: the test drives the batches.
        let provider = PostgresProvider::connect_with(
            &url,
            ProviderOptions {
                schema: old.clone(),
                max_connections: 3,
                adoption_mover: false,
                ..ProviderOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(provider.schema(), new);
        let f = Fixture {
            _cleanup: cleanup,
            o: quote_ident(&old),
            n: quote_ident(&new),
            admin,
            new,
        };
        (f, provider)
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn batch(&self) -> adopt::Batch {
        adopt::adopt_batch(&self.admin, &self.new, "", 100)
            .await
            .unwrap()
    }

    /// An instance as duroxide-pg 0.1.38 leaves it after a turn that scheduled an
    /// activity and a timer `timer_in` away, with KV, custom status and a pinned version.
    async fn old_instance(&self, id: &str, timer_in: Duration) {
        let o = &self.o;
        let fire_ms = now_ms() + timer_in.as_millis() as i64;
        self.exec(&format!(
            "INSERT INTO {o}.instances (instance_id, orchestration_name, orchestration_version, current_execution_id, custom_status, custom_status_version)
             VALUES ('{id}', 'Orch', '1.0.0', 2, 'halfway', 3);
             INSERT INTO {o}.executions (instance_id, execution_id, status, output, duroxide_version_major, duroxide_version_minor, duroxide_version_patch, completed_at)
             VALUES ('{id}', 1, 'ContinuedAsNew', 'in', 0, 1, 32, now()), ('{id}', 2, 'Running', NULL, 0, 1, 32, NULL);
             INSERT INTO {o}.history (instance_id, execution_id, event_id, event_type, event_data)
             VALUES ('{id}', 1, 1, 'OrchestrationStarted', '{{\"event_id\":1,\"type\":\"OrchestrationStarted\",\"x\":1}}'),
                    ('{id}', 2, 1, 'OrchestrationStarted', '{{\"event_id\":1,\"type\":\"OrchestrationStarted\",\"x\":2}}'),
                    ('{id}', 2, 2, 'ActivityScheduled', '{{\"event_id\":2,\"type\":\"ActivityScheduled\"}}');
             INSERT INTO {o}.kv_store (instance_id, key, value, execution_id, last_updated_at_ms) VALUES ('{id}', 'k', 'stored', 1, 5);
             INSERT INTO {o}.kv_delta (instance_id, key, value, last_updated_at_ms) VALUES ('{id}', 'd', 'delta', 6);
             INSERT INTO {o}.orchestrator_queue (instance_id, work_item, visible_at, attempt_count)
             VALUES ('{id}', '{{\"TimerFired\":{{\"instance\":\"{id}\",\"execution_id\":2,\"id\":3,\"fire_at_ms\":{fire_ms}}}}}', to_timestamp({fire_ms} / 1000.0), 0),
                    ('{id}', '{{\"ExternalRaised\":{{\"instance\":\"{id}\",\"name\":\"go\",\"data\":\"x\"}}}}', now(), 2);
             INSERT INTO {o}.worker_queue (work_item, instance_id, execution_id, activity_id, tag)
             VALUES ('{{\"ActivityExecute\":{{\"instance\":\"{id}\",\"execution_id\":2,\"id\":2,\"name\":\"A\",\"input\":\"i\"}}}}', '{id}', 2, 2, 'gpu');"
        ))
        .await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_moves_with_the_instance_and_held_instances_wait() {
    let (f, provider) = Fixture::new().await;
    let (o, n) = (&f.o, &f.n);
    let days = Duration::from_secs(14 * 24 * 3600);
    f.old_instance("moves", days).await;
    f.old_instance("leased", Duration::from_secs(60)).await;
    f.old_instance("locked", Duration::from_secs(60)).await;
    // A duroxide-pg turn holds "leased" (lease for 30 s) ...
    f.exec(&format!(
        "INSERT INTO {o}.instance_locks VALUES ('leased', 'lock_a', {}, {})",
        now_ms() + 30_000,
        now_ms()
    ))
    .await;
    // ... a duroxide-pg worker runs one activity of "moves" (its copy, id 99) ...
    f.exec(&format!(
        "INSERT INTO {o}.worker_queue (work_item, instance_id, execution_id, activity_id, lock_token, locked_until, attempt_count)
         VALUES ('{{\"ActivityExecute\":{{\"instance\":\"moves\",\"execution_id\":2,\"id\":99,\"name\":\"A\",\"input\":\"held\"}}}}', 'moves', 2, 99, 'w1', {}, 1)",
        now_ms() + 30_000
    ))
    .await;
    // ... and a duroxide-pg process is inside a lease change of "locked" (its advisory lock).
    let mut holder = f.admin.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('locked'))")
        .execute(&mut *holder)
        .await
        .unwrap();

    let b = f.batch().await;
    assert_eq!((b.moved, b.busy), (1, 2), "{b:?}");
    assert!(b.failures.is_empty(), "{b:?}");

    // Everything of "moves" came along, byte for byte where it matters.
    let row = sqlx::query(&format!(
        "SELECT orchestration_version, current_execution_id, custom_status, custom_status_version FROM {n}.instances WHERE instance_id = 'moves'"
    ))
    .fetch_one(&f.admin)
    .await
    .unwrap();
    assert_eq!(row.get::<Option<String>, _>(0).as_deref(), Some("1.0.0"));
    assert_eq!(row.get::<i64, _>(1), 2);
    assert_eq!(row.get::<Option<String>, _>(2).as_deref(), Some("halfway"));
    assert_eq!(row.get::<i64, _>(3), 3);
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {n}.executions WHERE instance_id = 'moves' AND pinned_major = 0 AND pinned_minor = 1 AND pinned_patch = 32"
        ))
        .await,
        2
    );
    let events: Vec<(i64, i64, String, String)> = sqlx::query_as(&format!(
        "SELECT execution_id, event_id, event_type, event_data FROM {n}.history WHERE instance_id = 'moves' ORDER BY 1, 2"
    ))
    .fetch_all(&f.admin)
    .await
    .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].2, "ActivityScheduled");
    assert_eq!(
        events[2].3,
        "{\"event_id\":2,\"type\":\"ActivityScheduled\"}"
    );
    let kv: Vec<(String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT key, value FROM {n}.kv_store WHERE instance_id = 'moves' UNION ALL SELECT key, value FROM {n}.kv_delta WHERE instance_id = 'moves' ORDER BY 1"
    ))
    .fetch_all(&f.admin)
    .await
    .unwrap();
    assert_eq!(
        kv,
        vec![
            ("d".into(), Some("delta".into())),
            ("k".into(), Some("stored".into()))
        ]
    );
    let queued: Vec<(String, i64, i32)> = sqlx::query_as(&format!(
        "SELECT kind, visible_at_ms, attempt_count FROM {n}.orchestrator_queue WHERE instance_id = 'moves' ORDER BY id"
    ))
    .fetch_all(&f.admin)
    .await
    .unwrap();
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0].0, "TimerFired");
    let due = now_ms() + days.as_millis() as i64;
    assert!(
        (queued[0].1 - due).abs() < 60_000,
        "timer at {}",
        queued[0].1
    );
    assert_eq!((queued[1].0.as_str(), queued[1].2), ("ExternalRaised", 2));
    // The activity nobody held moved (tag kept); the held one stayed with its worker.
    let moved_activity: (i64, Option<String>) = sqlx::query_as(&format!(
        "SELECT activity_id, tag FROM {n}.worker_queue WHERE instance_id = 'moves'"
    ))
    .fetch_one(&f.admin)
    .await
    .unwrap();
    assert_eq!(moved_activity, (2, Some("gpu".into())));
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {o}.worker_queue WHERE instance_id = 'moves'"
        ))
        .await,
        1
    );
    // duroxide-pg's tables no longer hold it; its fetch sees a lease that never ends.
    assert_eq!(
        f.count(&format!(
            "SELECT (SELECT count(*) FROM {o}.instances WHERE instance_id = 'moves') + (SELECT count(*) FROM {o}.history WHERE instance_id = 'moves') + (SELECT count(*) FROM {o}.orchestrator_queue WHERE instance_id = 'moves')"
        ))
        .await,
        0
    );
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {o}.instance_locks WHERE instance_id = 'moves' AND locked_until = 9223372036854775807"
        ))
        .await,
        1
    );
    // The held instances are untouched.
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {o}.instances WHERE instance_id IN ('leased', 'locked')"
        ))
        .await,
        2
    );

    // The held worker finishes: duroxide-pg's ack deletes its row and queues the
    // completion in its own queue, which the trigger routes to the instance's new home.
    f.exec(&format!(
        "DELETE FROM {o}.worker_queue WHERE lock_token = 'w1';
         INSERT INTO {o}.orchestrator_queue (instance_id, work_item, visible_at, created_at)
         VALUES ('moves', '{{\"ActivityCompleted\":{{\"instance\":\"moves\",\"execution_id\":2,\"id\":99,\"result\":\"r\"}}}}', now(), now())"
    ))
    .await;
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {o}.orchestrator_queue WHERE instance_id = 'moves'"
        ))
        .await,
        0
    );
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {n}.orchestrator_queue WHERE instance_id = 'moves' AND kind = 'ActivityCompleted'"
        ))
        .await,
        1
    );
    // This crate's client raising an event for an instance still in duroxide-pg's tables:
    // the message lands in duroxide-pg's queue (a duroxide-pg process may run its turn).
    provider
        .enqueue_for_orchestrator(
            WorkItem::ExternalRaised {
                instance: "leased".into(),
                name: "go".into(),
                data: "from-new".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {o}.orchestrator_queue WHERE instance_id = 'leased' AND work_item LIKE '%from-new%'"
        ))
        .await,
        1
    );
    // (This crate's client reading it there goes through duroxide-pg's own read
    // functions, which this skeleton lacks: tests/adopt_duroxide_pg.rs checks that.)

    // The advisory lock is released and the lease ends: the next pass moves both, with
    // the event this crate sent.
    holder.rollback().await.unwrap();
    f.exec(&format!(
        "UPDATE {o}.instance_locks SET locked_until = {} WHERE instance_id = 'leased'",
        now_ms() - 1
    ))
    .await;
    let b = f.batch().await;
    assert_eq!((b.moved, b.busy), (2, 0), "{b:?}");
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {n}.orchestrator_queue WHERE instance_id = 'leased' AND work_item LIKE '%from-new%'"
        ))
        .await,
        1
    );
    let p = adopt::progress(&f.admin, &f.new).await.unwrap();
    assert!(p.is_done(), "{p:?}");
    assert_eq!(p.adopted, 3);
    provider.close().await;
}

/// The install puts triggers on duroxide-pg's queues one after the other while a
/// running duroxide-pg worker ack writes them in its own order (worker queue, then
/// orchestrator queue). Such an ack must never be the one that fails (its activity would
/// run again): the install waits for a busy table only briefly, then backs off and tries
/// again. The ack here waits for the orchestrator queue while the install holds it and
/// waits for the worker queue, and its `deadlock_timeout` is short, so before the install
/// backed off it was the deadlock's victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_install_backs_off_instead_of_deadlocking_a_running_duroxide_pg_ack() {
    let url = database_url();
    let (_cleanup, admin, old, new) = duroxide_pg_schema().await;
    duroxide_pg_hybrid::schema::migrate(&admin, &new)
        .await
        .unwrap();
    let o = quote_ident(&old);

    // A duroxide-pg worker ack: it has deleted its worker row (the table's write lock)...
    let mut ack = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!(
        "SET deadlock_timeout = '50ms'; BEGIN; LOCK TABLE {o}.worker_queue IN ROW EXCLUSIVE MODE"
    ))
    .execute(&mut ack)
    .await
    .unwrap();
    let install = tokio::spawn({
        let (admin, old, new) = (admin.clone(), old.clone(), new.clone());
        async move { adopt::install(&admin, &old, &new).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... and now inserts its completion into the orchestrator queue.
    sqlx::raw_sql(&format!(
        "LOCK TABLE {o}.orchestrator_queue IN ROW EXCLUSIVE MODE; COMMIT"
    ))
    .execute(&mut ack)
    .await
    .expect("the duroxide-pg ack commits");
    tokio::time::timeout(Duration::from_secs(30), install)
        .await
        .expect("the install finishes once the ack is done")
        .unwrap()
        .expect("the install succeeds");
    adopt::verify_installed(&admin, &old, &new).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_moves_nothing_and_the_next_pass_resumes() {
    let (f, provider) = Fixture::new().await;
    let (o, n) = (&f.o, &f.n);
    for i in 0..5 {
        f.old_instance(&format!("i{i}"), Duration::from_secs(60))
            .await;
    }
    // A crash mid-batch: the batch's transaction dies after moving some instances.
    let mut tx = f.admin.begin().await.unwrap();
    let moved: i32 = sqlx::query_scalar(&format!("SELECT moved FROM {n}.adopt_batch('', 3)"))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(moved, 3);
    tx.rollback().await.unwrap(); // as a lost connection would
    assert_eq!(
        f.count(&format!("SELECT count(*) FROM {o}.instances"))
            .await,
        5
    );
    assert_eq!(
        f.count(&format!("SELECT count(*) FROM {n}.adopted_instances"))
            .await,
        0
    );
    let b = f.batch().await;
    assert_eq!(b.moved, 5, "{b:?}");
    assert_eq!(
        f.count(&format!("SELECT count(*) FROM {n}.history")).await,
        15
    );
    // A second pass finds nothing to do.
    let b = f.batch().await;
    assert_eq!((b.moved, b.visited), (0, 0), "{b:?}");
    provider.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_on_this_side_reaches_instances_not_moved_yet() {
    let (f, provider) = Fixture::new().await;
    let (o, n) = (&f.o, &f.n);
    for id in ["parent", "child", "other"] {
        f.old_instance(id, Duration::from_secs(60)).await;
    }
    f.exec(&format!(
        "UPDATE {o}.instances SET parent_instance_id = 'parent' WHERE instance_id = 'child'"
    ))
    .await;
    let old_instances = format!("SELECT count(*) FROM {o}.instances");
    // Counts cover both homes, before and after a move, each instance once: 3 instances
    // of 2 executions and 3 events, each with a timer and an event queued and an activity.
    let fleet = |m: duroxide::providers::SystemMetrics| {
        (
            m.total_instances,
            m.total_executions,
            m.running_instances,
            m.total_events,
        )
    };
    let depths = |d: duroxide::providers::QueueDepths| (d.orchestrator_queue, d.worker_queue);
    assert_eq!(
        fleet(provider.get_system_metrics().await.unwrap()),
        (3, 6, 3, 9)
    );
    assert_eq!(depths(provider.get_queue_depths().await.unwrap()), (6, 3));
    let mut listed = provider.list_instances().await.unwrap();
    listed.sort();
    assert_eq!(listed, ["child", "other", "parent"]);
    let mut running = provider.list_instances_by_status("Running").await.unwrap();
    running.sort();
    assert_eq!(running, ["child", "other", "parent"]);
    assert_eq!(f.count(&old_instances).await, 3, "listing moves nothing");

    let info = provider.get_instance_info("parent").await.unwrap();
    assert_eq!(
        (
            info.orchestration_name.as_str(),
            info.current_execution_id,
            info.status.as_str()
        ),
        ("Orch", 2, "Running")
    );
    assert_eq!(
        f.count(&old_instances).await,
        2,
        "the instance asked about moved"
    );
    assert_eq!(
        fleet(provider.get_system_metrics().await.unwrap()),
        (3, 6, 3, 9)
    );
    assert_eq!(depths(provider.get_queue_depths().await.unwrap()), (6, 3));

    let tree = provider.get_instance_tree("parent").await.unwrap();
    assert_eq!(tree.all_ids, ["parent", "child"]);
    assert_eq!(f.count(&old_instances).await, 1, "its child moved with it");
    assert_eq!(
        provider.get_parent_id("child").await.unwrap().as_deref(),
        Some("parent")
    );

    // A duroxide-pg process holds `other` (its per-instance advisory lock): nothing moves,
    // the call fails retryably and says which instance.
    let mut holder = f.admin.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('other'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let err = provider.delete_instance("other", true).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.message.contains("other"), "{err:?}");
    assert_eq!(f.count(&old_instances).await, 1);
    holder.rollback().await.unwrap();

    let deleted = provider.delete_instance("other", true).await.unwrap();
    assert_eq!(deleted.instances_deleted, 1, "{deleted:?}");
    assert_eq!(f.count(&old_instances).await, 0);
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {o}.orchestrator_queue WHERE instance_id = 'other'"
        ))
        .await,
        0
    );
    assert_eq!(
        f.count(&format!(
            "SELECT count(*) FROM {n}.instances WHERE instance_id = 'other'"
        ))
        .await,
        0
    );
    let mut listed = provider.list_instances().await.unwrap();
    listed.sort();
    assert_eq!(listed, ["child", "parent"]);
    provider.close().await;
}
