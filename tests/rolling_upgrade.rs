//! Rolling upgrades: processes of the previous release and of this one on one schema.
//!
//! * The statements release 0.1.0 sends (positional claim and ack calls, its own SQL for
//!   abandon, renew and release; copied here as that release sends them) keep working on
//!   this release's schema, and leave the claim state right: an instance 0.1.0 abandons
//!   is claimable at once, one it renews is passed over.
//! * A binary starts on a schema a newer release migrated (newer migrations and function
//!   files), with and without auto-migration, and never puts its older function
//!   definitions back.

mod common;

use std::time::Duration;

use common::{database_url, new_provider_with, short_polling, start_item, test_options};
use duroxide::providers::{ExecutionMetadata, Provider, WorkItem};
use duroxide_pg_hybrid::schema::quote_ident;
use duroxide_pg_hybrid::{FetchPath, PostgresProvider};

const LOCK: Duration = Duration::from_secs(30);

/// 0.1.0's claim: positional arguments.
const V010_CLAIM: &str = "SELECT o_instance_id, o_lock_token, o_execution_id, o_attempt_count, \
     o_now_ms, o_next_wake_ms, o_skipped FROM {s}.sp_fetch_and_lock($1, $2, $3, $4, $5, $6, $7, $8)";

/// 0.1.0's abandon_orchestration_item.
const V010_ABANDON: &str = "\
WITH released AS (
    DELETE FROM {s}.instance_locks l WHERE l.lock_token = $1 RETURNING l.instance_id
),
requeued AS (
    UPDATE {s}.orchestrator_queue q
    SET lock_token = NULL,
        visible_at_ms = CASE WHEN $2::BIGINT IS NULL THEN q.visible_at_ms ELSE {s}.now_ms() + $2 END,
        attempt_count = CASE WHEN $3 THEN greatest(0, q.attempt_count - 1) ELSE q.attempt_count END
    WHERE q.lock_token = $1 AND EXISTS (SELECT 1 FROM released)
)
SELECT r.instance_id
FROM released r, {s}.notify_work_available('orchestrator', CASE WHEN $2::BIGINT IS NULL THEN 1 ELSE 0 END)";

/// 0.1.0's renew_orchestration_item_lock.
const V010_RENEW: &str = "\
UPDATE {s}.instance_locks l SET locked_until_ms = c.now + $2
FROM (SELECT {s}.now_ms() AS now) c
WHERE l.lock_token = $1 AND l.locked_until_ms > c.now
RETURNING l.instance_id";

#[derive(sqlx::FromRow)]
struct ClaimRow {
    o_instance_id: Option<String>,
    o_lock_token: Option<String>,
    o_now_ms: i64,
    o_next_wake_ms: Option<i64>,
}

