//! The README demo: one orchestration with activities, a durable timer and an external
//! event, running on PostgreSQL through duroxide-pg-hybrid. It prints what happened and
//! the history PostgreSQL stored, then drops its schema.
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release --example demo
//! ```
//! `DATABASE_URL` selects the server (default `postgres://postgres@127.0.0.1:5432/postgres`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use duroxide::providers::Provider;
use duroxide::runtime::Runtime;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let schema = format!("duroxide_demo_{}", std::process::id());
    let provider = PostgresProvider::connect_with(
        &url,
        ProviderOptions {
            schema: schema.clone(),
            ..ProviderOptions::default()
        },
    )
    .await?;
    println!(
        "connected to {} (schema {schema}, fetch path {}, long polling {})",
        duroxide_pg_hybrid::options::redact_url(&url),
        provider.fetch_path(),
        provider.long_poll()
    );
    let store = Arc::new(provider.clone());
    let result = run(store.clone()).await;
    provider.drop_schema().await?;
    println!("dropped schema {schema}");
    result
}

async fn run(store: Arc<PostgresProvider>) -> Result<(), Box<dyn std::error::Error>> {
    let activities = ActivityRegistry::builder()
        .register(
            "ReserveStock",
            |_ctx: ActivityContext, order: String| async move {
                Ok(format!("stock reserved for {order}"))
            },
        )
        .register(
            "ChargeCard",
            |_ctx: ActivityContext, order: String| async move {
                Ok(format!("card charged for {order}"))
            },
        )
        .register("Ship", |_ctx: ActivityContext, order: String| async move {
            Ok(format!("{order} shipped"))
        })
        .build();

    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "OrderFlow",
            |ctx: OrchestrationContext, order: String| async move {
                let reserved = ctx.schedule_activity("ReserveStock", order.clone()).await?;
                let charged = ctx.schedule_activity("ChargeCard", order.clone()).await?;
                // A durable timer: survives restarts, fires from the database queue.
                ctx.schedule_timer(Duration::from_secs(1)).await;
                // Wait for a human (here: the client below) to approve.
                let approval = ctx.schedule_wait("Approval").await;
                let shipped = ctx.schedule_activity("Ship", order).await?;
                Ok(format!(
                    "{reserved}; {charged}; approved by {approval}; {shipped}"
                ))
            },
        )
        .build();

    let rt = Runtime::start_with_store(store.clone(), activities, orchestrations).await;
    let client = Client::new(store.clone());
    let started = Instant::now();
    client
        .start_orchestration("order-42", "OrderFlow", "order-42")
        .await?;
    println!("started orchestration order-42");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.raise_event("order-42", "Approval", "alice").await?;
    println!("raised event Approval(alice) after {:?}", started.elapsed());

    let status = client
        .wait_for_orchestration("order-42", Duration::from_secs(30))
        .await;
    let outcome = match &status {
        Ok(OrchestrationStatus::Completed { output, .. }) => {
            println!("completed after {:?}: {output}", started.elapsed());
            Ok(())
        }
        other => Err(format!("orchestration did not complete: {other:?}")),
    };

    println!("history stored in PostgreSQL:");
    for e in store.read("order-42").await? {
        let json = serde_json::to_value(&e)?;
        let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("?");
        println!("  #{:<2} {kind}", e.event_id());
    }
    rt.shutdown(None).await;
    outcome.map_err(Into::into)
}
