//! `latency`: one orchestration of 5 sequential activities at a time, default
//! `RuntimeOptions`, start→completed percentiles at several simulated round-trip times.
//!
//! Two clocks per orchestration:
//! - `completed`: from just before `start_orchestration` to the timestamp the runtime
//!   stamped on the `OrchestrationCompleted` event (read back from history afterwards).
//!   This is the engine's latency, free of the client's status-poll backoff.
//! - `observed`: until `wait_for_orchestration` returned, which adds duroxide's client
//!   poll backoff (5 ms doubling to 100 ms) on top: what a caller waiting on the client sees.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{self, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, EventKind, OrchestrationContext, OrchestrationRegistry,
    OrchestrationStatus,
};
use serde_json::json;

use crate::Opts;
use crate::providers::{BoxError, Env, Session};
use crate::results::{Record, median, percentile};
use duroxide::providers::Provider;

pub const STEPS: usize = 5;

/// Orchestrations run before the measured ones in each run. A statement's first use on
/// a pooled connection costs an extra round trip (Parse/Describe), once per connection;
/// the hybrid path spreads a turn's four reads over four connections, so one warm-up
/// orchestration left cold (statement, connection) pairs in the measured ones (2026-12-07:
/// hybrid p50 at RTT 50 ms 975 ms with 1, 925 ms over 24 samples). Three reach the steady
/// state a long-running process is in, for every provider alike.
const WARM_UP: usize = 3;

pub fn registries(activity_ms: u64) -> (ActivityRegistry, OrchestrationRegistry) {
    let activities = ActivityRegistry::builder()
        .register(
            "Step",
            move |_ctx: ActivityContext, input: String| async move {
                if activity_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(activity_ms)).await;
                }
                Ok(input)
            },
        )
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "Chain",
            |ctx: OrchestrationContext, input: String| async move {
                let mut value = input;
                for i in 0..STEPS {
                    value = ctx.schedule_activity("Step", format!("{value}{i}")).await?;
                }
                Ok(value)
            },
        )
        .build();
    (activities, orchestrations)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Sample {
    completed_ms: f64,
    observed_ms: f64,
    round_trips: Option<f64>,
    statements: Option<f64>,
}

pub async fn run(env: &Env, opts: &Opts) -> Result<Vec<Record>, BoxError> {
    let rtts = opts.rtts(&[0, 10, 50]);
    let samples = opts.samples.unwrap_or(if opts.quick { 3 } else { 8 });
    let mut out = Vec::new();
    for &rtt in &rtts {
        let mut per: Vec<(String, [Vec<f64>; 6])> = Vec::new();
        for run in 0..opts.runs {
            for &kind in &opts.providers {
                let session = env.session("lat", kind, rtt, false, false).await?;
                let r = one_run(&session, run, samples, opts.activity_ms).await;
                session.teardown(env).await;
                let results = r.map_err(|e| format!("latency {kind} rtt={rtt}: {e}"))?;
                let completed: Vec<f64> = results.iter().map(|s| s.completed_ms).collect();
                let observed: Vec<f64> = results.iter().map(|s| s.observed_ms).collect();
                let rts: Vec<f64> = results.iter().filter_map(|s| s.round_trips).collect();
                let stmts: Vec<f64> = results.iter().filter_map(|s| s.statements).collect();
                let values = [
                    percentile(&completed, 50.0),
                    percentile(&completed, 95.0),
                    percentile(&observed, 50.0),
                    percentile(&observed, 95.0),
                    if rts.is_empty() {
                        f64::NAN
                    } else {
                        median(&rts)
                    },
                    if stmts.is_empty() {
                        f64::NAN
                    } else {
                        median(&stmts)
                    },
                ];
                eprintln!(
                    "  latency rtt={rtt}ms {kind} run {}: completed p50 {:.0} ms p95 {:.0} ms; observed p50 {:.0} ms",
                    run + 1,
                    values[0],
                    values[1],
                    values[2]
                );
                let idx = match per.iter().position(|p| p.0 == kind.name()) {
                    Some(i) => i,
                    None => {
                        per.push((kind.name().to_string(), Default::default()));
                        per.len() - 1
                    }
                };
                for (slot, v) in per[idx].1.iter_mut().zip(values) {
                    if v.is_finite() {
                        slot.push(v);
                    }
                }
            }
        }
        let case = format!("chain of {STEPS}");
        for (provider, [c50, c95, o50, o95, rts, stmts]) in per {
            let extra = json!({"samples_per_run": samples, "warm_up": WARM_UP, "activity_ms": opts.activity_ms, "runtime_options": "default"});
            out.push(
                Record::new(
                    "latency",
                    &provider,
                    &case,
                    rtt,
                    "completed_p50_ms",
                    "ms",
                    c50,
                )
                .with_extra(extra),
            );
            out.push(Record::new(
                "latency",
                &provider,
                &case,
                rtt,
                "completed_p95_ms",
                "ms",
                c95,
            ));
            out.push(Record::new(
                "latency",
                &provider,
                &case,
                rtt,
                "observed_p50_ms",
                "ms",
                o50,
            ));
            out.push(Record::new(
                "latency",
                &provider,
                &case,
                rtt,
                "observed_p95_ms",
                "ms",
                o95,
            ));
            if !rts.is_empty() {
                out.push(Record::new(
                    "latency",
                    &provider,
                    &case,
                    rtt,
                    "round_trips_per_orch",
                    "bursts",
                    rts,
                ));
            }
            if !stmts.is_empty() {
                out.push(Record::new(
                    "latency",
                    &provider,
                    &case,
                    rtt,
                    "statements_per_orch",
                    "stmts",
                    stmts,
                ));
            }
        }
    }
    Ok(out)
}

