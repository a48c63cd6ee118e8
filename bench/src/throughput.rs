//! `throughput`: duroxide's own stress harness (`parallel_orchestrations`: fan-out of 5
//! activities × 10 ms, 20 instances in flight) at several dispatcher configurations.

use std::sync::Arc;

use duroxide::provider_stress_tests::StressTestConfig;
use duroxide::provider_stress_tests::parallel_orchestrations::{
    ProviderStressFactory, run_parallel_orchestrations_test_with_config,
};
use duroxide::providers::Provider;
use serde_json::json;

use crate::Opts;
use crate::providers::{BoxError, Env};
use crate::results::Record;

/// Per-run values of one provider.
#[derive(Default)]
struct Runs {
    orch: Vec<f64>,
    act: Vec<f64>,
    failed: Vec<f64>,
    bursts: Vec<f64>,
}

struct Fixed(Arc<dyn Provider>);

#[async_trait::async_trait]
impl ProviderStressFactory for Fixed {
    async fn create_provider(&self) -> Arc<dyn Provider> {
        self.0.clone()
    }
}

/// Parses `1:1,2:2,4:4`.
pub fn parse_configs(s: &str) -> Result<Vec<(usize, usize)>, String> {
    s.split(',')
        .map(|c| {
            let (o, w) = c
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("bad dispatcher config {c:?}, want O:W"))?;
            Ok((
                o.parse().map_err(|_| format!("bad number in {c:?}"))?,
                w.parse().map_err(|_| format!("bad number in {c:?}"))?,
            ))
        })
        .collect()
}

pub async fn run(env: &Env, opts: &Opts) -> Result<Vec<Record>, BoxError> {
    let configs = parse_configs(opts.configs.as_deref().unwrap_or("1:1,2:2,4:4"))?;
    let duration_secs = opts.duration_secs.unwrap_or(if opts.quick { 3 } else { 5 });
    let rtts = opts.rtts(&[0]);
    let mut out = Vec::new();
    for &rtt in &rtts {
        for &(oc, wc) in &configs {
            let case = format!("{oc}:{wc}");
            // provider -> per-run values
            let mut per: Vec<(String, Runs)> = Vec::new();
            for run in 0..opts.runs {
                // Providers interleaved within each run so drift on a shared machine
                // affects all of them alike.
                for &kind in &opts.providers {
                    let session = env.session("tp", kind, rtt, false, false).await?;
                    let before = session.snapshot();
                    let config = StressTestConfig {
                        max_concurrent: 20,
                        duration_secs,
                        tasks_per_instance: 5,
                        activity_delay_ms: 10,
                        orch_concurrency: oc,
                        worker_concurrency: wc,
                        wait_timeout_secs: 120,
                    };
                    let factory = Fixed(session.dyn_provider());
                    let result = run_parallel_orchestrations_test_with_config(&factory, config)
                        .await
                        .map_err(|e| e.to_string());
                    drop(factory);
                    let delta = match (before, session.snapshot()) {
                        (Some(b), Some(a)) => Some(a.since(&b)),
                        _ => None,
                    };
                    session.teardown(env).await;
                    let r = result?;
                    eprintln!(
                        "  throughput {case} rtt={rtt}ms {kind} run {}: {:.2} orch/s ({} completed, {} failed, {:.1}s)",
                        run + 1,
                        r.orch_throughput,
                        r.completed,
                        r.failed,
                        r.total_time.as_secs_f64()
                    );
                    let idx = match per.iter().position(|p| p.0 == kind.name()) {
                        Some(i) => i,
                        None => {
                            per.push((kind.name().to_string(), Runs::default()));
                            per.len() - 1
                        }
                    };
                    let e = &mut per[idx].1;
                    e.orch.push(r.orch_throughput);
                    e.act.push(r.activity_throughput);
                    e.failed.push(r.failed as f64);
                    if let Some(d) = delta {
                        e.bursts.push(d.bursts as f64 / r.completed.max(1) as f64);
                    }
                }
            }
            for (
                provider,
                Runs {
                    orch,
                    act,
                    failed,
                    bursts: rts,
                },
            ) in per
            {
                let extra = json!({
                    "duration_secs": duration_secs, "max_concurrent": 20, "tasks_per_instance": 5,
                    "activity_delay_ms": 10,
                });
                out.push(
                    Record::new(
                        "throughput",
                        &provider,
                        &case,
                        rtt,
                        "orch_per_s",
                        "orch/s",
                        orch,
                    )
                    .with_extra(extra),
                );
                out.push(Record::new(
                    "throughput",
                    &provider,
                    &case,
                    rtt,
                    "activities_per_s",
                    "act/s",
                    act,
                ));
                out.push(Record::new(
                    "throughput",
                    &provider,
                    &case,
                    rtt,
                    "failed_orchestrations",
                    "count",
                    failed,
                ));
                if !rts.is_empty() {
                    out.push(Record::new(
                        "throughput",
                        &provider,
                        &case,
                        rtt,
                        "round_trips_per_orch",
                        "bursts",
                        rts,
                    ));
                }
            }
        }
    }
    Ok(out)
}
