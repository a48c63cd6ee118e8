//! The provider behind a real PgBouncer in transaction mode with its default
//! `max_prepared_statements` (`scripts/with-pgbouncer.sh`, which `scripts/test.sh` runs;
//! it sets `PGBOUNCER_URL`). What breaks without `PoolerMode::Transaction`, and that each
//! part of it works through the pooler: startup parameters, named statements, per-call
//! timeouts, migrations racing through the pooler, long polling through the direct URL,
//! short polling without one. (The conformance suite and the mixed fleet also run through
//! PgBouncer: `scripts/test.sh` runs them again with `DUROXIDE_PG_TEST_VIA_PGBOUNCER=1`.)
//!
//! Without `PGBOUNCER_URL` these tests say so and return, unless
//! `DUROXIDE_PG_TEST_REQUIRE_PGBOUNCER` is set (as `scripts/test.sh` does): then they fail.

mod common;

use std::time::{Duration, Instant};

use common::{
    activity_item, database_url, new_provider_at, pgbouncer_url, start_item, unique_schema,
};
use duroxide::providers::{Provider, TagFilter};
use duroxide_pg_hybrid::schema::{LEDGER_TABLE, quote_ident};
use duroxide_pg_hybrid::{FetchPath, PoolerMode, PostgresProvider, ProviderOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};

/// Not the clean-up tag of `tests/common`: that clean-up terminates backends by tag, and
/// through PgBouncer those are server connections other tests are using.
const APP_NAME: &str = "dpgh-test-via-pgbouncer";

fn bouncer() -> Option<String> {
    let url = pgbouncer_url();
    if url.is_none() {
        assert!(
            std::env::var_os("DUROXIDE_PG_TEST_REQUIRE_PGBOUNCER").is_none(),
            "PGBOUNCER_URL is not set: run through scripts/with-pgbouncer.sh"
        );
        eprintln!("PGBOUNCER_URL is not set: skipped (run through scripts/test.sh)");
    }
    url
}

/// sqlx connect options PgBouncer accepts: sqlx sends `extra_float_digits` at startup
/// by default, which PgBouncer refuses (see the first test).
fn plain_options(url: &str) -> PgConnectOptions {
    let opts: PgConnectOptions = url.parse().unwrap();
    opts.application_name(APP_NAME).extra_float_digits(None)
}

fn through_pooler(o: &mut ProviderOptions) {
    o.pooler = PoolerMode::Transaction;
    o.application_name = APP_NAME.into();
}

#[tokio::test]
async fn startup_timeouts_are_refused_by_pgbouncer_but_work_in_pooler_mode() {
    let Some(url) = bouncer() else { return };
    // sqlx's defaults: extra_float_digits is sent at startup.
    let refused = PgConnection::connect(&url)
        .await
        .expect_err("PgBouncer accepted sqlx's extra_float_digits");
    assert!(
        refused.to_string().contains("extra_float_digits"),
        "{refused}"
    );
    // The old way: statement_timeout as a startup `options` parameter.
    let refused = PostgresProvider::connect_with(
        &url,
        ProviderOptions {
            schema: unique_schema(),
            statement_timeout: Some(Duration::from_secs(30)),
            application_name: APP_NAME.into(),
            ..ProviderOptions::default()
        },
    )
    .await
    .expect_err("PgBouncer accepted a startup `options` parameter");
    assert!(
        refused.message.contains("unsupported startup parameter"),
        "{refused:?}"
    );

    let (p, _guard) = new_provider_at(&url, FetchPath::Hybrid, |o| {
        through_pooler(o);
        o.statement_timeout = Some(Duration::from_secs(30));
        o.lock_timeout = Some(Duration::from_secs(5));
    })
    .await;
    assert_eq!(p.pooler(), PoolerMode::Transaction);
    p.enqueue_for_orchestrator(start_item("pgb-start"), None)
        .await
        .unwrap();
    let (item, _token, _) = p
        .fetch_orchestration_item(Duration::from_secs(5), Duration::ZERO, None)
        .await
        .unwrap()
        .expect("the started instance is claimable through PgBouncer");
    assert_eq!(item.instance, "pgb-start");
}

