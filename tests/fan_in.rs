//! Fan-in grace (`ProviderOptions::fan_in_grace`, `ack_work_item_handover` in
//! migrations/functions/09_handover.sql): a completion that makes its instance runnable
//! while other activities of the instance are outstanding holds the instance back for
//! the grace, so the completions of a fan-out run in one turn.
//!
//! * completions before the last wait; the last one ends the grace at once, whichever
//!   process acks it and whatever that process's grace (0 = a process with it off), also
//!   when the completions are acked at the same moment;
//! * a turn that needs only some completions runs when the grace ends: a fetch that
//!   waited before the ack is told when (it does not sleep to its fallback poll);
//! * grace 0 claims every completion at once, as before;
//! * a running runtime: fan-outs run in two turns each, and a `select2` of a quick and a
//!   slow activity is delayed by the grace, no more.

mod common;

use std::time::{Duration, Instant};

use common::{
    completion, counter, database_url, fan_out, new_provider_with, orchestration_metadata,
    test_options, with_metrics,
};
use duroxide::providers::{Provider, WorkItem};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, Either2, OrchestrationContext, OrchestrationRegistry,
    OrchestrationStatus,
};
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{FetchPath, PostgresProvider, ProviderOptions};
use metrics_util::debugging::Snapshotter;
use sqlx::Connection;

const LOCK: Duration = Duration::from_secs(30);
const NOW: Duration = Duration::ZERO;

fn grace(ms: u64) -> impl FnOnce(&mut ProviderOptions) {
    move |o: &mut ProviderOptions| {
        o.fan_in_grace = Duration::from_millis(ms);
        // Only the grace's own notice may wake a waiting fetch in these tests.
        o.fallback_poll_interval = Duration::from_secs(30);
    }
}

/// Milliseconds from the database's now until the instance is claimable (negative =
/// claimable already), from its claim state.
async fn claimable_in_ms(p: &PostgresProvider, instance: &str) -> i64 {
    let q = quote_ident(p.schema());
    sqlx::query_scalar(&format!(
        "SELECT p.claimable_at_ms - {q}.now_ms() FROM {q}.pending_instances p \
         WHERE p.instance_id = $1"
    ))
    .bind(instance)
    .fetch_one(p.pool())
    .await
    .unwrap()
}

/// Acks a turn that appends nothing and schedules nothing (the instance stays running).
async fn ack_running_turn(p: &PostgresProvider, token: &str) {
    p.ack_orchestration_item(
        token,
        1,
        vec![],
        vec![],
        vec![],
        orchestration_metadata(),
        vec![],
    )
    .await
    .unwrap();
}

async fn next_turn_now(p: &PostgresProvider) -> Option<(Vec<WorkItem>, String)> {
    p.fetch_orchestration_item(LOCK, NOW, None)
        .await
        .unwrap()
        .map(|(item, token, _)| (item.messages, token))
}

/// Completions before the last are held (no turn, claimable a grace later); the last one
/// makes the instance claimable at once, with every completion in one turn.
#[tokio::test]
async fn completions_wait_for_the_last_of_their_fan_out() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, grace(1_000)).await;
    let tokens = fan_out(&p, "fi-all", 3).await;
    for (t, id) in tokens.iter().zip(1..3) {
        p.ack_work_item(t, Some(completion("fi-all", id)))
            .await
            .unwrap();
        assert!(next_turn_now(&p).await.is_none(), "completion {id} is held");
        let left = claimable_in_ms(&p, "fi-all").await;
        assert!(
            (500..=1_000).contains(&left),
            "held for the grace after completion {id}: {left} ms left"
        );
    }
    p.ack_work_item(&tokens[2], Some(completion("fi-all", 3)))
        .await
        .unwrap();
    let (messages, _) = next_turn_now(&p)
        .await
        .expect("the last completion ends the grace");
    assert_eq!(messages.len(), 3, "one turn for the whole fan-out");
    p.close().await;
}

/// Completions of one fan-out acked at the same moment (activities that finish together,
/// on several worker slots): whichever commits last still ends the grace, though each
/// saw the others' activities queued when it began. Before the claim-state row lock,
/// 18 of 20 fan-ins of 3 stayed held for the whole grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_acked_together_end_the_grace() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, grace(1_000)).await;
    for k in 0..20 {
        let instance = format!("fi-together-{k}");
        let tokens = fan_out(&p, &instance, 5).await;
        let acks = tokens.iter().zip(1..=5).map(|(token, id)| {
            let (p, instance) = (p.clone(), instance.clone());
            async move {
                p.ack_work_item(token, Some(completion(&instance, id)))
                    .await
                    .unwrap();
            }
        });
        futures::future::join_all(acks).await;
        let left = claimable_in_ms(&p, &instance).await;
        assert!(
            left <= 0,
            "{instance}: still held, {left} ms of the grace left"
        );
        let (messages, token) = next_turn_now(&p)
            .await
            .unwrap_or_else(|| panic!("{instance}: the fan-in is claimable at once"));
        assert_eq!(
            messages.len(),
            5,
            "{instance}: one turn for the whole fan-out"
        );
        ack_running_turn(&p, &token).await;
    }
    p.close().await;
}

