//! The pool's dispatch lane: when every connection is busy, the runtime's dispatch calls
//! (here a worker lease renewal, and the worker's history read before an activity it
//! fetched) get the next free connection before client calls that queued earlier
//! (status reads); with `dispatch_lane` off, calls are served in arrival order. A renewal
//! queued behind a crowd of status polls would otherwise be late, and a lease that runs
//! out hands the activity to another worker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{activity_item, database_url, new_provider_with};
use duroxide::providers::{Provider, TagFilter};
use duroxide_pg_hybrid::FetchPath;
use sqlx::{Connection, Executor};

const LOCK: Duration = Duration::from_secs(30);

/// What each call does once it has a connection.
#[derive(Clone, Copy)]
enum Call {
    /// `get_custom_status` (a client's status poll).
    Status,
    /// `read` of the fetched activity's instance.
    Read,
    /// `renew_work_item_lock` of the fetched activity.
    Renew,
}

/// Completion order of `calls`, started in this order while the pool's only connection
/// is held by a status read blocked on a table lock taken from outside (named "held").
async fn completion_order(
    dispatch_lane: bool,
    calls: &[(&'static str, Call)],
) -> Vec<&'static str> {
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
    for &(name, call) in [("held", Call::Status)].iter().chain(calls) {
        let (p, o, t) = (provider.clone(), order.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            match call {
                Call::Status => drop(p.get_custom_status("lane-1", 0).await.unwrap()),
                Call::Read => drop(p.read("lane-1").await.unwrap()),
                Call::Renew => p.renew_work_item_lock(&t, LOCK).await.unwrap(),
            }
            o.lock().unwrap().push(name);
        }));
        // Queued in this order.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
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

const RENEWAL_BEHIND_READS: &[(&str, Call)] = &[
    ("status-2", Call::Status),
    ("status-3", Call::Status),
    ("renew", Call::Renew),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_goes_ahead_of_queued_status_reads() {
    assert_eq!(
        completion_order(true, RENEWAL_BEHIND_READS).await,
        vec!["held", "renew", "status-2", "status-3"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lane_calls_are_served_in_arrival_order() {
    assert_eq!(
        completion_order(false, RENEWAL_BEHIND_READS).await,
        vec!["held", "status-2", "status-3", "renew"]
    );
}

/// duroxide's worker reads the instance's history between fetching an activity and
/// running it: that first read is on the worker's path and goes ahead; a second read of
/// the instance is a status read like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_read_before_its_activity_goes_ahead_once() {
    assert_eq!(
        completion_order(
            true,
            &[
                ("status-2", Call::Status),
                ("descriptor", Call::Read),
                ("read-again", Call::Read),
                ("status-3", Call::Status),
            ]
        )
        .await,
        vec!["held", "descriptor", "status-2", "read-again", "status-3"]
    );
}
