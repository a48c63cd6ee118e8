//! Round trips per provider call, counted by a TCP proxy between the provider and
//! PostgreSQL (a "burst" is a client message sent after the server answered, i.e. one
//! round trip the caller waited for). Serial depth is shown by adding latency in the
//! proxy: a call of depth d takes at least d x RTT and well under (d + 1) x RTT.
//!
//! Every count is taken after a warm-up, so statements are already prepared on every
//! pooled connection (a first use of a statement on a connection costs one extra
//! Parse/Describe trip, once).

mod common;

use std::time::{Duration, Instant};

use common::{activity_item, database_url, new_provider, start_item, test_options};
use duroxide::providers::{ExecutionMetadata, Provider, TagFilter, WorkItem};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};
use duroxide_pg_hybrid_testkit::proxy::{Proxy, rewrite_url};

const LOCK: Duration = Duration::from_secs(30);
const NOW: Duration = Duration::ZERO;

async fn proxied(schema: &str, path: FetchPath, rtt: Duration) -> (Proxy, PostgresProvider) {
    let url = database_url();
    let (_, upstream) = rewrite_url(&url, "127.0.0.1:1".parse().unwrap()).unwrap();
    let proxy = Proxy::start(upstream, rtt).await.unwrap();
    let (via_proxy, _) = rewrite_url(&url, proxy.addr()).unwrap();
    let mut options = test_options(schema, path);
    options.max_connections = 4;
    options.min_connections = 4;
    let provider = common::connect_waiting(&via_proxy, options).await.unwrap();
    (proxy, provider)
}

fn metadata() -> ExecutionMetadata {
    ExecutionMetadata {
        orchestration_name: Some("O".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        status: Some("Running".to_string()),
        ..Default::default()
    }
}

/// Round trips (bursts) of every provider call of one orchestration turn and one
/// activity, in order. Returned as (call, bursts).
async fn one_cycle(proxy: &Proxy, p: &PostgresProvider, n: usize) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    macro_rules! measure {
        ($name:expr, $call:expr) => {{
            let before = proxy.snapshot();
            let r = $call;
            out.push(($name, proxy.snapshot().since(&before).bursts));
            r
        }};
    }
    let inst = format!("rt-{n}");
    measure!(
        "empty fetch_orchestration_item",
        p.fetch_orchestration_item(LOCK, NOW, None).await.unwrap()
    );
    measure!(
        "empty fetch_work_item",
        p.fetch_work_item(LOCK, NOW, None, &TagFilter::Any)
            .await
            .unwrap()
    );
    measure!(
        "enqueue_for_orchestrator",
        p.enqueue_for_orchestrator(start_item(&inst), None)
            .await
            .unwrap()
    );
    let (_, token, _) = measure!(
        "fetch_orchestration_item",
        p.fetch_orchestration_item(LOCK, NOW, None)
            .await
            .unwrap()
            .unwrap()
    );
    measure!(
        "renew_orchestration_item_lock",
        p.renew_orchestration_item_lock(&token, LOCK).await.unwrap()
    );
    measure!(
        "abandon_orchestration_item",
        p.abandon_orchestration_item(&token, None, true)
            .await
            .unwrap()
    );
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .unwrap();
    measure!(
        "ack_orchestration_item",
        p.ack_orchestration_item(
            &token,
            1,
            vec![],
            vec![activity_item(&inst, 2)],
            vec![],
            metadata(),
            vec![]
        )
        .await
        .unwrap()
    );
    let (_, wtoken, _) = measure!(
        "fetch_work_item",
        p.fetch_work_item(LOCK, NOW, None, &TagFilter::Any)
            .await
            .unwrap()
            .unwrap()
    );
    measure!(
        "renew_work_item_lock",
        p.renew_work_item_lock(&wtoken, LOCK).await.unwrap()
    );
    measure!(
        "abandon_work_item",
        p.abandon_work_item(&wtoken, None, false).await.unwrap()
    );
    let (_, wtoken, _) = p
        .fetch_work_item(LOCK, NOW, None, &TagFilter::Any)
        .await
        .unwrap()
        .unwrap();
    let completion = WorkItem::ActivityCompleted {
        instance: inst.clone(),
        execution_id: 1,
        id: 2,
        result: "r".to_string(),
    };
    measure!(
        "ack_work_item",
        p.ack_work_item(&wtoken, Some(completion)).await.unwrap()
    );
    measure!(
        "enqueue_for_worker",
        p.enqueue_for_worker(activity_item(&inst, 3)).await.unwrap()
    );
    // Leave the queues empty for the next cycle.
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .unwrap();
    p.ack_orchestration_item(
        &token,
        1,
        vec![],
        vec![],
        vec![],
        ExecutionMetadata::default(),
        vec![],
    )
    .await
    .unwrap();
    let (_, wtoken, _) = p
        .fetch_work_item(LOCK, NOW, None, &TagFilter::Any)
        .await
        .unwrap()
        .unwrap();
    p.ack_work_item(&wtoken, None).await.unwrap();
    out
}

