//! `duroxide-pg-hybrid`: migrate, verify and inspect a duroxide-pg-hybrid schema.
//!
//! Exit codes: 0 success, 1 operational failure (verify mismatch, instance not found,
//! database error), 2 usage error (bad flags, missing database URL).
//!
//! Errors are one line on stderr (`error: ...`) with any password redacted. With
//! `--json`, every command prints one JSON document on stdout, failures included
//! (`{"error": "..."}`).
//!
//! Inspection commands (`stats`, `instances`, `instance`) never migrate. They work on a
//! plain pool: a schema without any migration is an error (run `migrate up`), a schema
//! behind or ahead of this binary is inspected anyway with a warning on stderr.
//!
//! A schema holding duroxide-pg 0.1.38's tables (its `_duroxide_migrations` ledger at
//! migration 26) is being adopted: every command works on the companion schema that holds
//! this crate's tables (`<schema>_hybrid`) and says so on stderr; `migrate up` also
//! installs the adoption, `adopt status` shows what is left, `adopt finalize` ends it. A
//! duroxide-pg schema of another release is named as such (release and migration found)
//! and refused.

mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use duroxide_pg_hybrid::options::{env as env_vars, redact_url};
use duroxide_pg_hybrid::schema::{self, MIGRATOR};
use duroxide_pg_hybrid::{FetchPath, ProviderOptions, adopt, inspect};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[derive(Parser, Debug)]
#[command(
    name = "duroxide-pg-hybrid",
    version,
    about = "Migrate, verify and inspect a duroxide-pg-hybrid schema"
)]
struct Cli {
    /// PostgreSQL connection URL (postgres://user:password@host:port/db).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    /// Schema holding the provider's tables.
    #[arg(
        long,
        env = "DUROXIDE_PG_SCHEMA",
        hide_env_values = true,
        default_value = duroxide_pg_hybrid::DEFAULT_SCHEMA,
        value_parser = parse_schema,
        global = true
    )]
    schema: String,

    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,

    /// Seconds to keep trying to connect (a server that refuses or does not answer)
    /// before failing.
    #[arg(
        long,
        env = "DUROXIDE_PG_CONNECT_TIMEOUT",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    connect_timeout: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply, list or print the schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateCmd,
    },
    /// Exit 0 if the schema is exactly at this binary's migration version, else 1.
    Verify,
    /// Queue depths, instance counts by status, leases and sessions.
    Stats,
    /// Instance listings.
    Instances {
        #[command(subcommand)]
        action: InstancesCmd,
    },
    /// One instance: executions, history timeline, queued messages, lease.
    Instance {
        #[command(subcommand)]
        action: InstanceCmd,
    },
    /// Adoption of a running duroxide-pg 0.1.38 deployment (--schema = its schema).
    Adopt {
        #[command(subcommand)]
        action: AdoptCmd,
    },
    /// Which fetch path the configuration resolves to, and why (needs no database).
    FetchPath {
        /// Resolve as if the program set `ProviderOptions::fetch_path` to this value
        /// (it takes precedence over DUROXIDE_PG_FETCH_PATH).
        #[arg(long, value_name = "PATH")]
        explicit: Option<FetchPath>,
    },
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Apply pending migrations (creating the schema if needed).
    Up,
    /// Applied, pending, unknown and mismatching migrations.
    Status,
    /// The SQL a DBA would run by hand to create or upgrade the schema (needs no database).
    PrintSql,
}

#[derive(Subcommand, Debug)]
enum AdoptCmd {
    /// What is left in the duroxide-pg tables and how many instances moved.
    Status,
    /// When no duroxide-pg process is left and nothing remains in its tables: drop
    /// duroxide-pg's objects and leave a marker naming the companion schema.
    Finalize,
}

#[derive(Subcommand, Debug)]
enum InstancesCmd {
    /// Newest instances first.
    List {
        /// Only instances whose current execution has this status (Running, Completed,
        /// Failed, ContinuedAsNew, Unknown; case-insensitive).
        #[arg(long, value_parser = parse_status)]
        status: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(0..))]
        limit: i64,
    },
}

#[derive(Subcommand, Debug)]
enum InstanceCmd {
    /// Executions with their history as a timeline, queued messages, worker items, lease.
    Show {
        /// Instance id.
        id: String,
    },
}

