//! duroxide-pg compatibility (issue 12, items 1 and 4):
//!
//! * duroxide-pg's constructors put data where duroxide-pg puts it: `new(url)` and
//!   `None` schemas in `public`, names folded to lower case, `VerifyOnly` runs no DDL;
//!   `cleanup_schema` keeps `public` (and the application's own tables in it);
//! * a schema holding the ledger of a duroxide-pg release other than 0.1.38 is refused at
//!   start-up (migrate and verify) with a message naming the release and migration found;
//!   nothing is created in it. One at 0.1.38 is adopted (`adopt.rs`; the live move is
//!   `tests/adopt_duroxide_pg.rs`): a VerifyOnly process waits for a process with
//!   migrations to install it. With `--features duroxide-pg-tests` a schema made by
//!   duroxide-pg 0.1.38 itself, which also checks the hand-made ledger used elsewhere.
//!
//! The `public` test runs on a throwaway cluster of its own (`faults/cluster.rs`), so it
//! never touches the shared server's `public` schema (a database of its own would too,
//! but `DROP DATABASE` waits for a checkpoint: a minute and more on a busy server).
//!
//! `cargo test --profile ci --test compat` (`--features duroxide-pg-tests` for the real one)

#[path = "faults/cluster.rs"]
mod cluster;
mod common;
#[path = "common/incumbent.rs"]
mod incumbent_skeleton;

use std::sync::Arc;
use std::time::Duration;

use common::{database_url, init_tracing, unique_schema};
use duroxide::runtime::Runtime;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::incumbent;
use duroxide_pg_hybrid::schema::{self, quote_ident};
use duroxide_pg_hybrid::{MigrationPolicy, PostgresProvider, ProviderConfig, ProviderOptions};
use incumbent_skeleton::{MIGRATIONS_0_1_38, create_duroxide_pg_skeleton};
use sqlx::{Connection, PgConnection};

/// Drops schemas of the shared database when dropped.
struct Schemas(Vec<String>);