/// The grace is a bound: a fetch that waited before the first completion's ack gets the
/// partial fan-in when the grace ends (the ack tells it when; its fallback poll is 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_fan_in_runs_when_the_grace_ends() {
    let (p, _guard) = new_provider_with(FetchPath::Procedure, grace(400)).await;
    let tokens = fan_out(&p, "fi-part", 2).await;
    let waiter = {
        let p = p.clone();
        tokio::spawn(async move {
            let r = p
                .fetch_orchestration_item(LOCK, Duration::from_secs(20), None)
                .await
                .unwrap();
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let acked = Instant::now();
    p.ack_work_item(&tokens[0], Some(completion("fi-part", 1)))
        .await
        .unwrap();
    let (turn, at) = waiter.await.unwrap();
    let (item, token, _) = turn.expect("a turn within the fetch's timeout");
    let after = at.duration_since(acked);
    assert_eq!(item.messages.len(), 1);
    assert!(
        after >= Duration::from_millis(300) && after < Duration::from_secs(3),
        "claimed {after:?} after the ack; the grace is 400 ms"
    );
    ack_running_turn(&p, &token).await;
    // The other activity still completes into a turn of its own.
    p.ack_work_item(&tokens[1], Some(completion("fi-part", 2)))
        .await
        .unwrap();
    let (messages, _) = next_turn_now(&p).await.expect("the last completion");
    assert_eq!(messages.len(), 1);
    p.close().await;
}

/// The last completion takes the held fan-in for a fetch of its process that waits: the
/// claim's lease write ends the grace. When that claim cannot take the turn (here the
/// instance's claim lock is busy, as during a delete), the ack ends the grace itself, so
/// any fetch claims the fan-in at once rather than when the grace runs out.
#[test]
fn the_last_completion_hands_the_fan_in_over_or_ends_the_grace() {
    with_metrics(|m| async move {
        let handovers = || {
            counter(
                &m,
                "duroxide_pg_handovers_total",
                &[("queue", "orchestrator")],
            )
        };
        let (p, _guard) = new_provider_with(FetchPath::Hybrid, grace(1_000)).await;
        let q = quote_ident(p.schema());
        for busy in [false, true] {
            let instance = if busy { "fi-ho-busy" } else { "fi-ho" };
            let tokens = fan_out(&p, instance, 3).await;
            for (t, id) in tokens.iter().zip(1..3) {
                p.ack_work_item(t, Some(completion(instance, id)))
                    .await
                    .unwrap();
            }
            let waiter = {
                let p = p.clone();
                tokio::spawn(async move {
                    p.fetch_orchestration_item(LOCK, Duration::from_secs(20), None)
                        .await
                        .unwrap()
                })
            };
            // The fetch's empty claim is done and it waits.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut lock_holder = sqlx::PgConnection::connect(&database_url()).await.unwrap();
            let lock =
                |f: &str| format!("SELECT {f}({q}.instance_lock_space(), hashtext('{instance}'))");
            if busy {
                sqlx::query(&lock("pg_advisory_lock"))
                    .execute(&mut lock_holder)
                    .await
                    .unwrap();
            }
            let before = handovers();
            p.ack_work_item(&tokens[2], Some(completion(instance, 3)))
                .await
                .unwrap();
            if busy {
                let left = claimable_in_ms(&p, instance).await;
                assert!(
                    left <= 0,
                    "the grace ended with the last completion: {left} ms left"
                );
                assert_eq!(handovers(), before, "the busy instance was not handed over");
                sqlx::query(&lock("pg_advisory_unlock"))
                    .execute(&mut lock_holder)
                    .await
                    .unwrap();
            } else {
                assert_eq!(handovers(), before + 1, "the fan-in is handed over");
            }
            let (item, token, _) = waiter.await.unwrap().expect("the fan-in's turn");
            assert_eq!(item.instance, instance);
            assert_eq!(item.messages.len(), 3, "one turn for the whole fan-out");
            ack_running_turn(&p, &token).await;
        }
        p.close().await;
    });
}

/// A process with the grace off (0; or a release without it) still ends a grace another
/// process started, and claims every completion of its own at once.
#[tokio::test]
async fn a_process_without_grace_ends_it_and_claims_at_once() {
    let (held, guard) = new_provider_with(FetchPath::Hybrid, grace(1_000)).await;
    let mut options = test_options(guard.schema(), FetchPath::Hybrid);
    options.fan_in_grace = Duration::ZERO;
    let plain = PostgresProvider::connect_with(&database_url(), options)
        .await
        .unwrap();

    let tokens = fan_out(&held, "fi-mixed", 2).await;
    held.ack_work_item(&tokens[0], Some(completion("fi-mixed", 1)))
        .await
        .unwrap();
    assert!(
        next_turn_now(&plain).await.is_none(),
        "held by the first ack's grace"
    );
    plain
        .ack_work_item(&tokens[1], Some(completion("fi-mixed", 2)))
        .await
        .unwrap();
    let (messages, token) = next_turn_now(&plain).await.expect("the last completion");
    assert_eq!(messages.len(), 2);
    ack_running_turn(&plain, &token).await;

    let tokens = fan_out(&plain, "fi-off", 2).await;
    plain
        .ack_work_item(&tokens[0], Some(completion("fi-off", 1)))
        .await
        .unwrap();
    let (messages, _) = next_turn_now(&plain)
        .await
        .expect("grace 0: the first completion is claimable at once");
    assert_eq!(messages.len(), 1);
    plain.close().await;
    held.close().await;
}

/// Grace above the limit is refused before connecting.
#[test]
fn a_grace_above_the_limit_is_refused() {
    let options = ProviderOptions {
        fan_in_grace: duroxide_pg_hybrid::MAX_FAN_IN_GRACE + Duration::from_millis(1),
        ..ProviderOptions::default()
    };
    let e = options.validate().unwrap_err();
    assert!(e.to_string().contains("fan_in_grace"), "{e}");
}

/// Orchestration turns this process ran: claimed fetches and turns handed over.
fn turns(s: &Snapshotter) -> u64 {
    let orchestrator = ("queue", "orchestrator");
    counter(
        s,
        "duroxide_pg_claims_total",
        &[orchestrator, ("outcome", "claimed")],
    ) + counter(s, "duroxide_pg_handovers_total", &[orchestrator])
}

async fn until_completed(client: &Client, instance: &str) -> String {
    match client
        .wait_for_orchestration(instance, Duration::from_secs(30))
        .await
        .unwrap()
    {
        OrchestrationStatus::Completed { output, .. } => output,
        other => panic!("{instance}: {other:?}"),
    }
}

/// A running runtime (4 worker slots): 8 fan-outs of 5 run in two turns each (start,
/// fan-in); a `select2` of a quick and a 5 s activity continues after the grace, long
/// before the slow one ends.
#[test]
fn a_runtime_joins_fan_outs_in_one_turn_and_select_waits_only_the_grace() {
    with_metrics(|snapshotter| async move {
        let (p, _guard) = new_provider_with(FetchPath::Hybrid, grace(300)).await;
        let activities = ActivityRegistry::builder()
            .register("Echo", |_ctx: ActivityContext, input: String| async move {
                Ok(input)
            })
            .register("Slow", |_ctx: ActivityContext, input: String| async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(input)
            })
            .build();
        let orchestrations = OrchestrationRegistry::builder()
            .register(
                "FanOut",
                |ctx: OrchestrationContext, _in: String| async move {
                    let calls = (0..5)
                        .map(|i| ctx.schedule_activity("Echo", i.to_string()))
                        .collect();
                    let results = ctx.join(calls).await;
                    Ok(results
                        .into_iter()
                        .collect::<Result<Vec<_>, _>>()?
                        .join(","))
                },
            )
            .register(
                "Race",
                |ctx: OrchestrationContext, _in: String| async move {
                    let quick = ctx.schedule_activity("Echo", "quick");
                    let slow = ctx.schedule_activity("Slow", "slow");
                    match ctx.select2(quick, slow).await {
                        Either2::First(r) | Either2::Second(r) => r,
                    }
                },
            )
            .build();
        let runtime = Runtime::start_with_options(
            p.clone(),
            activities,
            orchestrations,
            RuntimeOptions {
                worker_concurrency: 4,
                ..RuntimeOptions::default()
            },
        )
        .await;
        let client = Client::new(p.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;

        let before = turns(&snapshotter);
        for i in 0..8 {
            client
                .start_orchestration(&format!("fi-fan-{i}"), "FanOut", "")
                .await
                .unwrap();
        }
        for i in 0..8 {
            assert_eq!(
                until_completed(&client, &format!("fi-fan-{i}")).await,
                "0,1,2,3,4"
            );
        }
        let fan_turns = turns(&snapshotter) - before;
        assert!(
            fan_turns <= 8 * 2 + 1,
            "8 fan-outs of 5 ran {fan_turns} turns (2 each expected)"
        );

        let started = Instant::now();
        client
            .start_orchestration("fi-race", "Race", "")
            .await
            .unwrap();
        assert_eq!(until_completed(&client, "fi-race").await, "quick");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "select2 of a quick and a 5 s activity took {took:?} (grace 300 ms)"
        );
        runtime.shutdown(Some(1000)).await;
        p.close().await;
    });
}
