//! End-to-end tests of the `duroxide-pg-hybrid` command-line tool (crate `cli/`).
//!
//! Every subcommand is run as a real process against a real database, on a fresh schema
//! `cli_<16 hex>` that is dropped when the test ends, passed or not (a drop guard).
//! Database: `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`.
//!
//! How the binary is found: the CLI is another package of the workspace, so Cargo's
//! `CARGO_BIN_EXE_*` does not cover it. The tests run `cargo build -p
//! duroxide-pg-hybrid-cli` once (same profile as the tests, same `CARGO_TARGET_DIR`)
//! with `--message-format=json` and take the executable path Cargo reports, so no target
//! layout is guessed. Set `DUROXIDE_PG_HYBRID_CLI` to a built binary to skip the build.
//!
//! `cargo test --profile ci --test cli`

#[path = "common/incumbent.rs"]
mod incumbent_skeleton;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use duroxide::providers::{ExecutionMetadata, Provider, WorkItem};
use duroxide::{Event, EventKind};
use duroxide_pg_hybrid::schema::{self, quote_ident};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider, ProviderOptions};
use serde_json::Value;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const BIN_ENV: &str = "DUROXIDE_PG_HYBRID_CLI";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

/// The Cargo profile this test binary was built with, read off its path
/// (`target/<profile dir>/deps/cli-…`; the `dev` profile's directory is `debug`).
fn test_profile() -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .and_then(|profile| profile.file_name())
        .and_then(|name| name.to_str())
        .unwrap_or("debug");
    match dir {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    }
}

/// The CLI binary, built once per test process.
fn cli_binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os(BIN_ENV) {
            return PathBuf::from(p);
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "-p",
                "duroxide-pg-hybrid-cli",
                "--bin",
                "duroxide-pg-hybrid",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(Stdio::inherit());
        cmd.args(["--profile", &test_profile()]);
        let out = cmd.output().expect("cannot run cargo to build the CLI");
        assert!(
            out.status.success(),
            "building the CLI failed: {}",
            out.status
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| {
                m["reason"] == "compiler-artifact" && m["target"]["name"] == "duroxide-pg-hybrid"
            })
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no executable for the CLI")
    })
}

/// Outcome of one CLI run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    #[track_caller]
    fn fails(self, code: i32) -> Self {
        assert_eq!(self.code, code, "expected exit {code}: {self:#?}");
        self
    }

    /// One `error: ...` line on stderr (clap's usage errors excepted).
    #[track_caller]
    fn one_error_line(self) -> Self {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "expected one error line: {self:#?}"
        );
        self
    }
}

/// Runs the CLI with a clean environment (no `DATABASE_URL`, no `DUROXIDE_PG_*`) plus
/// `env`.
fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(cli_binary());
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if k == "DATABASE_URL" || k.starts_with("DUROXIDE_PG_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run the CLI");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Drops the schema when dropped, also when the test panics.
struct SchemaGuard {
    url: String,
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // Own thread and runtime: the test's runtime may be gone or unwinding.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::query("SET lock_timeout = '30s'")
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    quote_ident(&schema)
                ))
                .execute(&mut conn)
                .await?;
                conn.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: dropping schema {}: {e}", self.schema),
            Err(_) => eprintln!("warning: schema clean-up thread panicked"),
        }
    }
}

fn start_item(instance: &str) -> WorkItem {
    WorkItem::StartOrchestration {
        instance: instance.to_string(),
        orchestration: "CliOrch".to_string(),
        input: "{\"n\":1}".to_string(),
        version: Some("1.2.3".to_string()),
        parent_instance: None,
        parent_id: None,
        parent_execution_id: None,
        execution_id: 1,
    }
}

