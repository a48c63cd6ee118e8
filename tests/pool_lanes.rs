//! The pool's dispatch lane: when every connection is busy, the runtime's dispatch calls
//! (here a worker lease renewal) get the next free connection before client calls that
//! queued earlier (status reads); with `dispatch_lane` off, calls are served in arrival
//! order. A renewal queued behind a crowd of status polls would otherwise be late, and a
//! lease that runs out hands the activity to another worker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{activity_item, database_url, new_provider_with};
use duroxide::providers::{Provider, TagFilter};
use duroxide_pg_hybrid::FetchPath;
use sqlx::{Connection, Executor};

const LOCK: Duration = Duration::from_secs(30);

/// Completion order of: a status read that holds the pool's only connection (blocked by
/// a table lock taken from outside), two more reads queued behind it, then a renewal.
async fn completion_order(dispatch_lane: bool) -> Vec<&'static str> {
    let (provider, guard) = new_provider_with(FetchPath::Hybrid, |o| {
        o.max_connections = 1;
        o.min_connections = 1;
        o.dispatch_lane = dispatch_lane;
    })
    .await;
    provider
        .enqueue_for_worker(activity_item("lane-1", 1))
        .await
        .unwrap();
    let (_, token, _) = provider
        .fetch_work_item(LOCK, Duration::ZERO, None, &TagFilter::DefaultOnly)
        .await
        .unwrap()
        .expect("the queued activity");

    // Status reads (get_custom_status) read `instances`: an exclusive lock held by another
    // session keeps the first one, and with it the only connection, busy.
    let mut blocker = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    blocker.execute("BEGIN").await.unwrap();
    blocker
        .execute(
            format!(
                "LOCK TABLE \"{}\".instances IN ACCESS EXCLUSIVE MODE",
                guard.schema()
            )
            .as_str(),
        )
        .await
        .unwrap();

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for name in ["read-1", "read-2", "read-3"] {
        let (p, o) = (provider.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            p.get_custom_status("lane-1", 0).await.unwrap();
            o.lock().unwrap().push(name);
        }));
        // Queued in this order.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (p, o, t) = (provider.clone(), order.clone(), token.clone());
    tasks.push(tokio::spawn(async move {
        p.renew_work_item_lock(&t, LOCK).await.unwrap();
        o.lock().unwrap().push("renew");
    }));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "every call waits while the only connection is blocked"
    );

    blocker.execute("COMMIT").await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("every queued call completes")
            .unwrap();
    }
    order.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_goes_ahead_of_queued_status_reads() {
    assert_eq!(
        completion_order(true).await,
        vec!["read-1", "renew", "read-2", "read-3"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lane_calls_are_served_in_arrival_order() {
    assert_eq!(
        completion_order(false).await,
        vec!["read-1", "read-2", "read-3", "renew"]
    );
}