async fn round_trips(path: FetchPath) {
    let (_owner, guard) = new_provider(path).await;
    let (proxy, p) = proxied(guard.schema(), path, Duration::ZERO).await;
    for n in 0..25 {
        one_cycle(&proxy, &p, n).await;
    }
    // Steady state: the most round trips each call needed over several cycles. Every
    // statement has been prepared on some connection by now, and a call takes a
    // connection that has its statement (pool.rs), so none pays the prepare trip again.
    let mut best: Vec<(&str, u64)> = one_cycle(&proxy, &p, 100).await;
    for n in 101..106 {
        for (slot, (_, bursts)) in best.iter_mut().zip(one_cycle(&proxy, &p, n).await) {
            slot.1 = slot.1.max(bursts);
        }
    }
    let hybrid_fetch = match path {
        // Claim (with the batch and the instance's name), then the history and KV reads
        // on 2 connections (serial depth 2, see below).
        FetchPath::Hybrid => 3,
        FetchPath::Procedure => 1,
    };
    for (call, bursts) in &best {
        let expected = if *call == "fetch_orchestration_item" {
            hybrid_fetch
        } else {
            1
        };
        assert_eq!(
            *bursts, expected,
            "{path}: {call} took {bursts} round trips, expected {expected}"
        );
    }
    println!("{path}: {best:?}");
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_round_trips_per_call() {
    round_trips(FetchPath::Hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedure_round_trips_per_call() {
    round_trips(FetchPath::Procedure).await;
}

/// Serial depth of a fetch, shown with 60 ms of simulated round-trip time: hybrid costs
/// two round trips back to back (its reads overlap), procedure one.
/// A statement runs on a pooled connection that has already prepared it (`pool.rs`):
/// after concurrent calls of another statement have reshuffled which connection was
/// used last, a statement prepared on one of six connections still costs one round
/// trip, not a prepare trip more on whichever connection came back last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_finds_its_connection() {
    let (_owner, guard) = new_provider(FetchPath::Procedure).await;
    let (proxy, p) = common::proxied_provider(guard.schema(), FetchPath::Procedure, |o| {
        o.max_connections = 6;
        o.min_connections = 6;
    })
    .await;
    p.read("affine").await.unwrap();
    let mut trips = Vec::new();
    for _ in 0..6 {
        // Six calls at once: every connection is checked out and they come back in
        // whatever order the server answers.
        let shuffle: Vec<_> = (0..6).map(|_| p.get_custom_status("affine", 0)).collect();
        for r in futures::future::join_all(shuffle).await {
            r.unwrap();
        }
        let before = proxy.snapshot();
        p.read("affine").await.unwrap();
        trips.push(proxy.snapshot().since(&before).bursts);
    }
    assert!(
        trips.iter().all(|t| *t == 1),
        "a read on a connection that prepared it takes one round trip: {trips:?}"
    );
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_serial_depth_under_latency() {
    let rtt = Duration::from_millis(60);
    for (path, depth) in [(FetchPath::Hybrid, 2u32), (FetchPath::Procedure, 1u32)] {
        let (_owner, guard) = new_provider(path).await;
        let (proxy, p) = proxied(guard.schema(), path, rtt).await;
        // Warm up statements on all four connections.
        for n in 0..5 {
            one_cycle(&proxy, &p, n).await;
        }
        let mut best = Duration::MAX;
        for n in 0..4 {
            p.enqueue_for_orchestrator(start_item(&format!("depth-{n}")), None)
                .await
                .unwrap();
            let t = Instant::now();
            let (_, token, _) = p
                .fetch_orchestration_item(LOCK, NOW, None)
                .await
                .unwrap()
                .unwrap();
            best = best.min(t.elapsed());
            p.ack_orchestration_item(
                &token,
                1,
                vec![],
                vec![],
                vec![],
                ExecutionMetadata::default(),
                vec![],
            )
            .await
            .unwrap();
        }
        assert!(
            best >= rtt * depth && best < rtt * (depth + 1),
            "{path}: fetch took {best:?}, expected serial depth {depth} at RTT {rtt:?}"
        );
        p.close().await;
    }
}

/// Serial round trips of one sequential activity step (activity k's start to activity
/// k + 1's start) in a running duroxide runtime, at `rtt` of simulated latency: the
/// median gap between consecutive activity starts of a chain, in RTTs (best of three
/// chains). Also returns the duration of a `read(instance)` made outside a hand-over (the
/// read duroxide 0.1.32's worker makes before every activity costs that much when the
/// activity was not handed over), and the time from the return of the start's enqueue to
/// the first activity's start (best of three), in RTTs.
async fn step_depth(path: FetchPath, handover: bool, rtt: Duration) -> Depths {
    use std::sync::{Arc, Mutex};

    use duroxide::runtime::registry::ActivityRegistry;
    use duroxide::runtime::{Runtime, RuntimeOptions};
    use duroxide::{ActivityContext, Client, OrchestrationContext, OrchestrationRegistry};

    const STEPS: usize = 8;
    let (_owner, guard) = new_provider(path).await;
    let url = database_url();
    let (_, upstream) = rewrite_url(&url, "127.0.0.1:1".parse().unwrap()).unwrap();
    let proxy = Proxy::start(upstream, rtt).await.unwrap();
    let (via_proxy, _) = rewrite_url(&url, proxy.addr()).unwrap();
    let mut options = test_options(guard.schema(), path);
    options.max_connections = 8;
    options.min_connections = 6;
    options.handover = handover;
    let p = Arc::new(common::connect_waiting(&via_proxy, options).await.unwrap());

    let starts: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let log = starts.clone();
    let activities = ActivityRegistry::builder()
        .register("Step", move |_ctx: ActivityContext, input: String| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((input.clone(), Instant::now()));
                Ok(input)
            }
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "Chain",
            |ctx: OrchestrationContext, id: String| async move {
                for k in 0..STEPS {
                    ctx.schedule_activity("Step", format!("{id}-{k}")).await?;
                }
                Ok(id)
            },
        )
        .build();
    let rt = Runtime::start_with_options(
        p.clone(),
        activities,
        orchestrations,
        RuntimeOptions::default(),
    )
    .await;
    let client = Client::new(p.clone());
    let mut medians = Vec::new();
    let mut start = f64::MAX;
    // The first chain warms statements up on every connection.
    for run in 0..4 {
        let id = format!("chain{run}");
        // The runtime's fetches wait (the previous chain is done): the start can be
        // handed to one of them.
        tokio::time::sleep(rtt * 2).await;
        // What `Client::start_orchestration` sends, timed from its return: the call
        // itself is one round trip, two on a connection that has not prepared the
        // statement yet (connections rotate through the pool, so that varies by chain).
        p.enqueue_for_orchestrator(
            WorkItem::StartOrchestration {
                instance: id.clone(),
                orchestration: "Chain".to_string(),
                input: id.clone(),
                version: None,
                parent_instance: None,
                parent_id: None,
                parent_execution_id: None,
                execution_id: 1,
            },
            None,
        )
        .await
        .unwrap();
        let enqueued = Instant::now();
        client
            .wait_for_orchestration(&id, Duration::from_secs(60))
            .await
            .unwrap();
        if run == 0 {
            continue;
        }
        let log = starts.lock().unwrap().clone();
        let mut times: Vec<Instant> = log
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{id}-")))
            .map(|(_, t)| *t)
            .collect();
        times.sort();
        assert_eq!(times.len(), STEPS);
        start = start.min((times[0] - enqueued).as_secs_f64() / rtt.as_secs_f64());
        let mut gaps: Vec<f64> = times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() / rtt.as_secs_f64())
            .collect();
        gaps.sort_by(f64::total_cmp);
        medians.push(gaps[gaps.len() / 2]);
    }
    let mut read = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        p.read("chain3").await.unwrap();
        read = read.min(t.elapsed());
    }
    rt.shutdown(None).await;
    p.close().await;
    Depths {
        step: medians.into_iter().fold(f64::MAX, f64::min),
        read: read.as_secs_f64() / rtt.as_secs_f64(),
        start,
    }
}

