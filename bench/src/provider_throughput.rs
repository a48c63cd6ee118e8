//! `provider-throughput`: what the provider costs per orchestration when nothing else
//! does. duroxide's stress harness (`parallel_orchestrations`) with activities of 0 ms,
//! 100 orchestrations in flight, fan-out of 5, at several dispatcher configurations
//! (default 1:1, 4:4, 16:16). Reports orchestrations/s and, per orchestration: provider
//! calls (a counting wrapper around every provider), statements and round trips (the
//! proxy, at RTT 0) and server execution time and statements (`pg_stat_statements`,
//! top-level statements naming the run's schema).
//!
//! `pg_stat_statements` must be preloaded: when the main server lacks it, the scenario
//! runs on a throwaway cluster of its own (`cluster.rs`) and says so in the records.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use duroxide::provider_stress_tests::StressTestConfig;
use duroxide::provider_stress_tests::parallel_orchestrations::{
    ProviderStressFactory, run_parallel_orchestrations_test_with_config,
};
use duroxide::providers::Provider;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::Opts;
use crate::cluster::Cluster;
use crate::counting::Counting;
use crate::providers::{BoxError, Env};
use crate::results::Record;

const SCENARIO: &str = "provider-throughput";
const IN_FLIGHT: usize = 100;
const FAN_OUT: usize = 5;
pub const DEFAULT_CONFIGS: &str = "1:1,4:4,16:16";

struct Fixed(Arc<dyn Provider>);

#[async_trait::async_trait]
impl ProviderStressFactory for Fixed {
    async fn create_provider(&self) -> Arc<dyn Provider> {
        self.0.clone()
    }
}

/// `pg_stat_statements` usable on this server (loaded and the extension created).
async fn stat_statements_ready(admin: &sqlx::PgPool) -> bool {
    let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(admin)
        .await;
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_statements")
        .fetch_one(admin)
        .await
        .is_ok()
}

pub async fn run(env: &Env, opts: &Opts) -> Result<Vec<Record>, BoxError> {
    if stat_statements_ready(&env.admin).await {
        return measure(env, opts, "main server").await;
    }
    eprintln!(
        "  pg_stat_statements is not loaded on the main server: starting a throwaway cluster with it"
    );
    let cluster = Cluster::start()?;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url())
        .await?;
    if !stat_statements_ready(&admin).await {
        return Err("pg_stat_statements not usable on the throwaway cluster".into());
    }
    let own = Env {
        url: cluster.url(),
        admin,
        pg_stat_statements: true,
        force_proxy: env.force_proxy,
    };
    let r = measure(&own, opts, "throwaway cluster (fsync off)").await;
    own.admin.close().await;
    drop(cluster);
    r
}

#[derive(Default)]
struct Runs {
    orch: Vec<f64>,
    calls: Vec<f64>,
    stmts: Vec<f64>,
    bursts: Vec<f64>,
    exec_ms: Vec<f64>,
    server_stmts: Vec<f64>,
    failed: Vec<f64>,
}

