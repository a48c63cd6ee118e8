//! Long-polling wake latency: a worker blocked in a 30 s long poll on one provider, an
//! item enqueued through another provider (another process, as far as the database is
//! concerned); measures enqueue-returned → fetch-returned. Prints p50/p95/max over N
//! samples, for BENCHMARKS.md.
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release --example wake_latency -- 200
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use duroxide::providers::{Provider, TagFilter, WorkItem};
use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("wake_latency_{}", std::process::id());
    let options = ProviderOptions {
        schema: schema.clone(),
        min_connections: 2,
        ..Default::default()
    };
    let waiter = Arc::new(PostgresProvider::connect_with(&url, options.clone()).await?);
    let producer = PostgresProvider::connect_with(&url, options).await?;
    // Open the LISTEN connection once before measuring.
    waiter
        .fetch_work_item(
            Duration::from_secs(30),
            Duration::from_millis(100),
            None,
            &TagFilter::Any,
        )
        .await?;

    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let w = waiter.clone();
        let fetch = tokio::spawn(async move {
            let r = w
                .fetch_work_item(
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                    None,
                    &TagFilter::Any,
                )
                .await;
            (r, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let item = WorkItem::ActivityExecute {
            instance: format!("wake-{i}"),
            execution_id: 1,
            id: 1,
            name: "A".into(),
            input: String::new(),
            session_id: None,
            tag: None,
        };
        producer.enqueue_for_worker(item).await?;
        let enqueued = Instant::now();
        let (got, fetched_at) = fetch.await?;
        let (_, token, _) = got?.ok_or("the waiting fetch returned nothing")?;
        lat.push(fetched_at.saturating_duration_since(enqueued).as_secs_f64() * 1000.0);
        waiter.ack_work_item(&token, None).await?;
    }
    waiter.drop_schema().await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "wake latency enqueue->claimed over {samples} samples: p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.95),
        lat[lat.len() - 1]
    );
    Ok(())
}