/// Why statements must not be named and cached: sqlx's default statement cache keeps
/// `sqlx_s_1` on the server connection that prepared it, and the pooler hands the next
/// call to whichever server connection is free.
#[tokio::test]
async fn cached_named_statements_break_through_pgbouncer() {
    let Some(url) = bouncer() else { return };
    let opts = plain_options(&url);
    // Other tests share the pooler: retry until the holder got our server connection.
    for _ in 0..20 {
        let mut a = opts.connect().await.unwrap();
        let mut b = opts.connect().await.unwrap();
        let pid_a: i32 = match sqlx::query_scalar("SELECT pg_backend_pid() + $1")
            .bind(0i32)
            .fetch_one(&mut a)
            .await
        {
            Ok(pid) => pid,
            // Already the first use can break: sqlx sends Parse, waits, then Bind/Execute,
            // and under load the pooler hands the second half to another server
            // connection that never saw the statement.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("26000") => return,
            // Or the server connection still holds a `sqlx_s_1` an earlier client (an
            // earlier round of this loop, another test) prepared: duplicate_prepared_statement.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P05") => return,
            Err(e) => panic!("unexpected error: {e}"),
        };
        // b takes the most recently released server connection (PgBouncer reuses LIFO)
        // and keeps it inside a transaction.
        b.execute("BEGIN").await.unwrap();
        let pid_b: i32 = sqlx::raw_sql("SELECT pg_backend_pid()")
            .fetch_one(&mut b)
            .await
            .map(|row| sqlx::Row::get(&row, 0))
            .unwrap();
        if pid_b != pid_a {
            continue;
        }
        // The cached statement goes out as Bind/Execute only, to a server connection
        // other than the one that prepared it (b holds that one).
        match sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid() + $1")
            .bind(0i32)
            .fetch_one(&mut a)
            .await
        {
            Err(again) => {
                let code = again
                    .as_database_error()
                    .and_then(|e| e.code().map(|c| c.to_string()));
                // invalid_sql_statement_name, or protocol_violation when the other
                // connection's `sqlx_s_1` takes a different number of parameters
                assert!(
                    matches!(code.as_deref(), Some("26000" | "08P01")),
                    "{again}"
                );
            }
            // Worse: that connection holds a `sqlx_s_1` of an earlier client and ran it.
            Ok(pid) => assert_ne!(
                pid, pid_a,
                "the cached statement ran on the connection b holds in a transaction"
            ),
        }
        b.execute("ROLLBACK").await.unwrap();
        return;
    }
    panic!("never got the same server connection twice in a row through PgBouncer");
}

#[tokio::test]
async fn lock_timeout_applies_to_each_call_and_does_not_leak() {
    let Some(url) = bouncer() else { return };
    let (p, guard) = new_provider_at(&url, FetchPath::Hybrid, |o| {
        through_pooler(o);
        o.lock_timeout = Some(Duration::from_millis(200));
        o.statement_timeout = Some(Duration::from_secs(60));
    })
    .await;
    let mut holder = PgConnection::connect(&database_url()).await.unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(
            format!(
                "LOCK TABLE {}.orchestrator_queue IN ACCESS EXCLUSIVE MODE",
                quote_ident(guard.schema())
            )
            .as_str(),
        )
        .await
        .unwrap();
    // Without the per-call lock_timeout this would wait for the holder (bounded here
    // only so that a regression fails instead of hanging).
    let blocked = tokio::time::timeout(
        Duration::from_secs(20),
        p.enqueue_for_orchestrator(start_item("pgb-lock"), None),
    )
    .await
    .expect("the call waited past its lock_timeout")
    .expect_err("enqueue succeeded under an exclusive lock");
    assert!(
        blocked.retryable && blocked.message.contains("lock timeout"),
        "{blocked:?}"
    );
    holder.execute("ROLLBACK").await.unwrap();
    // The failed call's transaction was rolled back: the next call works, and the
    // SET LOCAL ended with it (a plain session through the pooler sees the default).
    p.enqueue_for_orchestrator(start_item("pgb-lock"), None)
        .await
        .unwrap();
    let mut plain = plain_options(&url).connect().await.unwrap();
    for _ in 0..10 {
        let row = sqlx::raw_sql("SHOW lock_timeout")
            .fetch_one(&mut plain)
            .await
            .unwrap();
        let shown: String = sqlx::Row::get(&row, 0);
        assert_eq!(shown, "0", "a SET LOCAL leaked to the pooler's next client");
    }
}