fn parse_schema(s: &str) -> Result<String, String> {
    schema::validate_schema_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

const STATUSES: [&str; 5] = [
    "Running",
    "Completed",
    "Failed",
    "ContinuedAsNew",
    "Unknown",
];

fn parse_status(s: &str) -> Result<String, String> {
    STATUSES
        .iter()
        .find(|k| k.eq_ignore_ascii_case(s.trim()))
        .map(|k| k.to_string())
        .ok_or_else(|| {
            format!(
                "unknown status {s:?}: expected one of {}",
                STATUSES.join(", ")
            )
        })
}

/// A failed command: its exit code and one-line message.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Operational failure (exit 1).
    fn op(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    /// Usage error (exit 2).
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<duroxide::providers::ProviderError> for Failure {
    fn from(e: duroxide::providers::ProviderError) -> Self {
        Failure::op(e.to_string())
    }
}

/// The message of a sqlx error without sqlx's generic prefixes where they add nothing.
fn sqlx_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => inner.to_string(),
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

/// What the command prints on success: text for humans, JSON for `--json`.
struct Output {
    text: String,
    json: Value,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(&cli));
    match result {
        Ok(out) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out.json).unwrap_or_default()
                );
            } else if !out.text.is_empty() {
                print!("{}", out.text);
                if !out.text.ends_with('\n') {
                    println!();
                }
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            let message = redact(&f.message, cli.database_url.as_deref());
            let line = message.replace('\n', " ");
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "error": line })).unwrap_or_default()
                );
            }
            eprintln!("error: {line}");
            ExitCode::from(f.code)
        }
    }
}

/// Removes the URL's password from a message, wherever it appears.
fn redact(message: &str, url: Option<&str>) -> String {
    let Some(url) = url else {
        return message.to_string();
    };
    let mut out = message.replace(url, &redact_url(url));
    if let Some(password) = url_password(url) {
        out = out.replace(password, "***");
    }
    out
}

fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    // Very short passwords would also match unrelated text; the URL form is replaced above.
    (password.len() >= 4).then_some(password)
}

/// The schema holding this crate's tables for `--schema` (the companion schema of an
/// adopted duroxide-pg schema), and the duroxide-pg schema being adopted, if any.
async fn resolve(pool: &PgPool, schema: &str) -> Result<adopt::Resolved, Failure> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| Failure::op(sqlx_message(&e)))?;
    let resolved = adopt::resolve(&mut conn, schema)
        .await
        .map_err(|e| Failure::op(sqlx_message(&e)))?;
    if let Some(old) = &resolved.adopting {
        eprintln!(
            "schema {old:?} holds a duroxide-pg 0.1.38 schema being adopted; this crate's tables are in {:?}",
            resolved.data_schema
        );
    } else if resolved.data_schema != schema {
        eprintln!(
            "schema {schema:?} was adopted from duroxide-pg; this crate's tables are in {:?}",
            resolved.data_schema
        );
    }
    Ok(resolved)
}

