//! Live adoption of a running duroxide-pg 0.1.38 deployment (issue 12, item 3).
//!
//! A real duroxide-pg 0.1.38 runtime runs a mixed workload (sequences with timers, fan-out,
//! orchestrations waiting for events, sub-orchestrations, continue-as-new loops, KV and
//! custom status, sessions, a timer days away) on one schema. This crate's runtime starts
//! on the same schema while it runs; events go through both clients during the move; the
//! duroxide-pg runtime is stopped (or crashed: its tokio runtime dropped under it) midway;
//! then the remaining events are raised and due timers fire. Asserted: every output, every
//! activity ran once (crash: at most twice, the one a dead worker may have finished without
//! acking), both clients see every instance wherever it lives, the days-away timer still
//! pending at its time, the old tables empty, and finalize leaves only this crate's objects.
//!
//! `cargo test --profile ci --features duroxide-pg-tests --test adopt_duroxide_pg`

#![cfg(feature = "duroxide-pg-tests")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{database_url, init_tracing, unique_schema};
use duroxide::providers::{Provider, ProviderAdmin};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::adopt;
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};
use sqlx::PgPool;

const DAYS_AWAY: Duration = Duration::from_secs(3 * 24 * 3600);

type Runs = Arc<Mutex<HashMap<String, u32>>>;

fn activities(runs: &Runs) -> ActivityRegistry {
    let r1 = runs.clone();
    let r2 = runs.clone();
    ActivityRegistry::builder()
        .register("Work", move |_ctx: ActivityContext, input: String| {
            let runs = r1.clone();
            async move {
                // Long enough that workers are mid-activity when instances move and
                // when the duroxide-pg process goes away; counted when done.
                tokio::time::sleep(Duration::from_millis(150)).await;
                *runs.lock().unwrap().entry(input.clone()).or_default() += 1;
                Ok(format!("{input}!"))
            }
        })
        .register("SessionWork", move |ctx: ActivityContext, input: String| {
            let runs = r2.clone();
            async move {
                *runs.lock().unwrap().entry(input.clone()).or_default() += 1;
                Ok(format!("{input}@{}", ctx.session_id().unwrap_or("none")))
            }
        })
        .build()
}

fn orchestrations() -> OrchestrationRegistry {
    OrchestrationRegistry::builder()
        .register(
            "Chain",
            |ctx: OrchestrationContext, id: String| async move {
                let mut out = Vec::new();
                for step in 0..3 {
                    out.push(
                        ctx.schedule_activity("Work", format!("{id}/chain{step}"))
                            .await?,
                    );
                    ctx.schedule_timer(Duration::from_millis(400)).await;
                }
                Ok(out.join(","))
            },
        )
        .register(
            "FanOut",
            |ctx: OrchestrationContext, id: String| async move {
                let calls = (0..5)
                    .map(|i| ctx.schedule_activity("Work", format!("{id}/fan{i}")))
                    .collect();
                let results: Result<Vec<String>, String> =
                    ctx.join(calls).await.into_iter().collect();
                Ok(results?.join(","))
            },
        )
        .register(
            "WaitEvent",
            |ctx: OrchestrationContext, id: String| async move {
                ctx.set_custom_status("waiting");
                ctx.set_kv_value("phase", "waiting");
                let data = ctx.schedule_wait("go").await;
                ctx.set_kv_value("phase", "done");
                let done = ctx
                    .schedule_activity("Work", format!("{id}/after-{data}"))
                    .await?;
                Ok(format!("got {data}: {done}"))
            },
        )
        .register(
            "Parent",
            |ctx: OrchestrationContext, id: String| async move {
                let child = ctx
                    .schedule_sub_orchestration("Chain", format!("{id}-child"))
                    .await?;
                Ok(format!("child said {child}"))
            },
        )
        .register(
            "Loop",
            |ctx: OrchestrationContext, input: String| async move {
                let (id, n) = input.split_once(':').unwrap();
                let n: u32 = n.parse().unwrap();
                ctx.schedule_activity("Work", format!("{id}/loop{n}"))
                    .await?;
                ctx.schedule_timer(Duration::from_millis(300)).await;
                if n == 7 {
                    return Ok(format!("looped {n}"));
                }
                ctx.continue_as_new(format!("{id}:{}", n + 1)).await
            },
        )
        .register(
            "Session",
            |ctx: OrchestrationContext, id: String| async move {
                let session = format!("s-{id}");
                let a = ctx
                    .schedule_activity_on_session("SessionWork", format!("{id}/s0"), &session)
                    .await?;
                ctx.schedule_timer(Duration::from_millis(500)).await;
                let b = ctx
                    .schedule_activity_on_session("SessionWork", format!("{id}/s1"), &session)
                    .await?;
                Ok(format!("{a}+{b}"))
            },
        )
        .register("Far", |ctx: OrchestrationContext, _id: String| async move {
            ctx.schedule_timer(DAYS_AWAY).await;
            Ok("woke".to_string())
        })
        .build()
}