/// First turn of `instance`: the claimed start is acked with metadata (creating the
/// instance row), OrchestrationStarted + ActivityScheduled, and one activity to run.
async fn ack_first_turn(p: &PostgresProvider, token: &str, instance: &str) {
    let started = EventKind::OrchestrationStarted {
        name: "CliOrch".to_string(),
        version: "1.2.3".to_string(),
        input: "{\"n\":1}".to_string(),
        parent_instance: None,
        parent_id: None,
        parent_execution_id: None,
        carry_forward_events: None,
        initial_custom_status: None,
    };
    let scheduled = EventKind::ActivityScheduled {
        name: "Greet".to_string(),
        input: "\"world\"".to_string(),
        session_id: None,
        tag: None,
    };
    let activity = WorkItem::ActivityExecute {
        instance: instance.to_string(),
        execution_id: 1,
        id: 2,
        name: "Greet".to_string(),
        input: "\"world\"".to_string(),
        session_id: None,
        tag: None,
    };
    let metadata = ExecutionMetadata {
        orchestration_name: Some("CliOrch".to_string()),
        orchestration_version: Some("1.2.3".to_string()),
        status: Some("Running".to_string()),
        ..Default::default()
    };
    p.ack_orchestration_item(
        token,
        1,
        vec![
            Event::with_event_id(1, instance, 1, None, started),
            Event::with_event_id(2, instance, 1, None, scheduled),
        ],
        vec![activity],
        vec![],
        metadata,
        vec![],
    )
    .await
    .expect("ack of the first turn");
}

fn stats_json(base: &[&str]) -> Value {
    let mut args = base.to_vec();
    args.extend(["stats", "--json"]);
    cli(&args, &[]).ok().json()
}