async fn measure(env: &Env, opts: &Opts, server: &str) -> Result<Vec<Record>, BoxError> {
    let configs =
        crate::throughput::parse_configs(opts.configs.as_deref().unwrap_or(DEFAULT_CONFIGS))?;
    let duration_secs = opts
        .duration_secs
        .unwrap_or(if opts.quick { 4 } else { 10 });
    // One simulated round trip (the first of --rtt-ms; 0 by default): the proxy is in
    // the path anyway, to count round trips.
    let rtt = opts.rtts(&[0])[0];
    let mut out = Vec::new();
    for &(oc, wc) in &configs {
        let case = format!("{oc}:{wc}");
        let mut per: Vec<(String, Runs)> = Vec::new();
        for run in 0..opts.runs {
            // Providers interleaved within each run: drift on a shared machine hits all.
            for &kind in &opts.providers {
                let session = env.session("ptp", kind, rtt, true, false).await?;
                let counting = Arc::new(Counting::new(session.dyn_provider()));
                let calls = counting.calls.clone();
                let by_method = counting.by_method.clone();
                let wall = counting.wall.clone();
                let config = StressTestConfig {
                    max_concurrent: IN_FLIGHT,
                    duration_secs,
                    tasks_per_instance: FAN_OUT,
                    activity_delay_ms: 0,
                    orch_concurrency: oc,
                    worker_concurrency: wc,
                    wait_timeout_secs: 120,
                };
                sqlx::query("SELECT pg_stat_statements_reset()")
                    .execute(&env.admin)
                    .await?;
                let before = session.snapshot();
                let factory = Fixed(counting);
                let result = run_parallel_orchestrations_test_with_config(&factory, config)
                    .await
                    .map_err(|e| e.to_string());
                drop(factory);
                let delta = match (before, session.snapshot()) {
                    (Some(b), Some(a)) => Some(a.since(&b)),
                    _ => None,
                };
                let pattern = format!("%{}%", session.schema);
                let server_row: Result<(i64, f64), _> = sqlx::query_as(
                    "SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(total_exec_time), 0)::float8 \
                     FROM pg_stat_statements WHERE query LIKE $1",
                )
                .bind(&pattern)
                .fetch_one(&env.admin)
                .await;
                session.teardown(env).await;
                let r = result?;
                let (server_calls, exec_ms) = server_row?;
                let n = r.completed.max(1) as f64;
                eprintln!(
                    "  provider-throughput {case} rtt={rtt}ms {kind} run {}: {:.1} orch/s ({} completed, {} failed), per orch: {:.1} calls, {:.1} stmts, {:.2} ms server",
                    run + 1,
                    r.orch_throughput,
                    r.completed,
                    r.failed,
                    calls.load(Ordering::Relaxed) as f64 / n,
                    server_calls as f64 / n,
                    exec_ms / n
                );
                let methods = by_method
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(m, c)| format!("{m} {:.2}", *c as f64 / n))
                    .collect::<Vec<_>>()
                    .join(", ");
                eprintln!("    calls per orchestration: {methods}");
                let walls = wall
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(m, (c, us))| {
                        format!("{m} {:.2}", *us as f64 / 1000.0 / (*c).max(1) as f64)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                eprintln!(
                    "    mean wall ms per call (fetches include their long-poll wait): {walls}"
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
                e.failed.push(r.failed as f64);
                e.calls.push(calls.load(Ordering::Relaxed) as f64 / n);
                e.server_stmts.push(server_calls as f64 / n);
                e.exec_ms.push(exec_ms / n);
                if let Some(d) = delta {
                    e.stmts.push(d.statements as f64 / n);
                    e.bursts.push(d.bursts as f64 / n);
                }
            }
        }
        for (provider, runs) in per {
            let extra = json!({
                "duration_secs": duration_secs, "max_concurrent": IN_FLIGHT,
                "tasks_per_instance": FAN_OUT, "activity_delay_ms": 0, "server": server,
            });
            let rec = |metric: &str, unit: &str, v: Vec<f64>| {
                Record::new(SCENARIO, &provider, &case, rtt, metric, unit, v)
            };
            out.push(rec("orch_per_s", "orch/s", runs.orch).with_extra(extra));
            out.push(rec("provider_calls_per_orch", "calls", runs.calls));
            out.push(rec("server_exec_ms_per_orch", "ms", runs.exec_ms));
            out.push(rec(
                "server_statements_per_orch",
                "stmts",
                runs.server_stmts,
            ));
            if !runs.stmts.is_empty() {
                out.push(rec("statements_per_orch", "stmts", runs.stmts));
                out.push(rec("round_trips_per_orch", "bursts", runs.bursts));
            }
            out.push(rec("failed_orchestrations", "count", runs.failed));
        }
    }
    Ok(out)
}