impl Drop for Schemas {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut self.0);
        let url = database_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                for s in schemas {
                    let _ = sqlx::query(&format!(
                        "DROP SCHEMA IF EXISTS {} CASCADE",
                        quote_ident(&s)
                    ))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

async fn scalar_i64(conn: &mut PgConnection, sql: &str, schema: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(schema)
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Relations and routines in `schema`.
async fn object_counts(conn: &mut PgConnection, schema: &str) -> (i64, i64) {
    let relations = scalar_i64(
        conn,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
        schema,
    )
    .await;
    let routines = scalar_i64(
        conn,
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
        schema,
    )
    .await;
    (relations, routines)
}

async fn schema_exists(conn: &mut PgConnection, schema: &str) -> bool {
    scalar_i64(
        conn,
        "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
        schema,
    )
    .await
        == 1
}

async fn run_one_orchestration(provider: Arc<PostgresProvider>, instance: &str) {
    let activities = ActivityRegistry::builder()
        .register("Greet", |_ctx: ActivityContext, name: String| async move {
            Ok(format!("hello {name}"))
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "Hello",
            |ctx: OrchestrationContext, name: String| async move {
                ctx.schedule_activity("Greet", name).await
            },
        )
        .build();
    let rt = Runtime::start_with_store(provider.clone(), activities, orchestrations).await;
    let client = Client::new(provider);
    client
        .start_orchestration(instance, "Hello", "pg")
        .await
        .unwrap();
    let status = client
        .wait_for_orchestration(instance, Duration::from_secs(30))
        .await
        .unwrap();
    rt.shutdown(None).await;
    match status {
        OrchestrationStatus::Completed { output, .. } => assert_eq!(output, "hello pg"),
        other => panic!("{instance}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duroxide_pg_constructors_put_data_where_duroxide_pg_does() {
    init_tracing();
    let cluster = cluster::Cluster::start_new(cluster::ClusterOptions::default());
    let url = cluster.admin_url();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // The application's own table in public: cleanup_schema must leave it alone.
    sqlx::query("CREATE TABLE public.app_orders (id INT PRIMARY KEY)")
        .execute(&mut conn)
        .await
        .unwrap();

    // new(url): public, migrated, usable as a duroxide store.
    let p = Arc::new(PostgresProvider::new(&url).await.unwrap());
    assert_eq!(p.schema_name(), "public");
    assert_eq!(p.schema(), "public");
    assert!(
        schema::status(p.pool(), "public")
            .await
            .unwrap()
            .is_current()
    );
    run_one_orchestration(p.clone(), "compat-1").await;
    let (relations, routines) = object_counts(&mut conn, "public").await;
    assert!(relations > 10 && routines > 5, "{relations} / {routines}");

    // new_with_schema(url, None) and new_with_config(url(..)): the same place.
    let same = PostgresProvider::new_with_schema(&url, None).await.unwrap();
    assert_eq!(same.schema_name(), "public");
    same.close().await;
    let same = PostgresProvider::new_with_config(ProviderConfig::url(url.clone()))
        .await
        .unwrap();
    assert_eq!(same.schema_name(), "public");
    same.close().await;

    // A named schema, spelled as duroxide-pg users may (PostgreSQL folds it).
    let tenant = PostgresProvider::new_with_schema(&url, Some("Tenant_A"))
        .await
        .unwrap();
    assert_eq!(tenant.schema_name(), "tenant_a");
    assert!(schema_exists(&mut conn, "tenant_a").await);

    // VerifyOnly: accepts a current schema, refuses a missing one without creating it.
    let mut config = ProviderConfig::url(url.clone());
    config.schema_name = Some("tenant_a".into());
    config.migration_policy = MigrationPolicy::VerifyOnly;
    let verified = PostgresProvider::new_with_config(config).await.unwrap();
    assert_eq!(verified.schema_name(), "tenant_a");
    verified.close().await;
    let mut config = ProviderConfig::url(url.clone());
    config.schema_name = Some("fresh_b".into());
    config.migration_policy = MigrationPolicy::VerifyOnly;
    let e = PostgresProvider::new_with_config(config)
        .await
        .expect_err("VerifyOnly on an empty schema");
    let msg = format!("{e:#}");
    assert!(msg.contains("fresh_b") && msg.contains("pending"), "{msg}");
    let provider_error = e
        .downcast_ref::<duroxide::providers::ProviderError>()
        .expect("the anyhow error wraps the provider's error");
    assert!(!provider_error.is_retryable());
    assert!(
        !schema_exists(&mut conn, "fresh_b").await,
        "VerifyOnly ran DDL"
    );

    // cleanup_schema: a custom schema goes entirely; public stays, minus our objects.
    tenant.cleanup_schema().await.unwrap();
    assert!(!schema_exists(&mut conn, "tenant_a").await);
    p.cleanup_schema().await.unwrap();
    assert!(schema_exists(&mut conn, "public").await);
    let (relations, routines) = object_counts(&mut conn, "public").await;
    // Left: app_orders and its primary-key index.
    assert_eq!((relations, routines), (2, 0), "objects left in public");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM public.app_orders")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 0);
    p.close().await;
    tenant.close().await;

    // Clean enough to start over.
    let again = PostgresProvider::new(&url).await.unwrap();
    assert!(
        schema::status(again.pool(), "public")
            .await
            .unwrap()
            .is_current()
    );
    again.close().await;
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duroxide_pg_schema_is_recognised_refused_or_adopted() {
    init_tracing();
    let url = database_url();
    let at_38 = unique_schema();
    let at_25 = unique_schema();
    let plain = unique_schema();
    let companion = duroxide_pg_hybrid::adopt::companion_schema(&at_38).unwrap();
    let _cleanup = Schemas(vec![
        at_38.clone(),
        at_25.clone(),
        plain.clone(),
        companion.clone(),
    ]);
    let mut conn = PgConnection::connect(&url).await.unwrap();
    create_duroxide_pg_skeleton(&mut conn, &at_38, 26).await;
    create_duroxide_pg_skeleton(&mut conn, &at_25, 25).await;

    // An older duroxide-pg: refused at start-up (migrating or not), nothing created.
    for auto_migrate in [true, false] {
        let options = ProviderOptions {
            schema: at_25.clone(),
            auto_migrate,
            max_connections: 2,
            ..ProviderOptions::default()
        };
        let e = PostgresProvider::connect_with(&url, options)
            .await
            .expect_err("a duroxide-pg 0.1.37 schema must be refused");
        assert!(!e.is_retryable(), "{e}");
        for needle in [
            at_25.as_str(),
            "duroxide-pg 0.1.36 or 0.1.37",
            "migration 25 (0025_fetch_orchestration_lease_at_claim.sql)",
            "upgrade the duroxide-pg processes to 0.1.38",
            "different schema",
        ] {
            assert!(e.message.contains(needle), "{needle:?} not in: {e}");
        }
    }
    // duroxide-pg's own constructor name says the same through anyhow.
    let e = PostgresProvider::new_with_schema(&url, Some(&at_25))
        .await
        .expect_err("refused");
    assert!(
        e.to_string().contains("duroxide-pg 0.1.36 or 0.1.37"),
        "{e}"
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for schema in [&at_25, &at_38] {
        let ours = scalar_i64(
            &mut conn,
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN ('_sqlx_migrations', '_duroxide_pg_hybrid_migrations')",
            schema,
        )
        .await;
        assert_eq!(ours, 0);
    }
    let older = incumbent::detect(&pool, &at_25).await.unwrap().unwrap();
    assert!(!older.is_adoptable());
    let e = schema::status(&pool, &at_25).await.unwrap_err().to_string();
    assert!(
        e.contains("migration 25") && e.contains("duroxide-pg 0.1.36 or 0.1.37"),
        "{e}"
    );

    // 0.1.38: a process that must not run DDL refuses until the adoption is installed,
    // naming what to run; then one with migrations installs it and both run.
    let found = incumbent::detect(&pool, &at_38).await.unwrap().unwrap();
    assert!(found.is_adoptable());
    let verify_only = || ProviderOptions {
        schema: at_38.clone(),
        auto_migrate: false,
        max_connections: 2,
        ..ProviderOptions::default()
    };
    let e = PostgresProvider::connect_with(&url, verify_only())
        .await
        .expect_err("nothing installed yet");
    assert!(
        e.message.contains(&at_38) && e.message.contains("migrate"),
        "{e}"
    );
    let applier = PostgresProvider::new_with_schema(&url, Some(&at_38))
        .await
        .expect("duroxide-pg's constructor adopts a 0.1.38 schema");
    assert_eq!(applier.schema(), companion);
    let verifier = PostgresProvider::connect_with(&url, verify_only())
        .await
        .expect("VerifyOnly runs once the adoption is installed");
    assert_eq!(verifier.schema(), companion);
    // The duroxide-pg tables are unchanged (only triggers were added), its ledger too.
    let ledger = scalar_i64(
        &mut conn,
        &format!(
            "SELECT count(*) FROM {}._duroxide_migrations WHERE $1 <> ''",
            quote_ident(&at_38)
        ),
        &at_38,
    )
    .await;
    assert_eq!(ledger, MIGRATIONS_0_1_38.len() as i64);
    let installs = scalar_i64(
        &mut conn,
        &format!(
            "SELECT count(*) FROM {}.adoption_source WHERE source_schema = $1",
            quote_ident(&companion)
        ),
        &at_38,
    )
    .await;
    assert_eq!(installs, 1);
    verifier.close().await;
    applier.close().await;

    // No ledger: nothing detected, and our own schema is not mistaken for one.
    assert!(incumbent::detect(&pool, &plain).await.unwrap().is_none());
    let ours = PostgresProvider::connect_with(
        &url,
        ProviderOptions {
            schema: plain.clone(),
            max_connections: 2,
            ..ProviderOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ours.schema(), plain);
    assert!(incumbent::detect(&pool, &plain).await.unwrap().is_none());
    ours.close().await;
    pool.close().await;
    conn.close().await.unwrap();
}

/// The real thing: duroxide-pg 0.1.38 creates the schema with its own migrations.
#[cfg(feature = "duroxide-pg-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_made_by_duroxide_pg_0_1_38_is_adopted() {
    init_tracing();
    let url = database_url();
    let schema = unique_schema();
    let _cleanup = Schemas(vec![
        schema.clone(),
        duroxide_pg_hybrid::adopt::companion_schema(&schema).unwrap(),
    ]);
    let incumbent_provider = duroxide_pg::PostgresProvider::new_with_schema(&url, Some(&schema))
        .await
        .expect("duroxide-pg 0.1.38 creates its schema");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let found = incumbent::detect(&pool, &schema).await.unwrap().unwrap();
    let recorded: Vec<(i64, String)> = found
        .applied
        .iter()
        .map(|r| (r.version, r.name.clone()))
        .collect();
    let expected: Vec<(i64, String)> = MIGRATIONS_0_1_38
        .iter()
        .map(|(v, n)| (*v, n.to_string()))
        .collect();
    assert_eq!(
        recorded, expected,
        "the hand-made skeleton differs from 0.1.38"
    );
    assert!(found.is_adoptable());

    let ours = PostgresProvider::connect_with(
        &url,
        ProviderOptions {
            schema: schema.clone(),
            max_connections: 2,
            ..ProviderOptions::default()
        },
    )
    .await
    .expect("adopted");
    assert_eq!(
        ours.schema(),
        duroxide_pg_hybrid::adopt::companion_schema(&schema).unwrap()
    );
    ours.close().await;
    // duroxide-pg still opens its schema with the adoption installed (it checks its ledger
    // and its tables, which only gained triggers).
    duroxide_pg::PostgresProvider::new_with_schema(&url, Some(&schema))
        .await
        .expect("duroxide-pg reopens its schema");
    drop(incumbent_provider);
    pool.close().await;
}
