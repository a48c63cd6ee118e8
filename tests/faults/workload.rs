//! The runtime workload of the fault tests: fan-out/fan-in, timers, sub-orchestrations
//! and continue-as-new, with a side-effect ledger counting how often each scheduled
//! activity ran, and the checks applied after a faulty run.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use duroxide::runtime::registry::ActivityRegistry;
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};

/// Side effects: how many times each activity input (unique per scheduled activity) ran.
pub type Ledger = Arc<Mutex<HashMap<String, u32>>>;

pub fn activities(ledger: Ledger) -> ActivityRegistry {
    ActivityRegistry::builder()
        .register("Work", move |_ctx: ActivityContext, input: String| {
            let ledger = ledger.clone();
            async move {
                *ledger.lock().unwrap().entry(input.clone()).or_insert(0) += 1;
                // Jobs whose prefix contains "slow" keep their activities running for a while
                // (e.g. across a server restart).
                let ms = if input.contains("slow") { 1500 } else { 5 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(format!("done({input})"))
            }
        })
        .build()
}

pub fn orchestrations(timer: Duration) -> OrchestrationRegistry {
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
            "Timers",
            move |ctx: OrchestrationContext, id: String| async move {
                let a = ctx.schedule_activity("Work", format!("tm-{id}-0")).await?;
                ctx.schedule_timer(timer).await;
                let b = ctx.schedule_activity("Work", format!("tm-{id}-1")).await?;
                Ok(format!("{a}>{b}"))
            },
        )
        .register(
            "Parent",
            |ctx: OrchestrationContext, id: String| async move {
                let child = ctx.schedule_sub_orchestration("Child", id.clone()).await?;
                let own = ctx.schedule_activity("Work", format!("par-{id}")).await?;
                Ok(format!("parent({child}|{own})"))
            },
        )
        .register(
            "Child",
            |ctx: OrchestrationContext, id: String| async move {
                let a = ctx
                    .schedule_activity("Work", format!("child-{id}-0"))
                    .await?;
                let b = ctx
                    .schedule_activity("Work", format!("child-{id}-1"))
                    .await?;
                Ok(format!("{a},{b}"))
            },
        )
        .register(
            "Signal",
            |ctx: OrchestrationContext, id: String| async move {
                let data = ctx.schedule_wait("Go").await;
                let done = ctx
                    .schedule_activity("Work", format!("sig-{id}-{data}"))
                    .await?;
                Ok(format!("signal({done})"))
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

/// One orchestration of the workload.
pub struct Job {
    pub instance: String,
    pub orchestration: &'static str,
    pub input: String,
    pub output: String,
    /// Inputs of the activities it schedules (each unique across the workload).
    pub activities: Vec<String>,
}

/// The `i`-th job; `prefix` keeps instance ids and activity inputs unique per run.
pub fn job(prefix: &str, i: usize) -> Job {
    let id = format!("{prefix}{i}");
    let done = |k: &str| format!("done({k})");
    let (orchestration, input, output, activities) = match i % 4 {
        0 => {
            let keys: Vec<String> = (0..4).map(|k| format!("fan-{id}-{k}")).collect();
            let out = keys.iter().map(|k| done(k)).collect::<Vec<_>>().join("+");
            ("FanOut", id.clone(), out, keys)
        }
        1 => {
            let keys: Vec<String> = (0..2).map(|k| format!("tm-{id}-{k}")).collect();
            let out = format!("{}>{}", done(&keys[0]), done(&keys[1]));
            ("Timers", id.clone(), out, keys)
        }
        2 => {
            let keys = vec![
                format!("child-{id}-0"),
                format!("child-{id}-1"),
                format!("par-{id}"),
            ];
            let out = format!(
                "parent({},{}|{})",
                done(&keys[0]),
                done(&keys[1]),
                done(&keys[2])
            );
            ("Parent", id.clone(), out, keys)
        }
        _ => {
            let keys: Vec<String> = (0..3).map(|r| format!("can-{id}-{r}")).collect();
            ("Looping", format!("{id}#0"), format!("looped({id})"), keys)
        }
    };
    Job {
        instance: format!("job-{id}"),
        orchestration,
        input,
        output,
        activities,
    }
}

/// A job that waits for the external event "Go" (data "go") before its activity: the
/// client raises it once the instance runs.
pub fn signal_job(prefix: &str, i: usize) -> Job {
    let id = format!("{prefix}sig{i}");
    let key = format!("sig-{id}-go");
    Job {
        instance: format!("job-{id}"),
        orchestration: "Signal",
        input: id,
        output: format!("signal(done({key}))"),
        activities: vec![key],
    }
}

/// Polls until the instance is Completed or Failed, ignoring provider errors (the
/// connection faults under test hit the client too). Panics at the deadline.
pub async fn wait_terminal(
    client: &Client,
    instance: &str,
    timeout: Duration,
) -> OrchestrationStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client.get_orchestration_status(instance).await {
            Ok(
                s @ (OrchestrationStatus::Completed { .. } | OrchestrationStatus::Failed { .. }),
            ) => return s,
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert!(
            Instant::now() < deadline,
            "{instance} did not finish within {timeout:?} (last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for every job and checks its output. On failure the panic message includes
/// the schema's queues and leases (`url`, `schema`).
pub async fn expect_completed(
    client: &Client,
    jobs: &[Job],
    timeout: Duration,
    url: &str,
    schema: &str,
) {
    let deadline = Instant::now() + timeout;
    for j in jobs {
        let problem = loop {
            match client.get_orchestration_status(&j.instance).await {
                Ok(OrchestrationStatus::Completed { output, .. }) if output == j.output => {
                    break None;
                }
                Ok(OrchestrationStatus::Completed { output, .. }) => {
                    break Some(format!(
                        "completed with the wrong output {output:?}, expected {:?}",
                        j.output
                    ));
                }
                Ok(s @ OrchestrationStatus::Failed { .. }) => {
                    break Some(format!("did not complete: {s:?}"));
                }
                Ok(other) if Instant::now() >= deadline => {
                    break Some(format!("did not finish within {timeout:?}: {other:?}"));
                }
                Err(e) if Instant::now() >= deadline => {
                    break Some(format!("did not finish within {timeout:?}: error {e}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if let Some(problem) = problem {
            let state = dump_state(url, schema).await;
            panic!("{} ({}) {problem}\n{state}", j.instance, j.orchestration);
        }
    }
}

/// The schema's queues, leases and unfinished executions, and the server sessions of
/// its providers, for failure messages.
pub async fn dump_state(url: &str, schema: &str) -> String {
    let q = duroxide_pg_hybrid::schema::quote_ident(schema);
    let mut conn = super::support::connect_retry(url).await;
    let mut out = format!("state of schema {schema}:\n");
    let queries = [
        format!(
            "SELECT 'orch ' || id || ' ' || instance_id || ' ' || kind || ' token=' || coalesce(lock_token, '-')              || ' visible_in=' || (visible_at_ms - {q}.now_ms()) || ' attempts=' || attempt_count              FROM {q}.orchestrator_queue ORDER BY id LIMIT 50"
        ),
        format!(
            "SELECT 'lock ' || instance_id || ' ' || lock_token || ' left=' || (locked_until_ms - {q}.now_ms())              FROM {q}.instance_locks LIMIT 50"
        ),
        format!(
            "SELECT 'work ' || id || ' ' || instance_id || ' act=' || activity_id || ' token=' || coalesce(lock_token, '-')              || ' left=' || coalesce((locked_until_ms - {q}.now_ms())::text, '-') || ' attempts=' || attempt_count              FROM {q}.worker_queue ORDER BY id LIMIT 50"
        ),
        format!(
            "SELECT 'running ' || instance_id || ' exec=' || execution_id FROM {q}.executions              WHERE status = 'Running' ORDER BY instance_id LIMIT 50"
        ),
        format!(
            "SELECT 'session ' || pid || ' ' || application_name || ' ' || coalesce(state, '-') || ' ' ||              coalesce(wait_event_type || '/' || wait_event, '-') || ' ' || left(coalesce(query, ''), 80)              FROM pg_stat_activity WHERE application_name LIKE '%' || '{schema}' || '%'"
        ),
    ];
    for sql in queries {
        match sqlx::query_scalar::<_, String>(&sql)
            .fetch_all(&mut conn)
            .await
        {
            Ok(rows) => {
                for r in rows {
                    out.push_str(&r);
                    out.push('\n');
                }
            }
            Err(e) => out.push_str(&format!("({sql}: {e})\n")),
        }
    }
    out
}

/// Checks the ledger against the jobs: every scheduled activity ran at least once,
/// nothing else ran, and every extra run is covered by a failed `ack_work_item` of the
/// same activity (duroxide abandons an activity whose ack failed and runs it again:
/// at-least-once delivery). Returns the number of extra runs.
pub fn check_ledger(ledger: &Ledger, jobs: &[Job], failed_acks: &HashMap<String, u32>) -> u32 {
    check_ledger_with(ledger, jobs, failed_acks, None)
}

/// [`check_ledger`], and with `deliveries` (leases per activity, from the recording
/// provider) also: no activity ran more often than it was leased, i.e. a lease never
/// ran an activity twice; a re-run needs a new lease, which the provider hands out only
/// after the previous one was given up (a failed ack makes duroxide abandon it) or
/// expired.
pub fn check_ledger_with(
    ledger: &Ledger,
    jobs: &[Job],
    failed_acks: &HashMap<String, u32>,
    deliveries: Option<&HashMap<String, u32>>,
) -> u32 {
    let ledger = ledger.lock().unwrap();
    let mut extra = 0;
    let mut expected = 0;
    for key in jobs.iter().flat_map(|j| j.activities.iter()) {
        expected += 1;
        let runs = ledger.get(key).copied().unwrap_or(0);
        assert!(runs >= 1, "activity {key} never ran");
        if let Some(d) = deliveries {
            let leased = d.get(key).copied().unwrap_or(0);
            assert!(
                runs <= leased,
                "activity {key} ran {runs} times on {leased} leases: run twice on one lease"
            );
        }
        if runs > 1 {
            let allowed = failed_acks.get(key).copied().unwrap_or(0);
            assert!(
                runs - 1 <= allowed,
                "activity {key} ran {runs} times, but only {allowed} of its acks failed: a duplicate \
                 execution that at-least-once delivery does not explain"
            );
            extra += runs - 1;
        }
    }
    assert_eq!(
        ledger.len(),
        expected,
        "activities outside the workload ran"
    );
    extra
}

/// Waits until the schema holds no lease and no queued message (the last acks may still
/// be in flight, and a lease orphaned by a lost reply must run out and be taken over),
/// then asserts it. Uses its own connection.
pub async fn assert_drained(url: &str, schema: &str, timeout: Duration) {
    let q = duroxide_pg_hybrid::schema::quote_ident(schema);
    let deadline = Instant::now() + timeout;
    let mut conn = super::support::connect_retry(url).await;
    loop {
        let mut counts = Vec::new();
        for table in ["instance_locks", "orchestrator_queue", "worker_queue"] {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {q}.{table}"))
                .fetch_one(&mut conn)
                .await
                .expect("count");
            counts.push((table, n));
        }
        if counts.iter().all(|(_, n)| *n == 0) {
            return;
        }
        if Instant::now() >= deadline {
            let rows: Vec<(String, String, i64)> = sqlx::query_as(&format!(
                "SELECT 'lock', instance_id, locked_until_ms - {q}.now_ms() FROM {q}.instance_locks \
                 UNION ALL SELECT 'orch', instance_id || ' ' || kind, visible_at_ms - {q}.now_ms() FROM {q}.orchestrator_queue \
                 UNION ALL SELECT 'work', instance_id, coalesce(locked_until_ms - {q}.now_ms(), 0) FROM {q}.worker_queue"
            ))
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
            panic!(
                "schema {schema} not drained after {timeout:?}: {counts:?}; rows (kind, what, ms left): {rows:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
