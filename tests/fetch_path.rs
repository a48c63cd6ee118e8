//! The fetch-path switch: the `full-procedure` cargo feature sets the default, the
//! option overrides it, and the provider reports what it uses. (`scripts/test.sh` runs
//! this file with and without the feature; the environment variable is covered by the
//! CLI test, which can set it per process.)

mod common;

use common::{database_url, new_provider_with, test_options};
use duroxide::providers::{Provider, WorkItem};
use duroxide_pg_hybrid::FetchPath;

#[test]
fn compiled_default_follows_the_feature() {
    let expected = if cfg!(feature = "full-procedure") {
        FetchPath::Procedure
    } else {
        FetchPath::Hybrid
    };
    assert_eq!(FetchPath::compiled_default(), expected);
    assert_eq!(FetchPath::default(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_without_an_explicit_path_uses_the_default_and_works() {
    if std::env::var_os("DUROXIDE_PG_FETCH_PATH").is_some() {
        // The environment decides in this process; nothing to check about the default.
        return;
    }
    let (p, guard) = new_provider_with(FetchPath::Hybrid, |o| o.fetch_path = None).await;
    assert_eq!(p.fetch_path(), FetchPath::compiled_default());
    // An explicit option wins over the compiled default, on the same schema.
    let other = if FetchPath::compiled_default() == FetchPath::Hybrid {
        FetchPath::Procedure
    } else {
        FetchPath::Hybrid
    };
    let explicit = common::connect_waiting(&database_url(), test_options(guard.schema(), other))
        .await
        .unwrap();
    assert_eq!(explicit.fetch_path(), other);
    // Both serve the same queue: one enqueues, the other claims.
    let start = WorkItem::StartOrchestration {
        instance: "fp-1".into(),
        orchestration: "O".into(),
        input: "i".into(),
        version: None,
        parent_instance: None,
        parent_id: None,
        parent_execution_id: None,
        execution_id: 1,
    };
    p.enqueue_for_orchestrator(start, None).await.unwrap();
    let (item, _, _) = explicit
        .fetch_orchestration_item(
            std::time::Duration::from_secs(5),
            std::time::Duration::ZERO,
            None,
        )
        .await
        .unwrap()
        .expect("the other path claims the item");
    assert_eq!(item.instance, "fp-1");
}
