//! duroxide's hello world on PostgreSQL: one orchestration calling one activity.
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release --example hello_world
//! ```

use std::sync::Arc;
use std::time::Duration;

use duroxide::runtime::Runtime;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let options = ProviderOptions {
        schema: format!("hello_world_{}", std::process::id()),
        ..Default::default()
    };
    let provider = PostgresProvider::connect_with(&url, options).await?;
    let store = Arc::new(provider.clone());

    let activities = ActivityRegistry::builder()
        .register("Greet", |_ctx: ActivityContext, name: String| async move {
            Ok(format!("Hello, {name}!"))
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "HelloWorld",
            |ctx: OrchestrationContext, name: String| async move {
                ctx.schedule_activity("Greet", name).await
            },
        )
        .build();

    let rt = Runtime::start_with_store(store.clone(), activities, orchestrations).await;
    let client = Client::new(store);
    client
        .start_orchestration("hello-1", "HelloWorld", "Rust Developer")
        .await?;
    let status = client
        .wait_for_orchestration("hello-1", Duration::from_secs(10))
        .await;
    rt.shutdown(None).await;
    provider.drop_schema().await?;
    match status {
        Ok(OrchestrationStatus::Completed { output, .. }) => println!("{output}"),
        other => return Err(format!("did not complete: {other:?}").into()),
    }
    Ok(())
}