async fn run(cli: &Cli) -> Result<Output, Failure> {
    if let Command::Adopt { action } = &cli.command {
        let pool = connect(cli).await?;
        return adopt_command(&pool, &cli.schema, action).await;
    }
    let resolved = match &cli.command {
        Command::FetchPath { .. }
        | Command::Migrate {
            action: MigrateCmd::PrintSql,
        } => None,
        _ => Some(resolve(&connect(cli).await?, &cli.schema).await?),
    };
    let schema = resolved
        .as_ref()
        .map_or(cli.schema.as_str(), |r| r.data_schema.as_str());
    match &cli.command {
        Command::Adopt { .. } => unreachable!("handled above"),
        Command::FetchPath { explicit } => fetch_path(*explicit),
        Command::Migrate {
            action: MigrateCmd::PrintSql,
        } => {
            let sql = schema::migration_sql(schema).map_err(|e| Failure::usage(e.to_string()))?;
            Ok(Output {
                json: json!({ "schema": schema, "sql": sql }),
                text: sql,
            })
        }
        Command::Migrate {
            action: MigrateCmd::Up,
        } => {
            let pool = connect(cli).await?;
            let out = migrate_up(&pool, schema).await?;
            if let Some(old) = resolved.as_ref().and_then(|r| r.adopting.as_deref()) {
                adopt::install(&pool, old, schema).await.map_err(|e| {
                    Failure::op(format!(
                        "install the adoption of {old:?}: {}",
                        sqlx_message(&e)
                    ))
                })?;
                eprintln!("adoption of duroxide-pg schema {old:?} into {schema:?} installed");
            }
            Ok(out)
        }
        Command::Migrate {
            action: MigrateCmd::Status,
        } => {
            let pool = connect(cli).await?;
            let st = schema::status(&pool, schema)
                .await
                .map_err(|e| Failure::op(sqlx_message(&e)))?;
            Ok(output::migrate_status(schema, &st))
        }
        Command::Verify => {
            let pool = connect(cli).await?;
            schema::verify(&pool, schema)
                .await
                .map_err(|e| Failure::op(sqlx_message(&e)))?;
            let version = schema::expected_version();
            Ok(Output {
                text: format!(
                    "schema {schema:?} is at migration {version}, as this binary expects\n"
                ),
                json: json!({ "ok": true, "schema": schema, "version": version }),
            })
        }
        Command::Stats => {
            let pool = connect_for_inspect(cli, schema).await?;
            let stats = inspect::stats_in(&pool, schema).await?;
            let mut out = output::stats(schema, &stats);
            if let Some(old) = resolved.as_ref().and_then(|r| r.adopting.as_deref()) {
                // The move's progress belongs to the picture while it runs.
                let p = adopt::progress(&pool, schema)
                    .await
                    .map_err(|e| Failure::op(sqlx_message(&e)))?;
                out.text.push_str(&format!(
                    "adoption of duroxide-pg schema {old:?}: {} moved; left {} instance(s), {} message(s), {} activit(y/ies)\n",
                    p.adopted, p.old_instances, p.old_messages, p.old_activities
                ));
                out.json["adoption"] = json!({
                    "duroxide_pg_schema": old,
                    "adopted": p.adopted,
                    "old_instances": p.old_instances,
                    "old_messages": p.old_messages,
                    "old_activities": p.old_activities,
                    "done": p.is_done(),
                });
            }
            Ok(out)
        }
        Command::Instances {
            action: InstancesCmd::List { status, limit },
        } => {
            let pool = connect_for_inspect(cli, schema).await?;
            let list = inspect::list_instances_in(&pool, schema, status.as_deref(), *limit).await?;
            Ok(output::instance_list(&list))
        }
        Command::Instance {
            action: InstanceCmd::Show { id },
        } => {
            let pool = connect_for_inspect(cli, schema).await?;
            match inspect::instance_detail_in(&pool, schema, id).await? {
                Some(detail) => Ok(output::instance_detail(&detail)),
                None => Err(Failure::op(format!(
                    "instance {id:?} not found in schema {schema:?}"
                ))),
            }
        }
    }
}

fn fetch_path(explicit: Option<FetchPath>) -> Result<Output, Failure> {
    let mut opts = ProviderOptions::default()
        .with_env_overrides()
        .map_err(|e| Failure::op(e.to_string()))?;
    let env_value = std::env::var(env_vars::FETCH_PATH)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let source = if let Some(p) = explicit {
        opts.fetch_path = Some(p);
        "option"
    } else if env_value.is_some() {
        "env"
    } else {
        "compiled_default"
    };
    let path = opts
        .resolved_fetch_path()
        .map_err(|e| Failure::op(e.to_string()))?;
    let why = match source {
        "option" => "from ProviderOptions::fetch_path".to_string(),
        "env" => format!("from {}", env_vars::FETCH_PATH),
        _ => "compiled default".to_string(),
    };
    Ok(Output {
        text: format!("{path} ({why})\n"),
        json: json!({
            "fetch_path": path.as_str(),
            "source": source,
            "env": { env_vars::FETCH_PATH: env_value },
            "compiled_default": FetchPath::compiled_default().as_str(),
        }),
    })
}

async fn connect(cli: &Cli) -> Result<PgPool, Failure> {
    let Some(url) = cli.database_url.as_deref() else {
        return Err(Failure::usage(format!(
            "no database URL: pass --database-url or set {}",
            env_vars::DATABASE_URL
        )));
    };
    let options = url
        .parse::<PgConnectOptions>()
        .map_err(|e| {
            Failure::usage(format!(
                "invalid database URL {}: {}",
                redact_url(url),
                sqlx_message(&e)
            ))
        })?
        .application_name("duroxide-pg-hybrid-cli");
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(cli.connect_timeout))
        .connect_with(options)
        .await
        .map_err(|e| {
            Failure::op(format!(
                "cannot connect to {}: {}",
                redact_url(url),
                sqlx_message(&e)
            ))
        })
}

