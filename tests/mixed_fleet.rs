//! A mixed fleet: two duroxide runtimes on ONE schema, one fetching through the hybrid
//! path and one through the full procedure, running concurrently over a workload that
//! mixes fan-out/fan-in, sequential activities, timers, external events,
//! sub-orchestrations and continue-as-new. Every orchestration must complete with the
//! right output, every scheduled activity must run exactly once, and nothing may be left
//! locked or queued.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{new_provider_with, provider_url, test_options};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{FetchPath, PoolerMode};

const ORCHESTRATIONS: usize = 210;

/// Side effects: how many times each activity input (unique per scheduled activity) ran.
type Ledger = Arc<Mutex<HashMap<String, u32>>>;

fn activities(ledger: Ledger) -> ActivityRegistry {
    ActivityRegistry::builder()
        .register("Work", move |_ctx: ActivityContext, input: String| {
            let ledger = ledger.clone();
            async move {
                *ledger.lock().unwrap().entry(input.clone()).or_insert(0) += 1;
                Ok(format!("done({input})"))
            }
        })
        .build()
}

fn orchestrations() -> OrchestrationRegistry {
    OrchestrationRegistry::builder()
        .register(
            "FanOut",
            |ctx: OrchestrationContext, id: String| async move {
                let calls = (0..4)
                    .map(|k| ctx.schedule_activity("Work", format!("fan-{id}-{k}")))
                    .collect();
                let results = ctx.join(calls).await;
                let joined: Result<Vec<String>, String> = results.into_iter().collect();
                Ok(joined?.join("+"))
            },
        )
        .register(
            "Sequence",
            |ctx: OrchestrationContext, id: String| async move {
                let mut out = Vec::new();
                for k in 0..3 {
                    out.push(
                        ctx.schedule_activity("Work", format!("seq-{id}-{k}"))
                            .await?,
                    );
                }
                Ok(out.join(">"))
            },
        )
        .register(
            "TimerThenEvent",
            |ctx: OrchestrationContext, id: String| async move {
                ctx.schedule_timer(Duration::from_millis(300)).await;
                let go = ctx.schedule_wait("Go").await;
                let r = ctx.schedule_activity("Work", format!("evt-{id}")).await?;
                Ok(format!("{go}:{r}"))
            },
        )
        .register(
            "Parent",
            |ctx: OrchestrationContext, id: String| async move {
                let child = ctx.schedule_sub_orchestration("Child", id.clone()).await?;
                Ok(format!("parent({child})"))
            },
        )
        .register(
            "Child",
            |ctx: OrchestrationContext, id: String| async move {
                ctx.schedule_activity("Work", format!("child-{id}")).await
            },
        )
        .register(
            "Looping",
            |ctx: OrchestrationContext, input: String| async move {
                let (id, round) = input.split_once('#').expect("id#round");
                let round: u32 = round.parse().expect("round");
                ctx.schedule_activity("Work", format!("can-{id}-{round}"))
                    .await?;
                if round < 2 {
                    return ctx.continue_as_new(format!("{id}#{}", round + 1)).await;
                }
                Ok(format!("looped({id})"))
            },
        )
        .build()
}

