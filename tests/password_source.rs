//! The password-source hook (issue 12, item 2) against a real password change: a
//! throwaway cluster (`faults/cluster.rs`) whose pg_hba.conf demands scram-sha-256 for
//! one role, a runtime running orchestrations as that role, and mid-run `ALTER ROLE ...
//! PASSWORD` plus the hook switched to the new secret. Then every idle connection of the
//! role is terminated, so the provider's pool and its LISTEN connection must connect
//! again: with the old password that is refused by the server.
//!
//! Asserted: every orchestration (started before and after the change) completes with
//! the right output; the hook was asked again after the change; the LISTEN connection
//! and other provider connections were opened after the change, and the server refused
//! no connection attempt after the cut (none used the old secret); the old password is
//! refused; the application pool's connect options carry the new secret; `Debug` shows
//! neither secret.
//!
//! `cargo test --profile ci --test password_source`

#[path = "faults/cluster.rs"]
mod cluster;

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterOptions};
use duroxide::runtime::Runtime;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{PasswordSource, PostgresProvider, ProviderOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

const ROLE: &str = "dpgh_rotator";
const STEPS: u32 = 4;

fn registries() -> (ActivityRegistry, OrchestrationRegistry) {
    let activities = ActivityRegistry::builder()
        .register("Step", |_ctx: ActivityContext, n: String| async move {
            // Long enough that turns are in flight when the password changes.
            tokio::time::sleep(Duration::from_millis(40)).await;
            let n: u32 = n.parse().map_err(|e| format!("{e}"))?;
            Ok((n + 1).to_string())
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "Count",
            |ctx: OrchestrationContext, _input: String| async move {
                let mut n = "0".to_string();
                for _ in 0..STEPS {
                    n = ctx.schedule_activity("Step", n).await?;
                }
                Ok(n)
            },
        )
        .build();
    (activities, orchestrations)
}

async fn admin(cluster: &Cluster) -> PgConnection {
    // The admin statements carry passwords: keep them out of any log.
    PgConnectOptions::from_str(&cluster.admin_url())
        .unwrap()
        .log_statements(tracing::log::LevelFilter::Off)
        .connect()
        .await
        .unwrap()
}

/// Polls `check` until it returns true or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_rotates_while_a_runtime_runs() {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let first = format!("First{}", &hex[..12]);
    let second = format!("Second{}", &hex[12..24]);
    let cluster = Cluster::start_new(ClusterOptions {
        conf: vec!["password_encryption = 'scram-sha-256'".into()],
        hba: vec![format!("host all {ROLE} 127.0.0.1/32 scram-sha-256")],
        files: vec![],
    });
    let port = cluster.port();
    let mut admin = admin(&cluster).await;
    sqlx::raw_sql(&format!(
        "CREATE ROLE {ROLE} LOGIN PASSWORD '{first}'; GRANT CREATE ON DATABASE postgres TO {ROLE};"
    ))
    .execute(&mut admin)
    .await
    .unwrap();

    let secret = Arc::new(Mutex::new(first.clone()));
    let asked = Arc::new(AtomicUsize::new(0));
    let source = {
        let (secret, asked) = (secret.clone(), asked.clone());
        PasswordSource::new(move || {
            asked.fetch_add(1, Ordering::SeqCst);
            let current = secret
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            async move { Ok(current) }
        })
        .with_pool_refresh_interval(Duration::from_millis(200))
    };
    // No password in the URL: the hook is the only source.
    let url = format!("postgres://{ROLE}@127.0.0.1:{port}/postgres?sslmode=disable");
    let options = ProviderOptions {
        schema: "rotation".into(),
        max_connections: 4,
        long_poll: true,
        password_source: Some(source),
        ..ProviderOptions::default()
    };
    let shown = format!("{options:?}");
    let provider = Arc::new(
        PostgresProvider::connect_with(&url, options)
            .await
            .unwrap_or_else(|e| panic!("connect with the hook: {e}\n{}", cluster.server_log())),
    );
    let shown = [shown, format!("{provider:?}")];

    let (activities, orchestrations) = registries();
    let rt = Runtime::start_with_store(provider.clone(), activities, orchestrations).await;
    let client = Client::new(provider.clone());
    let mut instances = Vec::new();
    for i in 0..8 {
        let id = format!("before-{i}");
        client.start_orchestration(&id, "Count", "").await.unwrap();
        instances.push(id);
    }
    // Mid-run: the first orchestration is done, others are still running.
    let progressed = eventually(Duration::from_secs(30), || async {
        matches!(
            client.get_orchestration_status("before-0").await,
            Ok(OrchestrationStatus::Completed { .. })
        )
    })
    .await;
    assert!(progressed, "no orchestration completed before the rotation");

    // The change: server first, then the hook (the order a secret store rotates in; a
    // connection attempt in between is refused with 28P01, which is retryable).
    sqlx::raw_sql(&format!("ALTER ROLE {ROLE} PASSWORD '{second}'"))
        .execute(&mut admin)
        .await
        .unwrap();
    *secret.lock().unwrap_or_else(PoisonError::into_inner) = second.clone();
    let rotated_at: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    let asked_before = asked.load(Ordering::SeqCst);
    // Idle connections (the pool's spares, the LISTEN connection) are cut: the provider
    // has to connect again, now with the new secret only.
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND state = 'idle'",
    )
    .bind(ROLE)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(
        !terminated.is_empty(),
        "the provider had no idle connection to cut"
    );
    // From here on no connection attempt may use the old secret.
    let log_mark = cluster.server_log().len();

    for i in 0..8 {
        let id = format!("after-{i}");
        client.start_orchestration(&id, "Count", "").await.unwrap();
        instances.push(id);
    }
    for id in &instances {
        match client
            .wait_for_orchestration(id, Duration::from_secs(60))
            .await
        {
            Ok(OrchestrationStatus::Completed { output, .. }) => {
                assert_eq!(output, STEPS.to_string(), "{id}")
            }
            other => panic!("{id}: {other:?}\n{}", cluster.server_log()),
        }
    }
    assert!(
        asked.load(Ordering::SeqCst) > asked_before,
        "no connection asked the hook after the change"
    );

    // The LISTEN connection came back, opened after the change.
    let relistened = eventually(Duration::from_secs(15), || {
        let admin_url = cluster.admin_url();
        async move {
            let mut c = PgConnection::connect(&admin_url).await.unwrap();
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                 AND query ILIKE '%LISTEN%' AND extract(epoch FROM backend_start) > $2",
            )
            .bind(ROLE)
            .bind(rotated_at)
            .fetch_one(&mut c)
            .await
            .unwrap();
            n > 0
        }
    })
    .await;
    assert!(relistened, "no LISTEN connection opened after the change");
    let opened_after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
         AND extract(epoch FROM backend_start) > $2",
    )
    .bind(ROLE)
    .bind(rotated_at)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        opened_after >= 2,
        "only {opened_after} connection(s) opened after the change"
    );

    let refused = cluster.server_log()[log_mark..]
        .matches("password authentication failed")
        .count();
    assert_eq!(refused, 0, "connections were attempted with the old secret");

    // The old secret is refused: the new connections above used the new one.
    let e = PgConnection::connect(&format!(
        "postgres://{ROLE}:{first}@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .await
    .expect_err("the old password still works");
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );

    // The application pool's options were refreshed in the background.
    let pool_refreshed = eventually(Duration::from_secs(10), || {
        let options = (*provider.pool().connect_options()).clone();
        async move { options.connect().await.is_ok() }
    })
    .await;
    assert!(pool_refreshed, "pool() still connects with the old secret");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rotation.instances")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(rows, 16);

    for s in &shown {
        assert!(
            !s.contains(&first) && !s.contains(&second),
            "a secret in Debug: {s}"
        );
    }
    rt.shutdown(None).await;
    provider.close().await;
    admin.close().await.unwrap();
}