/// Connects without migrating. A schema with no migration at all is an error; one at
/// another version is inspected with a warning (the inspect queries read only the core
/// tables).
async fn adopt_command(pool: &PgPool, schema: &str, action: &AdoptCmd) -> Result<Output, Failure> {
    let resolved = resolve(pool, schema).await?;
    let Some(old) = resolved.adopting.as_deref() else {
        return Err(Failure::op(format!(
            "schema {schema:?} holds no duroxide-pg schema being adopted"
        )));
    };
    let new = resolved.data_schema.as_str();
    match action {
        AdoptCmd::Status => {
            let p = adopt::progress(pool, new).await.map_err(|e| {
                Failure::op(format!(
                    "{} (is the adoption installed? start a provider or run `migrate up`)",
                    sqlx_message(&e)
                ))
            })?;
            Ok(Output {
                text: format!(
                    "adopting duroxide-pg schema {old:?} into {new:?}\n\
                     moved:                 {}\n\
                     left in duroxide-pg:   {} instance(s), {} message(s), {} activit(y/ies) ({} held by a duroxide-pg worker)\n\
                     ready to finalize:     {}\n",
                    p.adopted,
                    p.old_instances,
                    p.old_messages,
                    p.old_activities,
                    p.old_leased_activities,
                    if p.is_done() {
                        "yes, once no duroxide-pg process is left"
                    } else {
                        "no"
                    }
                ),
                json: json!({
                    "duroxide_pg_schema": old,
                    "schema": new,
                    "adopted": p.adopted,
                    "old_instances": p.old_instances,
                    "old_messages": p.old_messages,
                    "old_activities": p.old_activities,
                    "old_leased_activities": p.old_leased_activities,
                    "done": p.is_done(),
                }),
            })
        }
        AdoptCmd::Finalize => {
            let f = adopt::finalize(pool, old)
                .await
                .map_err(|e| Failure::op(sqlx_message(&e)))?;
            Ok(Output {
                text: format!(
                    "adoption finalized: duroxide-pg objects dropped from {:?}; {} instance(s) moved; data in {:?}\n",
                    f.old, f.adopted, f.data_schema
                ),
                json: json!({
                    "duroxide_pg_schema": f.old,
                    "schema": f.data_schema,
                    "adopted": f.adopted,
                    "finalized": true,
                }),
            })
        }
    }
}

async fn connect_for_inspect(cli: &Cli, schema: &str) -> Result<PgPool, Failure> {
    let pool = connect(cli).await?;
    let st = schema::status(&pool, schema)
        .await
        .map_err(|e| Failure::op(sqlx_message(&e)))?;
    if st.applied.is_empty() {
        return Err(Failure::op(format!(
            "schema {schema:?} has no duroxide-pg-hybrid migrations (wrong --schema, or run `duroxide-pg-hybrid migrate up`)"
        )));
    }
    if let Err(e) = schema::verify(&pool, schema).await {
        eprintln!("warning: {} (inspecting anyway)", sqlx_message(&e));
    }
    Ok(pool)
}

async fn migrate_up(pool: &PgPool, schema: &str) -> Result<Output, Failure> {
    let before = schema::status(pool, schema)
        .await
        .map_err(|e| Failure::op(sqlx_message(&e)))?;
    if !before.unknown.is_empty() || !before.checksum_mismatch.is_empty() {
        // verify() words both cases; refuse before touching anything.
        let e = schema::verify(pool, schema)
            .await
            .err()
            .map(|e| sqlx_message(&e));
        return Err(Failure::op(e.unwrap_or_else(|| {
            format!("schema {schema:?} cannot be migrated")
        })));
    }
    let describe = |v: i64| {
        MIGRATOR
            .iter()
            .find(|m| m.version == v)
            .map(|m| m.description.to_string())
            .unwrap_or_default()
    };
    if before.pending.is_empty() {
        eprintln!(
            "schema {schema:?}: up to date at migration {}",
            schema::expected_version()
        );
    } else {
        eprintln!(
            "schema {schema:?}: {} pending migration(s)",
            before.pending.len()
        );
        for v in &before.pending {
            eprintln!("  pending {v} {}", describe(*v));
        }
    }
    schema::migrate(pool, schema)
        .await
        .map_err(|e| Failure::op(format!("migrate schema {schema:?}: {}", sqlx_message(&e))))?;
    let after = schema::status(pool, schema)
        .await
        .map_err(|e| Failure::op(sqlx_message(&e)))?;
    // Another process may have applied some of them concurrently: report what is new.
    let applied: Vec<i64> = before
        .pending
        .iter()
        .copied()
        .filter(|v| after.applied.contains(v))
        .collect();
    eprintln!(
        "applied {} migration(s); schema {schema:?} is at migration {}",
        applied.len(),
        after.applied.last().copied().unwrap_or(0)
    );
    Ok(Output {
        text: String::new(),
        json: json!({
            "schema": schema,
            "pending_before": before.pending,
            "applied": applied,
            "version": after.applied.last().copied().unwrap_or(0),
            "current": after.is_current(),
        }),
    })
}