async fn v010_claim(p: &PostgresProvider, lock_ms: i64) -> ClaimRow {
    sqlx::query_as(&V010_CLAIM.replace("{s}", &quote_ident(p.schema())))
        .bind(lock_ms)
        .bind(false)
        .bind(0)
        .bind(0)
        .bind(0)
        .bind(0)
        .bind(0)
        .bind(0)
        .fetch_one(p.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn statements_of_the_previous_release_keep_the_claim_state_right() {
    let (p, _guard) = new_provider_with(FetchPath::Hybrid, short_polling).await;
    let s = quote_ident(p.schema());
    p.enqueue_for_orchestrator(start_item("a"), None)
        .await
        .unwrap();

    // 0.1.0 claims with a 60 s lease, then abandons: the new release claims at once,
    // without waiting for the old lease's end.
    let c = v010_claim(&p, 60_000).await;
    assert_eq!(c.o_instance_id.as_deref(), Some("a"));
    let released: Option<String> = sqlx::query_scalar(&V010_ABANDON.replace("{s}", &s))
        .bind(c.o_lock_token.as_deref().unwrap())
        .bind(None::<i64>)
        .bind(true)
        .fetch_optional(p.pool())
        .await
        .unwrap();
    assert_eq!(released.as_deref(), Some("a"));
    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("claimable at once after 0.1.0's abandon");
    assert_eq!(item.instance, "a");
    p.abandon_orchestration_item(&token, None, true)
        .await
        .unwrap();

    // 0.1.0 claims with a 1 s lease and renews it to 60 s: the new release passes the
    // instance over (its lease is live) instead of taking it at the first lease's end.
    let c = v010_claim(&p, 1_000).await;
    assert_eq!(c.o_instance_id.as_deref(), Some("a"));
    let renewed: Option<String> = sqlx::query_scalar(&V010_RENEW.replace("{s}", &s))
        .bind(c.o_lock_token.as_deref().unwrap())
        .bind(60_000i64)
        .fetch_optional(p.pool())
        .await
        .unwrap();
    assert_eq!(renewed.as_deref(), Some("a"));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(
        p.fetch_orchestration_item(LOCK, Duration::ZERO, None)
            .await
            .unwrap()
            .is_none(),
        "the renewed lease is live"
    );
    let after = v010_claim(&p, 1_000).await;
    assert_eq!(after.o_instance_id, None);
    let wake_in = after.o_next_wake_ms.expect("the lease end") - after.o_now_ms;
    assert!(
        wake_in > 50_000,
        "the next look is at the renewed lease's end, {wake_in} ms away"
    );

    // 0.1.0's positional ack call is the same function.
    let acked: String = sqlx::query_scalar(&format!(
        "SELECT {s}.ack_orchestration_item($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
         $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32)"
    ))
    .bind(c.o_lock_token.as_deref().unwrap())
    .bind(1i64)
    .bind(Vec::<i64>::new())
    .bind(Vec::<String>::new())
    .bind(Vec::<String>::new())
    .bind(Some("O"))
    .bind(Some("1.0.0"))
    .bind(None::<String>)
    .bind(Some("Running"))
    .bind(None::<String>)
    .bind(None::<i32>)
    .bind(None::<i32>)
    .bind(None::<i32>)
    .bind(false)
    .bind(None::<String>)
    .bind(false)
    .bind(Vec::<String>::new())
    .bind(Vec::<Option<String>>::new())
    .bind(Vec::<Option<i64>>::new())
    .bind(Vec::<String>::new())
    .bind(Vec::<String>::new())
    .bind(Vec::<i64>::new())
    .bind(Vec::<i64>::new())
    .bind(Vec::<Option<String>>::new())
    .bind(Vec::<Option<String>>::new())
    .bind(Vec::<String>::new())
    .bind(Vec::<i64>::new())
    .bind(Vec::<i64>::new())
    .bind(vec!["a".to_string()])
    .bind(vec!["ExternalRaised".to_string()])
    .bind(vec![
        serde_json::to_string(&WorkItem::ExternalRaised {
            instance: "a".to_string(),
            name: "E".to_string(),
            data: "d".to_string(),
        })
        .unwrap(),
    ])
    .bind(vec![None::<i64>])
    .fetch_one(p.pool())
    .await
    .unwrap();
    assert_eq!(acked, "a");
    let (item, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("the message 0.1.0's ack wrote is claimable at once");
    assert_eq!(item.instance, "a");
    assert!(matches!(
        &item.messages[..],
        [WorkItem::ExternalRaised { .. }]
    ));
    p.ack_orchestration_item(
        &token,
        1,
        vec![],
        vec![],
        vec![],
        ExecutionMetadata::default(),
        vec![],
    )
    .await
    .unwrap();
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {s}.pending_instances"))
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "no claim state without queued messages");

    // 0.1.0's procedure-path fetch, positional, still returns a whole turn.
    p.enqueue_for_orchestrator(start_item("b"), None)
        .await
        .unwrap();
    let (id, messages, history): (Option<String>, Option<Vec<String>>, Option<Vec<String>>) =
        sqlx::query_as(&format!(
            "SELECT o_instance_id, o_messages, o_history \
             FROM {s}.fetch_orchestration_full($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(30_000i64)
        .bind(false)
        .bind(0)
        .bind(0)
        .bind(0)
        .bind(0)
        .bind(0)
        .bind(0)
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(id.as_deref(), Some("b"));
    assert_eq!(messages.map(|m| m.len()), Some(1));
    assert_eq!(history, Some(vec![]));
}

#[tokio::test]
async fn a_binary_starts_on_a_schema_a_newer_release_migrated() {
    let (p, guard) = new_provider_with(FetchPath::Hybrid, short_polling).await;
    let s = quote_ident(guard.schema());
    // A newer release: one more migration, and a newer revision of the claim's file whose
    // definitions this binary must leave alone (marked by a comment on the function).
    sqlx::query(&format!(
        "INSERT INTO {s}._duroxide_pg_hybrid_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'from the future', TRUE, '\\x00', 0)"
    ))
    .execute(p.pool())
    .await
    .unwrap();
    sqlx::query(&format!(
        "UPDATE {s}._function_files SET revision = revision + 100 WHERE name = '03_claim.sql'"
    ))
    .execute(p.pool())
    .await
    .unwrap();
    sqlx::query(&format!(
        "COMMENT ON FUNCTION {s}.claim_pick(BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT, TEXT[]) IS 'newer'"
    ))
    .execute(p.pool())
    .await
    .unwrap();

    for auto_migrate in [true, false] {
        let mut options = test_options(guard.schema(), FetchPath::Hybrid);
        options.auto_migrate = auto_migrate;
        short_polling(&mut options);
        let older = common::connect_waiting(&database_url(), options)
            .await
            .unwrap_or_else(|e| panic!("auto_migrate {auto_migrate}: {e}"));
        older
            .enqueue_for_orchestrator(start_item(&format!("x-{auto_migrate}")), None)
            .await
            .unwrap();
        assert!(
            older
                .fetch_orchestration_item(LOCK, Duration::ZERO, None)
                .await
                .unwrap()
                .is_some()
        );
        older.close().await;
    }
    let comment: Option<String> = sqlx::query_scalar(&format!(
        "SELECT obj_description('{s}.claim_pick(BIGINT, BOOLEAN, INT, INT, INT, INT, INT, INT, TEXT[])'::regprocedure)"
    ))
    .fetch_one(p.pool())
    .await
    .unwrap();
    assert_eq!(
        comment.as_deref(),
        Some("newer"),
        "older definitions were put back"
    );
    let st = duroxide_pg_hybrid::schema::status(p.pool(), guard.schema())
        .await
        .unwrap();
    assert!(st.is_newer_compatible(), "{st:?}");
    assert_eq!(st.functions_newer, vec!["03_claim.sql".to_string()]);
}

/// The crate keeps its own migration ledger: a schema a pre-0.2.0 release migrated
/// (ledger in sqlx's `_sqlx_migrations`, here shared with an application's own sqlx
/// migration) is taken over without re-running anything, the newer migrations are
/// applied, and the old ledger is left as it was (for that release's processes, and for
/// the application).
#[tokio::test]
async fn own_ledger_takes_over_a_previous_release_schema_next_to_an_application_ledger() {
    use duroxide_pg_hybrid::schema::{LEDGER_TABLE, MIGRATOR};
    use sqlx::{Connection, Executor, PgConnection};
    const PREVIOUS_RELEASE_MIGRATIONS: usize = 5;
    let (p, guard) = new_provider_with(FetchPath::Hybrid, short_polling).await;
    p.close().await;
    let s = quote_ident(guard.schema());

    // The schema as 0.1.0 left it: its five migrations, recorded in _sqlx_migrations,
    // beside a row of the application's own.
    let mut db = PgConnection::connect(&database_url()).await.unwrap();
    db.execute(
        format!("DROP SCHEMA {s} CASCADE; CREATE SCHEMA {s}; SET search_path TO {s}").as_str(),
    )
    .await
    .unwrap();
    db.execute(
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)",
    )
    .await
    .unwrap();
    for m in MIGRATOR.iter().take(PREVIOUS_RELEASE_MIGRATIONS) {
        db.execute(&*m.sql).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, $2, TRUE, $3, 0)",
        )
        .bind(m.version)
        .bind(&*m.description)
        .bind(&*m.checksum)
        .execute(&mut db)
        .await
        .unwrap();
    }
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (20200101000000, 'the application''s own', TRUE, '\\x01', 0)",
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO orchestrator_queue (instance_id, kind, work_item, visible_at_ms, created_at_ms) \
         SELECT 'queued-before', 'StartOrchestration', $1, now_ms(), now_ms()",
    )
    .bind(serde_json::to_string(&start_item("queued-before")).unwrap())
    .execute(&mut db)
    .await
    .unwrap();
    db.execute("RESET search_path").await.unwrap();

    let st = duroxide_pg_hybrid::schema::status(
        &sqlx::PgPool::connect(&database_url()).await.unwrap(),
        guard.schema(),
    )
    .await
    .unwrap();
    let previous: Vec<i64> = MIGRATOR
        .iter()
        .take(PREVIOUS_RELEASE_MIGRATIONS)
        .map(|m| m.version)
        .collect();
    assert_eq!(st.applied, previous, "the application's row is not ours");
    assert!(st.unknown.is_empty() && !st.pending.is_empty(), "{st:?}");

    let mut options = test_options(guard.schema(), FetchPath::Hybrid);
    short_polling(&mut options);
    let upgraded = common::connect_waiting(&database_url(), options)
        .await
        .expect("starts on the previous release's schema");
    let ours: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM {s}.{LEDGER_TABLE} ORDER BY version"
    ))
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(ours, MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>());
    let old_ledger: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {s}._sqlx_migrations"))
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        old_ledger,
        PREVIOUS_RELEASE_MIGRATIONS as i64 + 1,
        "the old ledger is left as it was"
    );
    // A message queued before the upgrade got its claim state and is claimable.
    let (item, _, _) = upgraded
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("the message queued before the upgrade is claimable");
    assert_eq!(item.instance, "queued-before");
    upgraded.close().await;
}