fn runtime_options() -> RuntimeOptions {
    // Short leases so work a crashed duroxide-pg process held comes back quickly.
    RuntimeOptions {
        orchestrator_lock_timeout: Duration::from_secs(3),
        worker_lock_timeout: Duration::from_secs(3),
        dispatcher_min_poll_interval: Duration::from_millis(20),
        ..RuntimeOptions::default()
    }
}

/// The expected output of each orchestration kind for instance `id`.
fn expected(kind: &str, id: &str, event: &str) -> String {
    match kind {
        "Chain" => (0..3)
            .map(|s| format!("{id}/chain{s}!"))
            .collect::<Vec<_>>()
            .join(","),
        "FanOut" => (0..5)
            .map(|i| format!("{id}/fan{i}!"))
            .collect::<Vec<_>>()
            .join(","),
        "WaitEvent" => format!("got {event}: {id}/after-{event}!"),
        "Parent" => {
            let child = format!("{id}-child");
            format!(
                "child said {}",
                (0..3)
                    .map(|s| format!("{child}/chain{s}!"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
        "Loop" => "looped 7".to_string(),
        "Session" => format!("{id}/s0@s-{id}+{id}/s1@s-{id}"),
        other => panic!("no expectation for {other}"),
    }
}

/// The activity inputs each kind runs (each must run once).
fn activity_keys(kind: &str, id: &str, event: &str) -> Vec<String> {
    match kind {
        "Chain" => (0..3).map(|s| format!("{id}/chain{s}")).collect(),
        "FanOut" => (0..5).map(|i| format!("{id}/fan{i}")).collect(),
        "WaitEvent" => vec![format!("{id}/after-{event}")],
        "Parent" => (0..3).map(|s| format!("{id}-child/chain{s}")).collect(),
        "Loop" => (0..=7).map(|n| format!("{id}/loop{n}")).collect(),
        "Session" => vec![format!("{id}/s0"), format!("{id}/s1")],
        _ => vec![],
    }
}

struct Started {
    kind: &'static str,
    id: String,
    event: String,
}

fn input_for(kind: &str, id: &str) -> String {
    if kind == "Loop" {
        format!("{id}:0")
    } else {
        id.to_string()
    }
}

async fn start(client: &Client, list: &mut Vec<Started>, kind: &'static str, id: String) {
    client
        .start_orchestration(&id, kind, input_for(kind, &id))
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    list.push(Started {
        kind,
        id,
        event: String::new(),
    });
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// How the duroxide-pg runtime goes away midway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Exit {
    Stopped,
    Crashed,
}

/// The duroxide-pg side: its own tokio runtime on a thread, so a crash can drop every
/// task and connection at once.
struct OldSide {
    stop: Option<tokio::sync::oneshot::Sender<Exit>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OldSide {
    fn start(url: String, schema: String, runs: Runs) -> Self {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Exit>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let exit = rt.block_on(async move {
                let provider = Arc::new(
                    duroxide_pg::PostgresProvider::new_with_schema(&url, Some(&schema))
                        .await
                        .expect("duroxide-pg 0.1.38 opens its schema"),
                );
                let runtime = Runtime::start_with_options(
                    provider.clone(),
                    activities(&runs),
                    orchestrations(),
                    runtime_options(),
                )
                .await;
                ready_tx.send(()).unwrap();
                let exit = stop_rx.await.unwrap_or(Exit::Crashed);
                if exit == Exit::Stopped {
                    runtime.shutdown(Some(5_000)).await;
                }
                exit
            });
            if exit == Exit::Crashed {
                // Every task (dispatchers, activities mid-run, connections) dies here.
                rt.shutdown_timeout(Duration::ZERO);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("duroxide-pg runtime started");
        Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn exit(mut self, how: Exit) {
        let _ = self.stop.take().unwrap().send(how);
        self.thread.take().unwrap().join().unwrap();
    }
}

async fn scenario(exit: Exit) {
    init_tracing();
    let url = database_url();
    let schema = unique_schema();
    let companion = adopt::companion_schema(&schema).unwrap();
    let admin = PgPool::connect(&url).await.unwrap();
    let _cleanup = common::SchemaCleanup::for_schemas(&[schema.clone(), companion.clone()]);
    let runs: Runs = Arc::default();

    // 1. duroxide-pg 0.1.38 runs the workload alone.
    let old_side = OldSide::start(url.clone(), schema.clone(), runs.clone());
    let old_client_provider: Arc<dyn Provider> = Arc::new(
        duroxide_pg::PostgresProvider::new_with_schema(&url, Some(&schema))
            .await
            .unwrap(),
    );
    let old_client = Client::new(old_client_provider.clone());
    let mut started = Vec::new();
    let kinds = ["Chain", "FanOut", "WaitEvent", "Parent", "Loop", "Session"];
    for round in 0..3 {
        for kind in kinds {
            start(
                &old_client,
                &mut started,
                kind,
                format!("old-{kind}-{round}"),
            )
            .await;
        }
    }
    start(&old_client, &mut started, "Far", "old-Far".into()).await;
    let far_started_ms = now_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 2. This crate starts on the same schema while duroxide-pg runs. Its first process
    //    does not move instances yet (adoption_mover off), so for a while both runtimes
    //    run side by side, each on the instances living in its tables, and messages cross
    //    over through the routing triggers.
    let ours = Arc::new(
        PostgresProvider::connect_with(
            &url,
            ProviderOptions {
                schema: schema.clone(),
                max_connections: 6,
                adoption_mover: false,
                ..ProviderOptions::default()
            },
        )
        .await
        .expect("duroxide-pg-hybrid adopts a duroxide-pg 0.1.38 schema"),
    );
    assert_eq!(ours.schema(), companion);
    let new_runtime = Runtime::start_with_options(
        ours.clone(),
        activities(&runs),
        orchestrations(),
        runtime_options(),
    )
    .await;
    let new_client = Client::new(ours.clone());
    for kind in kinds {
        start(&new_client, &mut started, kind, format!("new-{kind}")).await;
        start(&old_client, &mut started, kind, format!("late-{kind}")).await;
    }

    // 3. Events through both clients while instances move.
    let waiting: Vec<usize> = started
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind == "WaitEvent")
        .map(|(i, _)| i)
        .collect();
    let (first, rest) = waiting.split_at(waiting.len() / 2);
    for (n, &i) in first.iter().enumerate() {
        let client = if n % 2 == 0 { &old_client } else { &new_client };
        let side = if n % 2 == 0 { "old" } else { "new" };
        started[i].event = format!("{side}{n}");
        client
            .raise_event(&started[i].id, "go", &started[i].event)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_move = adopt::progress(&admin, &companion).await.unwrap();
    assert!(
        before_move.adopted == 0 && before_move.old_instances > 0,
        "{before_move:?}"
    );

    // Before anything moved, this crate's client already sees duroxide-pg's instances
    // (status, custom status, KV), and duroxide-pg's client sees this crate's.
    let waiting_old = started
        .iter()
        .find(|s| s.kind == "WaitEvent" && s.id.starts_with("old-") && s.event.is_empty())
        .expect("an old instance still waiting");
    match new_client
        .get_orchestration_status(&waiting_old.id)
        .await
        .unwrap()
    {
        OrchestrationStatus::Running { custom_status, .. } => {
            assert_eq!(
                custom_status.as_deref(),
                Some("waiting"),
                "{}",
                waiting_old.id
            )
        }
        other => panic!("{} via this crate's client: {other:?}", waiting_old.id),
    }
    assert_eq!(
        new_client
            .get_kv_value(&waiting_old.id, "phase")
            .await
            .unwrap()
            .as_deref(),
        Some("waiting")
    );
    let waiting_new = started
        .iter()
        .find(|s| s.kind == "WaitEvent" && s.id.starts_with("new-"))
        .unwrap();
    assert!(
        matches!(
            old_client
                .get_orchestration_status(&waiting_new.id)
                .await
                .unwrap(),
            OrchestrationStatus::Running { .. } | OrchestrationStatus::Completed { .. }
        ),
        "{} via duroxide-pg's client",
        waiting_new.id
    );

    // Another process of this crate, with the mover on (the default), starts moving.
    let mover = PostgresProvider::connect_with(
        &url,
        ProviderOptions {
            schema: schema.clone(),
            max_connections: 2,
            adoption_interval: Duration::from_millis(200),
            ..ProviderOptions::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;

    // 4. duroxide-pg goes away midway.
    old_side.exit(exit);

    // 5. The remaining events, through both clients (duroxide-pg's client still works
    //    without its runtime).
    for (n, &i) in rest.iter().enumerate() {
        let client = if n % 2 == 0 { &new_client } else { &old_client };
        started[i].event = format!("late{n}");
        client
            .raise_event(&started[i].id, "go", &started[i].event)
            .await
            .unwrap();
    }

    // 6. Everything finishes on this crate's runtime.
    for s in &started {
        if s.kind == "Far" {
            continue;
        }
        let status = new_client
            .wait_for_orchestration(&s.id, Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", s.id));
        match status {
            OrchestrationStatus::Completed { output, .. } => {
                assert_eq!(output, expected(s.kind, &s.id, &s.event), "{}", s.id)
            }
            other => panic!("{}: {other:?}", s.id),
        }
        // duroxide-pg's client sees the same, wherever the instance lives.
        match old_client.get_orchestration_status(&s.id).await.unwrap() {
            OrchestrationStatus::Completed { output, .. } => {
                assert_eq!(
                    output,
                    expected(s.kind, &s.id, &s.event),
                    "{} via duroxide-pg",
                    s.id
                )
            }
            other => panic!("{} via duroxide-pg's client: {other:?}", s.id),
        }
    }
    let runs_now = runs.lock().unwrap().clone();
    for s in &started {
        for key in activity_keys(s.kind, &s.id, &s.event) {
            let n = runs_now.get(&key).copied().unwrap_or(0);
            match exit {
                Exit::Stopped => assert_eq!(n, 1, "activity {key} ran {n} times"),
                Exit::Crashed => assert!((1..=2).contains(&n), "activity {key} ran {n} times"),
            }
        }
    }
    // KV and custom status came along (and are readable through both clients).
    for s in started.iter().filter(|s| s.kind == "WaitEvent") {
        for client in [&new_client, &old_client] {
            assert_eq!(
                client
                    .get_kv_value(&s.id, "phase")
                    .await
                    .unwrap()
                    .as_deref(),
                Some("done"),
                "{}",
                s.id
            );
        }
    }

    // 7. The old tables empty out; the days-away timer is pending at its time.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = adopt::progress(&admin, &companion).await.unwrap();
        if p.is_done() {
            assert_eq!(p.old_leased_activities, 0);
            break;
        }
        assert!(Instant::now() < deadline, "adoption did not finish: {p:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = quote_ident(&companion);
    let far_at: i64 = sqlx::query_scalar(&format!(
        "SELECT visible_at_ms FROM {c}.orchestrator_queue WHERE instance_id = 'old-Far' AND kind = 'TimerFired'"
    ))
    .fetch_one(&admin)
    .await
    .expect("the days-away timer moved with its instance");
    let due = far_started_ms + DAYS_AWAY.as_millis() as i64;
    assert!(
        (far_at - due).abs() < 5_000,
        "timer fires at {far_at}, expected about {due}"
    );
    for client in [&new_client, &old_client] {
        assert!(matches!(
            client.get_orchestration_status("old-Far").await.unwrap(),
            OrchestrationStatus::Running { .. }
        ));
    }

    // Management through duroxide-pg's client reaches moved instances too.
    let listed = old_client.list_all_instances().await.unwrap();
    for id in ["old-Chain-0", "new-Chain", "late-Chain", "old-Far"] {
        assert!(
            listed.iter().any(|l| l == id),
            "{id} not listed: {listed:?}"
        );
    }
    let deleted = old_client
        .delete_instance("old-Parent-1", false)
        .await
        .unwrap();
    assert_eq!(
        deleted.instances_deleted, 2,
        "the parent and its child: {deleted:?}"
    );
    for client in [&new_client, &old_client] {
        assert!(matches!(
            client
                .get_orchestration_status("old-Parent-1")
                .await
                .unwrap(),
            OrchestrationStatus::NotFound
        ));
    }

    // 8. Finalize: only this crate's objects remain; the configured schema still finds them.
    new_runtime.shutdown(Some(5_000)).await;
    let done = adopt::finalize(&admin, &schema).await.expect("finalize");
    assert_eq!(done.data_schema, companion);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(tables, vec![adopt::MARKER_TABLE.to_string()]);
    let functions = count(
        &admin,
        &format!(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = '{schema}'"
        ),
    )
    .await;
    assert_eq!(functions, 0, "duroxide-pg functions left in {schema}");
    let triggers = count(
        &admin,
        &format!(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = r.relnamespace \
             WHERE n.nspname = '{companion}' AND t.tgname LIKE 'adoption%'"
        ),
    )
    .await;
    assert_eq!(triggers, 0);
    // A process that started while adopting still counts after finalize (its own tables).
    let counted = mover
        .get_system_metrics()
        .await
        .expect("metrics after finalize")
        .total_instances;
    mover
        .get_queue_depths()
        .await
        .expect("queue depths after finalize");
    drop(ours);
    mover.close().await;
    let reopened = PostgresProvider::connect_with(
        &url,
        ProviderOptions {
            schema: schema.clone(),
            max_connections: 2,
            ..ProviderOptions::default()
        },
    )
    .await
    .expect("reopen after finalize");
    assert_eq!(reopened.schema(), companion);
    assert_eq!(
        reopened.get_system_metrics().await.unwrap().total_instances,
        counted
    );
    let status = Client::new(Arc::new(reopened.clone()))
        .get_orchestration_status("old-Far")
        .await
        .unwrap();
    assert!(
        matches!(status, OrchestrationStatus::Running { .. }),
        "{status:?}"
    );
    reopened.close().await;
    admin.close().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adopts_a_running_duroxide_pg_deployment_stopped_midway() {
    scenario(Exit::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adopts_a_running_duroxide_pg_deployment_crashed_midway() {
    scenario(Exit::Crashed).await;
}