#[test]
fn every_subcommand_against_a_fresh_schema() {
    let url = database_url();
    let schema = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let _guard = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = ["--database-url", url.as_str(), "--schema", schema.as_str()];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let expected: Vec<i64> = schema::MIGRATOR.iter().map(|m| m.version).collect();

    // --- before any migration ------------------------------------------------------
    let st = cli(&with(&["migrate", "status", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(st["schema"], schema.as_str());
    assert_eq!(st["current"], false);
    assert_eq!(st["applied"], serde_json::json!([]));
    assert_eq!(st["pending"], serde_json::json!(expected));
    let text = cli(&with(&["migrate", "status"]), &[]).ok();
    assert!(
        text.stdout.contains("NOT current") && text.stdout.contains("pending:\n"),
        "{text:#?}"
    );

    let v = cli(&with(&["verify"]), &[]).fails(1).one_error_line();
    assert!(
        v.stderr.contains(&schema) && v.stderr.contains("migrate up"),
        "{v:#?}"
    );
    let v = cli(&with(&["verify", "--json"]), &[]).fails(1);
    assert!(v.json()["error"].as_str().unwrap().contains(&schema));

    // Inspection never migrates: it refuses an empty schema instead.
    let s = cli(&with(&["stats"]), &[]).fails(1).one_error_line();
    assert!(s.stderr.contains("migrate up"), "{s:#?}");
    let st = cli(&with(&["migrate", "status", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(
        st["applied"],
        serde_json::json!([]),
        "inspection must not migrate"
    );

    // The URL may also come from the environment.
    let env_run = cli(&["--schema", &schema, "verify"], &[("DATABASE_URL", &url)]);
    assert_eq!(env_run.code, 1, "{env_run:#?}");

    // --- migrate up ----------------------------------------------------------------
    let up = cli(&with(&["migrate", "up"]), &[]).ok();
    assert!(
        up.stderr
            .contains(&format!("applied {} migration(s)", expected.len())),
        "{up:#?}"
    );
    for v in &expected {
        assert!(up.stderr.contains(&format!("pending {v}")), "{up:#?}");
    }
    let again = cli(&with(&["migrate", "up", "--json"]), &[]).ok();
    assert!(
        again.stderr.contains("applied 0 migration(s)"),
        "{again:#?}"
    );
    let j = again.json();
    assert_eq!(j["applied"], serde_json::json!([]));
    assert_eq!(j["current"], true);

    let st = cli(&with(&["migrate", "status", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(st["current"], true);
    assert_eq!(st["pending"], serde_json::json!([]));
    assert_eq!(st["applied"], serde_json::json!(expected));
    let text = cli(&with(&["migrate", "status"]), &[]).ok();
    assert!(
        text.stdout.contains("pending: none") && text.stdout.contains("(current)"),
        "{text:#?}"
    );

    cli(&with(&["verify"]), &[]).ok();
    assert_eq!(
        cli(&with(&["verify", "--json"]), &[]).ok().json()["ok"],
        true
    );

    // print-sql needs no database.
    let sql = cli(&["--schema", &schema, "migrate", "print-sql"], &[]).ok();
    assert!(sql.stdout.contains("CREATE TABLE") && sql.stdout.contains(&quote_ident(&schema)));
    let sql = cli(
        &["--schema", &schema, "--json", "migrate", "print-sql"],
        &[],
    )
    .ok()
    .json();
    assert!(sql["sql"].as_str().unwrap().contains("CREATE TABLE"));

    // --- inspection with work in the queues ----------------------------------------
    let s0 = stats_json(&base);
    assert_eq!(s0["instances"]["total"], 0);
    assert_eq!(s0["orchestrator_queue"]["visible"], 0);
    assert_eq!(s0["worker_queue"]["ready"], 0);
    assert!(s0["orchestrator_queue"]["oldest_visible_age_ms"].is_null());
    let text = cli(&with(&["stats"]), &[]).ok();
    assert!(
        text.stdout.contains("orchestrator queue: 0 visible"),
        "{text:#?}"
    );

    // Connecting with auto_migrate off verifies the schema the CLI migrated.
    let provider = rt.block_on(async {
        PostgresProvider::connect_with(
            &url,
            ProviderOptions {
                schema: schema.clone(),
                auto_migrate: false,
                max_connections: 4,
                fetch_path: Some(FetchPath::Hybrid),
                ..ProviderOptions::default()
            },
        )
        .await
        .expect("provider on the migrated schema")
    });
    rt.block_on(async {
        provider
            .enqueue_for_orchestrator(start_item("cli-a"), None)
            .await
            .unwrap();
        provider
            .enqueue_for_orchestrator(start_item("cli-b"), None)
            .await
            .unwrap();
        provider
            .enqueue_for_orchestrator(start_item("cli-later"), Some(Duration::from_secs(3600)))
            .await
            .unwrap();
    });
    let s1 = stats_json(&base);
    assert_eq!(s1["orchestrator_queue"]["visible"], 2, "{s1:#}");
    assert_eq!(s1["orchestrator_queue"]["delayed"], 1, "{s1:#}");
    assert!(
        s1["orchestrator_queue"]["oldest_visible_age_ms"]
            .as_i64()
            .unwrap()
            >= 0
    );
    assert_eq!(s1["instances"]["total"], 0);

    // Instance list before any ack: nothing (instances are created by acks).
    let l = cli(&with(&["instances", "list", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(l["instances"], serde_json::json!([]));
    // A queued-only instance still shows its pending start.
    let b = cli(&with(&["instance", "show", "cli-b", "--json"]), &[])
        .ok()
        .json();
    assert!(b["instance"].is_null());
    assert_eq!(b["orchestrator_messages"][0]["kind"], "StartOrchestration");

    rt.block_on(async {
        let lock = Duration::from_secs(60);
        let (item, token, _) = provider
            .fetch_orchestration_item(lock, Duration::ZERO, None)
            .await
            .unwrap()
            .expect("a runnable instance");
        assert_eq!(item.instance, "cli-a", "oldest visible first");
        ack_first_turn(&provider, &token, "cli-a").await;
        // Claim cli-b and keep its lease.
        let (item, _token, _) = provider
            .fetch_orchestration_item(lock, Duration::ZERO, None)
            .await
            .unwrap()
            .expect("cli-b is runnable");
        assert_eq!(item.instance, "cli-b");
    });

    let s2 = stats_json(&base);
    assert_eq!(s2["instances"]["total"], 1, "{s2:#}");
    assert_eq!(s2["instances"]["running"], 1, "{s2:#}");
    assert_eq!(s2["worker_queue"]["ready"], 1, "{s2:#}");
    assert_eq!(s2["orchestrator_queue"]["visible"], 0, "{s2:#}");
    assert_eq!(s2["orchestrator_queue"]["locked"], 1, "{s2:#}");
    assert_eq!(s2["orchestrator_queue"]["delayed"], 1, "{s2:#}");
    assert_eq!(s2["instance_locks"]["live"], 1, "{s2:#}");
    assert_eq!(s2["instance_locks"]["expired"], 0, "{s2:#}");
    assert_eq!(s2["sessions"]["live"], 0, "{s2:#}");

    let l = cli(&with(&["instances", "list", "--json"]), &[])
        .ok()
        .json();
    let list = l["instances"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{l:#}");
    assert_eq!(list[0]["instance_id"], "cli-a");
    assert_eq!(list[0]["status"], "Running");
    assert_eq!(list[0]["orchestration_name"], "CliOrch");
    assert_eq!(list[0]["orchestration_version"], "1.2.3");
    assert_eq!(list[0]["current_execution_id"], 1);
    let l = cli(
        &with(&[
            "instances",
            "list",
            "--status",
            "running",
            "--limit",
            "5",
            "--json",
        ]),
        &[],
    )
    .ok()
    .json();
    assert_eq!(l["instances"].as_array().unwrap().len(), 1);
    let l = cli(
        &with(&["instances", "list", "--status", "Completed", "--json"]),
        &[],
    )
    .ok()
    .json();
    assert_eq!(l["instances"], serde_json::json!([]));
    let l = cli(&with(&["instances", "list", "--limit", "0", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(l["instances"], serde_json::json!([]));
    let text = cli(&with(&["instances", "list"]), &[]).ok();
    assert!(
        text.stdout.contains("cli-a") && text.stdout.contains("Running"),
        "{text:#?}"
    );
    assert!(text.stdout.contains("(1 instance)"), "{text:#?}");

    let show = cli(&with(&["instance", "show", "cli-a"]), &[]).ok();
    let out = &show.stdout;
    for needle in [
        "instance cli-a",
        "CliOrch 1.2.3",
        "execution 1  Running",
        "2 events",
        "#1  ",
        "+0ms",
        "OrchestrationStarted",
        "ActivityScheduled",
        "name=Greet",
        "worker queue (1):",
        "activity #2",
        "instance lock: none",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let a = cli(&with(&["instance", "show", "cli-a", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(a["instance"]["status"], "Running");
    let history = a["executions"][0]["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["event_type"], "OrchestrationStarted");
    assert_eq!(history[1]["event"]["name"], "Greet");
    assert_eq!(a["executions"][0]["event_count"], 2);
    assert_eq!(a["worker_items"].as_array().unwrap().len(), 1);
    assert_eq!(a["worker_items"][0]["leased"], false);
    assert_eq!(a["orchestrator_messages"], serde_json::json!([]));

    let b = cli(&with(&["instance", "show", "cli-b", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(b["lock"]["live"], true, "{b:#}");
    assert!(
        b["orchestrator_messages"][0]["lock_token"].is_string(),
        "{b:#}"
    );
    let b = cli(&with(&["instance", "show", "cli-b"]), &[]).ok();
    assert!(
        b.stdout.contains("locked by lock_") && b.stdout.contains("live for"),
        "{b:#?}"
    );
    let later = cli(&with(&["instance", "show", "cli-later"]), &[]).ok();
    assert!(later.stdout.contains("visible in"), "{later:#?}");

    let nf = cli(&with(&["instance", "show", "no-such-instance"]), &[])
        .fails(1)
        .one_error_line();
    assert!(nf.stderr.contains("not found"), "{nf:#?}");
    let nf = cli(
        &with(&["--json", "instance", "show", "no-such-instance"]),
        &[],
    )
    .fails(1);
    assert!(nf.json()["error"].as_str().unwrap().contains("not found"));

    rt.block_on(provider.close());

    // --- a schema behind this binary ------------------------------------------------
    // Forget the newest migration in the ledger: verify fails, inspection still works.
    let last = *expected.last().unwrap();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(&format!(
            "DELETE FROM {}._duroxide_pg_hybrid_migrations WHERE version = $1",
            quote_ident(&schema)
        ))
        .bind(last)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    });
    let v = cli(&with(&["verify"]), &[]).fails(1).one_error_line();
    assert!(v.stderr.contains(&last.to_string()), "{v:#?}");
    let st = cli(&with(&["migrate", "status", "--json"]), &[])
        .ok()
        .json();
    assert_eq!(st["pending"], serde_json::json!([last]));
    let s = cli(&with(&["stats", "--json"]), &[]).ok();
    assert!(s.stderr.starts_with("warning: "), "{s:#?}");
    assert_eq!(s.json()["instances"]["total"], 1);
}

#[test]
fn fetch_path_resolution_needs_no_database() {
    let d = cli(&["fetch-path"], &[]).ok();
    assert_eq!(d.stdout.trim(), "hybrid (compiled default)", "{d:#?}");
    let j = cli(&["fetch-path", "--json"], &[]).ok().json();
    assert_eq!(j["fetch_path"], "hybrid");
    assert_eq!(j["source"], "compiled_default");

    let env = [("DUROXIDE_PG_FETCH_PATH", "procedure")];
    let p = cli(&["fetch-path"], &env).ok();
    assert!(
        p.stdout.starts_with("procedure") && p.stdout.contains("DUROXIDE_PG_FETCH_PATH"),
        "{p:#?}"
    );
    let j = cli(&["--json", "fetch-path"], &env).ok().json();
    assert_eq!(j["fetch_path"], "procedure");
    assert_eq!(j["source"], "env");

    let o = cli(&["fetch-path", "--explicit", "hybrid", "--json"], &env)
        .ok()
        .json();
    assert_eq!(o["fetch_path"], "hybrid");
    assert_eq!(o["source"], "option");

    let bad = cli(&["fetch-path"], &[("DUROXIDE_PG_FETCH_PATH", "turbo")])
        .fails(1)
        .one_error_line();
    assert!(bad.stderr.contains("turbo"), "{bad:#?}");
}

/// Issue 12, item 4: a schema holding the ledger of a duroxide-pg release other than
/// 0.1.38 is named as such by `migrate status`, `verify`, `migrate up` and the inspection
/// commands, which all refuse it and change nothing. One at 0.1.38 is adopted: the
/// commands work on the companion schema and say so, `adopt status` shows the move,
/// `adopt finalize` ends it.
#[test]
fn duroxide_pg_schemas_are_named_refused_or_adopted() {
    let url = database_url();
    let schema = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let adopted = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let companion = format!("{adopted}_hybrid");
    let _guards = [&schema, &adopted, &companion].map(|s| SchemaGuard {
        url: url.clone(),
        schema: s.clone(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        incumbent_skeleton::create_duroxide_pg_skeleton(&mut conn, &schema, 25).await;
        incumbent_skeleton::create_duroxide_pg_skeleton(&mut conn, &adopted, 26).await;
        conn.close().await.unwrap();
    });
    let base = ["--database-url", url.as_str(), "--schema", schema.as_str()];
    for command in [
        &["migrate", "status"][..],
        &["verify"],
        &["migrate", "up"],
        &["stats"],
    ] {
        let args: Vec<&str> = base.iter().chain(command).copied().collect();
        let r = cli(&args, &[]).fails(1).one_error_line();
        for needle in [
            schema.as_str(),
            "duroxide-pg 0.1.36 or 0.1.37",
            "migration 25 (0025_fetch_orchestration_lease_at_claim.sql)",
            "upgrade the duroxide-pg processes to 0.1.38",
        ] {
            assert!(
                r.stderr.contains(needle),
                "{command:?}: {needle:?} missing: {r:#?}"
            );
        }
        let mut json_args = args.clone();
        json_args.push("--json");
        let j = cli(&json_args, &[]).fails(1).json();
        assert!(
            j["error"]
                .as_str()
                .unwrap()
                .contains("duroxide-pg 0.1.36 or 0.1.37"),
            "{command:?}: {j}"
        );
    }
    // `migrate up` created nothing of ours.
    let count = |sql: &str, bind: &str| -> i64 {
        rt.block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar(sql)
                .bind(bind)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        })
    };
    let ours_sql = "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN ('_sqlx_migrations', '_duroxide_pg_hybrid_migrations')";
    assert_eq!(count(ours_sql, &schema), 0);

    // 0.1.38: adopted into the companion schema.
    let base = ["--database-url", url.as_str(), "--schema", adopted.as_str()];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let status = cli(&with(&["adopt", "status"]), &[]).fails(1);
    assert!(status.stderr.contains("migrate up"), "{status:#?}");
    let up = cli(&with(&["migrate", "up"]), &[]).ok();
    assert!(
        up.stderr.contains("being adopted") && up.stderr.contains(&companion),
        "{up:#?}"
    );
    assert!(up.stderr.contains("installed"), "{up:#?}");
    assert_eq!(
        count(ours_sql, &adopted),
        0,
        "nothing of ours in the duroxide-pg schema"
    );
    assert_eq!(count(ours_sql, &companion), 1);
    let verify = cli(&with(&["verify"]), &[]).ok();
    assert!(verify.stdout.contains(&companion), "{verify:#?}");
    let progress = cli(&with(&["--json", "adopt", "status"]), &[]).ok().json();
    assert_eq!(progress["schema"], companion.as_str());
    assert_eq!(progress["old_instances"], 0);
    assert_eq!(progress["done"], true);
    let stats = cli(&with(&["stats"]), &[]).ok();
    assert!(
        stats.stdout.contains("adoption of duroxide-pg schema"),
        "{stats:#?}"
    );
    let stats = cli(&with(&["--json", "stats"]), &[]).ok().json();
    assert_eq!(stats["adoption"]["old_instances"], 0, "{stats}");
    let fin = cli(&with(&["--json", "adopt", "finalize"]), &[])
        .ok()
        .json();
    assert_eq!(fin["finalized"], true);
    assert_eq!(
        count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &adopted
        ),
        1,
        "only the marker is left"
    );
    let after = cli(&with(&["migrate", "status"]), &[]).ok();
    assert!(after.stderr.contains("was adopted"), "{after:#?}");
    let again = cli(&with(&["adopt", "finalize"]), &[]).fails(1);
    assert!(
        again.stderr.contains("no duroxide-pg schema being adopted"),
        "{again:#?}"
    );
}

#[test]
fn usage_errors_exit_2_and_passwords_stay_hidden() {
    cli::<&str>(&[], &[]).fails(2);
    cli(&["no-such-command"], &[]).fails(2);
    cli(&["--schema", "Bad-Name", "fetch-path"], &[]).fails(2);
    cli(&["instances", "list", "--status", "bogus"], &[]).fails(2);
    cli(&["instances", "list", "--limit", "-1"], &[]).fails(2);
    let missing = cli(&["stats"], &[]).fails(2).one_error_line();
    assert!(missing.stderr.contains("DATABASE_URL"), "{missing:#?}");
    assert_eq!(cli(&["--help"], &[]).code, 0);

    cli(&["--connect-timeout", "0", "stats"], &[]).fails(2);

    // Port 1: connection refused at once (the CLI keeps trying for --connect-timeout
    // seconds). The password must not appear anywhere.
    let secret = "s3cret-Passw0rd";
    let url = format!("postgres://app:{secret}@127.0.0.1:1/db");
    for args in [
        &[
            "--database-url",
            url.as_str(),
            "--connect-timeout",
            "1",
            "stats",
        ][..],
        &[
            "--database-url",
            url.as_str(),
            "--json",
            "--connect-timeout",
            "1",
            "verify",
        ],
    ] {
        let r = cli(args, &[]).fails(1);
        assert!(
            !r.stderr.contains(secret) && !r.stdout.contains(secret),
            "{r:#?}"
        );
        assert!(
            r.stderr.starts_with("error: ") && r.stderr.contains("app:***@"),
            "{r:#?}"
        );
    }
    let started = std::time::Instant::now();
    let r = cli(
        &["stats"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("DUROXIDE_PG_CONNECT_TIMEOUT", "2"),
        ],
    )
    .fails(1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(14),
        "DUROXIDE_PG_CONNECT_TIMEOUT bounds the connection attempts: {:?}",
        started.elapsed()
    );
    assert!(!r.stderr.contains(secret), "{r:#?}");
    let help = cli(&["--help"], &[("DATABASE_URL", url.as_str())]).ok();
    assert!(!help.stdout.contains(secret), "{help:#?}");
}