#[tokio::test]
async fn concurrent_first_migrations_through_pgbouncer_apply_each_migration_once() {
    let Some(url) = bouncer() else { return };
    let schema = unique_schema();
    let opts = ProviderOptions {
        schema: schema.clone(),
        max_connections: 2,
        pooler: PoolerMode::Transaction,
        application_name: APP_NAME.into(),
        ..ProviderOptions::default()
    };
    let starts = (0..4).map(|_| PostgresProvider::connect_with(&url, opts.clone()));
    let providers: Vec<PostgresProvider> = futures::future::join_all(starts)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every concurrent start through the pooler succeeds");
    let mut direct = PgConnection::connect(&database_url()).await.unwrap();
    let (rows, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT version) FROM {}.{LEDGER_TABLE}",
        quote_ident(&schema)
    ))
    .fetch_one(&mut direct)
    .await
    .unwrap();
    assert_eq!(rows, distinct);
    assert!(rows > 0);
    // The schema works through the pooler, and its removal too.
    providers[0]
        .enqueue_for_worker(activity_item("pgb-mig", 1))
        .await
        .unwrap();
    providers[0].drop_schema().await.unwrap();
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&schema)
            .fetch_one(&mut direct)
            .await
            .unwrap();
    assert!(!left);
}

#[tokio::test]
async fn long_polling_listens_on_the_direct_url() {
    let Some(url) = bouncer() else { return };
    let (p, _guard) = new_provider_at(&url, FetchPath::Hybrid, |o| {
        through_pooler(o);
        o.direct_url = Some(database_url());
        // A wake-up can only come from the notification, not the fallback poll.
        o.fallback_poll_interval = Duration::from_secs(60);
    })
    .await;
    assert!(p.long_poll());
    let waiter = p.clone();
    let started = Instant::now();
    let fetch = tokio::spawn(async move {
        waiter
            .fetch_work_item(
                Duration::from_secs(5),
                Duration::from_secs(20),
                None,
                &TagFilter::DefaultOnly,
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.enqueue_for_worker(activity_item("pgb-lp", 1))
        .await
        .unwrap();
    let (item, _token, _) = fetch
        .await
        .unwrap()
        .unwrap()
        .expect("the waiting fetch was woken with the item");
    assert_eq!(item, activity_item("pgb-lp", 1));
    // Woken by NOTIFY (through the pooler) on LISTEN (direct), not by the 20 s timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn without_a_direct_url_fetches_short_poll() {
    let Some(url) = bouncer() else { return };
    let (p, _guard) = new_provider_at(&url, FetchPath::Hybrid, through_pooler).await;
    assert!(
        !p.long_poll(),
        "no LISTEN is possible through a transaction pooler"
    );
    let started = Instant::now();
    let none = p
        .fetch_work_item(
            Duration::from_secs(5),
            Duration::from_secs(20),
            None,
            &TagFilter::DefaultOnly,
        )
        .await
        .unwrap();
    assert!(none.is_none());
    assert!(
        started.elapsed() < common::SHORT_POLL_THRESHOLD,
        "{:?}",
        started.elapsed()
    );
}
