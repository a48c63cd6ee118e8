//! Fan-out/fan-in on PostgreSQL: ten activities in parallel, joined, with the provider's
//! metrics printed at the end (a `metrics` debugging recorder stands in for Prometheus).
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release --example fan_out_fan_in
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use duroxide::runtime::Runtime;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder)?;

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let options = ProviderOptions {
        schema: format!("fan_out_{}", std::process::id()),
        ..Default::default()
    };
    let provider = PostgresProvider::connect_with(&url, options).await?;
    let store = Arc::new(provider.clone());

    let activities = ActivityRegistry::builder()
        .register("Square", |_ctx: ActivityContext, n: String| async move {
            let n: u64 = n.parse().map_err(|e| format!("{e}"))?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok((n * n).to_string())
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "SumOfSquares",
            |ctx: OrchestrationContext, n: String| async move {
                let n: u64 = n.parse().map_err(|e| format!("{e}"))?;
                let calls = (1..=n)
                    .map(|i| ctx.schedule_activity("Square", i.to_string()))
                    .collect();
                let mut total = 0u64;
                for r in ctx.join(calls).await {
                    total += r?.parse::<u64>().map_err(|e| format!("{e}"))?;
                }
                Ok(total.to_string())
            },
        )
        .build();

    let rt = Runtime::start_with_store(store.clone(), activities, orchestrations).await;
    let client = Client::new(store);
    let started = Instant::now();
    client
        .start_orchestration("fan-1", "SumOfSquares", "10")
        .await?;
    let status = client
        .wait_for_orchestration("fan-1", Duration::from_secs(30))
        .await;
    let elapsed = started.elapsed();
    rt.shutdown(None).await;
    provider.drop_schema().await?;
    match status {
        Ok(OrchestrationStatus::Completed { output, .. }) => {
            println!("sum of squares 1..=10 = {output} ({elapsed:?})")
        }
        other => return Err(format!("did not complete: {other:?}").into()),
    }

    println!("provider metrics:");
    let mut lines: Vec<String> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name().starts_with("duroxide_pg_"))
        .map(|(key, _, _, value)| {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let value = match value {
                DebugValue::Counter(c) => c.to_string(),
                DebugValue::Gauge(g) => g.to_string(),
                DebugValue::Histogram(h) => format!("{} samples", h.len()),
            };
            format!("  {}{{{}}} {value}", key.key().name(), labels.join(","))
        })
        .collect();
    lines.sort();
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