/// (orchestration, input, expected output, activity inputs it schedules).
fn workload(i: usize) -> (&'static str, String, String, Vec<String>) {
    let id = format!("{i}");
    match i % 5 {
        0 => {
            let keys: Vec<String> = (0..4).map(|k| format!("fan-{id}-{k}")).collect();
            let out = keys
                .iter()
                .map(|k| format!("done({k})"))
                .collect::<Vec<_>>()
                .join("+");
            ("FanOut", id, out, keys)
        }
        1 => {
            let keys: Vec<String> = (0..3).map(|k| format!("seq-{id}-{k}")).collect();
            let out = keys
                .iter()
                .map(|k| format!("done({k})"))
                .collect::<Vec<_>>()
                .join(">");
            ("Sequence", id, out, keys)
        }
        2 => {
            let key = format!("evt-{id}");
            (
                "TimerThenEvent",
                id.clone(),
                format!("go-{id}:done({key})"),
                vec![key],
            )
        }
        3 => {
            let key = format!("child-{id}");
            ("Parent", id, format!("parent(done({key}))"), vec![key])
        }
        _ => {
            let keys: Vec<String> = (0..3).map(|r| format!("can-{id}-{r}")).collect();
            ("Looping", format!("{id}#0"), format!("looped({id})"), keys)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hybrid_and_procedure_runtimes_share_one_schema() {
    fleet(true, true).await;
}

/// Processes with and without the in-process hand-over (`src/handover.rs`) on one
/// schema, each fetch path on each side once: still exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runtimes_with_and_without_handover_share_one_schema() {
    fleet(true, false).await;
    fleet(false, true).await;
}

async fn fleet(hybrid_handover: bool, procedure_handover: bool) {
    let (hybrid, guard) = new_provider_with(FetchPath::Hybrid, move |o| {
        o.handover = hybrid_handover;
    })
    .await;
    assert_eq!(hybrid.fetch_path(), FetchPath::Hybrid);
    let mut procedure_options = test_options(guard.schema(), FetchPath::Procedure);
    procedure_options.handover = procedure_handover;
    let procedure = Arc::new(
        common::connect_waiting(&provider_url(), procedure_options)
            .await
            .unwrap(),
    );
    assert_eq!(procedure.fetch_path(), FetchPath::Procedure);
    if common::via_pgbouncer() {
        // Run by scripts/test.sh a second time with every call through PgBouncer.
        assert_eq!(hybrid.pooler(), PoolerMode::Transaction);
        assert_eq!(procedure.pooler(), PoolerMode::Transaction);
    }

    let ledger: Ledger = Arc::default();
    let options = RuntimeOptions {
        orchestration_concurrency: 3,
        worker_concurrency: 3,
        ..Default::default()
    };
    let rt_h = Runtime::start_with_options(
        hybrid.clone(),
        activities(ledger.clone()),
        orchestrations(),
        options.clone(),
    )
    .await;
    let rt_p = Runtime::start_with_options(
        procedure.clone(),
        activities(ledger.clone()),
        orchestrations(),
        options,
    )
    .await;

    let clients = [Client::new(hybrid.clone()), Client::new(procedure.clone())];
    let mut expected_keys = Vec::new();
    let mut waits = Vec::new();
    for i in 0..ORCHESTRATIONS {
        let (name, input, output, keys) = workload(i);
        expected_keys.extend(keys);
        let instance = format!("fleet-{i}");
        let client = clients[i % 2].clone();
        client
            .start_orchestration(&instance, name, input)
            .await
            .unwrap();
        waits.push((instance, output, name));
    }
    // Release the event waiters once they are subscribed (raising early is fine too:
    // duroxide buffers nothing before the subscription, so retry until completion).
    let raiser = {
        let client = clients[1].clone();
        let targets: Vec<String> = (0..ORCHESTRATIONS)
            .filter(|i| i % 5 == 2)
            .map(|i| format!("fleet-{i}"))
            .collect();
        tokio::spawn(async move {
            for _round in 0..60 {
                let mut pending = 0;
                for t in &targets {
                    match client.get_orchestration_status(t).await {
                        Ok(OrchestrationStatus::Completed { .. }) => {}
                        _ => {
                            pending += 1;
                            let id = t.trim_start_matches("fleet-");
                            let _ = client.raise_event(t, "Go", format!("go-{id}")).await;
                        }
                    }
                }
                if pending == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    for (i, (instance, output, name)) in waits.iter().enumerate() {
        let status = clients[i % 2]
            .wait_for_orchestration(instance, Duration::from_secs(120))
            .await;
        match status {
            Ok(OrchestrationStatus::Completed { output: got, .. }) => {
                assert_eq!(
                    &got, output,
                    "{instance} ({name}) completed with the wrong output"
                )
            }
            other => panic!("{instance} ({name}) did not complete: {other:?}"),
        }
    }
    raiser.await.unwrap();
    rt_h.shutdown(None).await;
    rt_p.shutdown(None).await;

    // Exactly once per scheduled activity.
    let ran = ledger.lock().unwrap().clone();
    for key in &expected_keys {
        assert_eq!(
            ran.get(key).copied(),
            Some(1),
            "activity {key} ran {:?} times",
            ran.get(key)
        );
    }
    assert_eq!(ran.len(), expected_keys.len(), "unexpected activities ran");

    // Nothing left locked or queued.
    let q = duroxide_pg_hybrid::schema::quote_ident(guard.schema());
    for table in [
        "instance_locks",
        "orchestrator_queue",
        "worker_queue",
        "pending_instances",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {q}.{table}"))
            .fetch_one(hybrid.pool())
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} still holds {n} rows");
    }
    println!(
        "{} orchestrations, {} activities, both paths (hand-over: hybrid {hybrid_handover}, \
         procedure {procedure_handover})",
        ORCHESTRATIONS,
        expected_keys.len()
    );
}