/// Serial round trips measured by [`step_depth`].
struct Depths {
    /// One sequential activity step.
    step: f64,
    /// A `read(instance)` outside a hand-over.
    read: f64,
    /// The start's enqueue returned to the first activity's start.
    start: f64,
}

/// With hand-over, a sequential activity step is the worker ack and the orchestration
/// ack (procedure path: 2 serial round trips), plus the turn's reads on the hybrid path
/// (3): the fetches are answered by the acks, and the `read(instance)` duroxide 0.1.32's
/// worker makes before each activity is answered by the history the handing ack
/// committed (`src/handover_reads.rs`). A read after that (the one below, made when the
/// chains are done) costs its round trip. Without hand-over each step also waits for a
/// notification and a fetch per queue (the worker's fetch brings the history that read
/// returns).
///
/// A start made while the runtime's fetches wait is handed over too: the client's
/// enqueue claims the first turn and reads it (on the hybrid path too: a start's turn is
/// small), so once it returns the first activity starts after the first turn's ack: 1
/// round trip on both paths; without hand-over a notification, two fetches and a
/// notification more (≈ 3 and 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_step_serial_depth_with_handover() {
    // Long enough that the server's own time per call (a few ms on a loaded machine)
    // stays small next to it.
    let rtt = Duration::from_millis(100);
    // The four chains run at once (own schema, proxy and runtime each): a step waits on
    // the simulated latency, not on the machine, and the test takes a quarter of the time.
    let (p_on, p_off, h_on, h_off) = tokio::join!(
        step_depth(FetchPath::Procedure, true, rtt),
        step_depth(FetchPath::Procedure, false, rtt),
        step_depth(FetchPath::Hybrid, true, rtt),
        step_depth(FetchPath::Hybrid, false, rtt),
    );
    for (path, limit, on, off) in [
        (FetchPath::Procedure, 2.5, p_on, p_off),
        (FetchPath::Hybrid, 3.5, h_on, h_off),
    ] {
        println!(
            "{path}: a step costs {:.2} RTT with hand-over, {:.2} without; a read outside \
             a hand-over {:.2}; start (enqueue returned) to first activity {:.2} RTT with \
             hand-over, {:.2} without",
            on.step, off.step, on.read, on.start, off.start
        );
        assert!(
            on.step <= limit,
            "{path}: a sequential step took {:.2} RTT with hand-over (limit {limit})",
            on.step
        );
        assert!(
            on.read >= 0.9,
            "{path}: a read outside a hand-over asks the database ({:.2} RTT)",
            on.read
        );
        assert!(
            off.step > on.step + 0.5,
            "{path}: hand-over saves round trips ({:.2} RTT on, {:.2} off)",
            on.step,
            off.step
        );
        // Without hand-over the worker's fetch brings the history its activity's read
        // returns (≈ 4.2 / 5.2 RTT; 5.2 / 6.3 when that read was a round trip of its own).
        assert!(
            off.step < limit + 2.25,
            "{path}: a step without hand-over took {:.2} RTT (limit {})",
            off.step,
            limit + 2.25
        );
        assert!(
            on.start <= 1.5,
            "{path}: the first activity started {:.2} RTT after the start's enqueue returned, \
             with hand-over (limit 1.5)",
            on.start
        );
        assert!(
            off.start > on.start + 1.5,
            "{path}: a handed-over start saves round trips ({:.2} RTT on, {:.2} off)",
            on.start,
            off.start
        );
    }
}