async fn one_run(
    session: &Session,
    run: usize,
    samples: usize,
    activity_ms: u64,
) -> Result<Vec<Sample>, BoxError> {
    let provider = session.dyn_provider();
    let (acts, orchs) = registries(activity_ms);
    let rt = runtime::Runtime::start_with_options(
        provider.clone(),
        acts,
        orchs,
        RuntimeOptions::default(),
    )
    .await;
    let client = Client::new(provider.clone());
    let mut results = Vec::with_capacity(samples);
    let mut failure: Option<BoxError> = None;
    // The first WARM_UP instances are not measured (connections, prepared statements,
    // plan caches).
    for i in 0..samples + WARM_UP {
        match sample(
            session,
            &client,
            provider.as_ref(),
            &format!("lat-{run}-{i}"),
        )
        .await
        {
            Ok(s) if i >= WARM_UP => results.push(s),
            Ok(_) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    rt.shutdown(None).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

async fn sample(
    session: &Session,
    client: &Client,
    provider: &dyn Provider,
    instance: &str,
) -> Result<Sample, BoxError> {
    let before = session.snapshot();
    let t0_ms = now_ms();
    let t0 = Instant::now();
    client
        .start_orchestration(instance, "Chain", "x")
        .await
        .map_err(|e| format!("start {instance}: {e}"))?;
    match client
        .wait_for_orchestration(instance, Duration::from_secs(120))
        .await
    {
        Ok(OrchestrationStatus::Completed { .. }) => {}
        other => return Err(format!("{instance} did not complete: {other:?}").into()),
    }
    let observed_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after = session.snapshot();
    let history = provider.read(instance).await?;
    let done_ms = history
        .iter()
        .find(|e| matches!(e.kind, EventKind::OrchestrationCompleted { .. }))
        .map(|e| e.timestamp_ms)
        .ok_or("no OrchestrationCompleted event in history")?;
    let delta = before.zip(after).map(|(b, a)| a.since(&b));
    Ok(Sample {
        completed_ms: done_ms.saturating_sub(t0_ms) as f64,
        observed_ms,
        round_trips: delta.map(|d| d.bursts as f64),
        statements: delta.map(|d| d.statements as f64),
    })
}
