//! `duroxide-pg-hybrid-bench`: what each fetch path costs, near and far from the
//! database, next to the incumbent `duroxide-pg` provider.
//!
//! ```text
//! cargo run --release -p duroxide-pg-hybrid-bench -- all --out bench/results
//! cargo run --release -p duroxide-pg-hybrid-bench --features incumbent -- latency --rtt-ms 0,10,50
//! ```
//! See `BENCHMARKS.md` at the repository root for the scenarios and the latest numbers.

mod charts;
mod cluster;
mod counting;
mod idle;
mod latency;
mod machine;
mod micro;
mod provider_throughput;
mod providers;
use duroxide_pg_hybrid_testkit::proxy;
mod report;
mod results;
mod throughput;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use sqlx::postgres::PgPoolOptions;

use crate::providers::{BoxError, Env, ProviderKind};
use crate::results::{Line, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// duroxide's parallel_orchestrations stress harness at 1:1, 2:2, 4:4 dispatchers.
    Throughput,
    /// Provider-bound throughput: 0 ms activities, 100 in flight, 1:1, 4:4, 16:16, with
    /// provider calls, statements and server time (pg_stat_statements) per orchestration.
    ProviderThroughput,
    /// p50/p95 start→completed of a 5-activity chain at RTT 0, 10, 50 ms.
    Latency,
    /// fetch time and bytes at 100, 1,000, 10,000 history events.
    History,
    /// fetch cost next to 100,000 future work items / a locked instance's 100,000 messages.
    Backlog,
    /// statements/s of an idle 2+2 runtime.
    Idle,
    /// All of the above, then `report`.
    All,
    /// Regenerate table, charts and summary.md from the JSON lines in --out.
    Report,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::ProviderThroughput => "provider-throughput",
            Scenario::Latency => "latency",
            Scenario::History => "history",
            Scenario::Backlog => "backlog",
            Scenario::Idle => "idle",
            Scenario::All => "all",
            Scenario::Report => "report",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Benchmarks duroxide-pg-hybrid (hybrid and procedure fetch paths) against duroxide-pg, with simulated network latency"
)]
struct Cli {
    scenario: Scenario,
    /// PostgreSQL URL (TCP host, not a Unix socket, so that it can be proxied).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// Providers to run (default: every provider compiled in).
    #[arg(long, value_enum, value_delimiter = ',')]
    provider: Vec<ProviderKind>,
    /// Simulated round-trip times in ms, comma-separated. Each is applied by a loopback
    /// proxy delaying each direction by half. Default: 0,10,50 for latency, 0 otherwise
    /// (provider-throughput runs at the first one only).
    #[arg(long, value_delimiter = ',')]
    rtt_ms: Vec<u64>,
    /// Runs per measurement (results are medians with min–max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Smaller sizes and shorter runs (whole `all` in a few minutes).
    #[arg(long)]
    quick: bool,
    /// Directory for `<scenario>.jsonl`, charts and `summary.md`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also print the JSON lines to stdout.
    #[arg(long)]
    json: bool,
    /// Replace the text between `<!-- bench:begin -->` and `<!-- bench:end -->` in this
    /// markdown file with the generated snippet (needs --out).
    #[arg(long)]
    update_doc: Option<PathBuf>,
    /// Route connections through the proxy even at RTT 0 (counts round trips everywhere).
    #[arg(long)]
    proxy: bool,
    /// throughput, provider-throughput: dispatcher configs as ORCH:WORKER, comma-separated
    /// (default 1:1,2:2,4:4 for throughput, 1:1,4:4,16:16 for provider-throughput).
    #[arg(long)]
    configs: Option<String>,
    /// throughput: seconds per run (default 5, quick 3); provider-throughput: (default 10,
    /// quick 4); idle: measuring window (default 15, quick 4).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// latency: orchestrations per run (default 8, quick 3).
    #[arg(long)]
    samples: Option<usize>,
    /// latency: how long each activity sleeps (ms).
    #[arg(long, default_value_t = 0)]
    activity_ms: u64,
    /// history: history sizes in events, comma-separated.
    #[arg(long, default_value = "100,1000,10000")]
    sizes: String,
    /// backlog: queued items (default 100000, quick 20000).
    #[arg(long)]
    backlog: Option<usize>,
}

/// Options every scenario reads.
pub struct Opts {
    pub providers: Vec<ProviderKind>,
    rtt_ms: Vec<u64>,
    pub runs: usize,
    pub quick: bool,
    pub configs: Option<String>,
    pub duration_secs: Option<u64>,
    pub samples: Option<usize>,
    pub activity_ms: u64,
    pub sizes: String,
    pub backlog: Option<usize>,
}

impl Opts {
    /// Orphan events of the backlog scenario.
    pub fn orphans(&self) -> usize {
        if self.quick { 2_000 } else { 10_000 }
    }

    /// Incompatible (pinned) instances of the backlog scenario.
    pub fn incompatible(&self) -> usize {
        if self.quick { 200 } else { 1_000 }
    }

    /// The RTTs given on the command line, else the scenario's defaults.
    pub fn rtts(&self, default: &[u64]) -> Vec<u64> {
        if self.rtt_ms.is_empty() {
            default.to_vec()
        } else {
            self.rtt_ms.clone()
        }
    }
}

/// TLS to a loopback server only costs CPU and hides the protocol from the proxy's
/// statement counter, so unless the URL chooses an `sslmode`, loopback URLs get
/// `sslmode=disable` (for every provider alike).
fn loopback_without_tls(url: &str) -> String {
    if url.contains("sslmode=") {
        return url.to_string();
    }
    let Ok((_, upstream)) =
        proxy::rewrite_url(url, std::net::SocketAddr::from(([127, 0, 0, 1], 1)))
    else {
        return url.to_string();
    };
    let host = upstream
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&upstream);
    if host == "localhost" || host == "[::1]" || host.starts_with("127.") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}sslmode=disable")
    } else {
        url.to_string()
    }
}

async fn has_pg_stat_statements(admin: &sqlx::PgPool) -> bool {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_statements")
        .fetch_one(admin)
        .await
        .is_ok()
}

async fn run_scenario(env: &Env, opts: &Opts, scenario: Scenario) -> Result<Vec<Record>, BoxError> {
    match scenario {
        Scenario::Throughput => throughput::run(env, opts).await,
        Scenario::ProviderThroughput => provider_throughput::run(env, opts).await,
        Scenario::Latency => latency::run(env, opts).await,
        Scenario::History => micro::history(env, opts).await,
        Scenario::Backlog => micro::backlog(env, opts).await,
        Scenario::Idle => idle::run(env, opts).await,
        Scenario::All | Scenario::Report => unreachable!(),
    }
}

fn write_lines(path: Option<&Path>, json: bool, lines: &[Line]) -> Result<(), BoxError> {
    let text: String = lines
        .iter()
        .map(|l| serde_json::to_string(l).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    if let Some(p) = path {
        std::fs::write(p, &text)?;
    }
    if json {
        std::io::stdout().write_all(text.as_bytes())?;
    }
    Ok(())
}

fn finish_report(cli: &Cli, fresh: &[Record]) -> Result<(), BoxError> {
    match &cli.out {
        Some(dir) => {
            let report::Report {
                charts,
                metas,
                records,
            } = report::write_report(dir).map_err(|e| e.to_string())?;
            println!("{}", report::text_table(&records));
            eprintln!(
                "wrote {} (summary.md, {} chart(s): {})",
                dir.display(),
                charts.len(),
                charts
                    .iter()
                    .map(|c| c.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(doc) = &cli.update_doc {
                report::update_doc(doc, dir, &metas, &records, &charts)
                    .map_err(|e| e.to_string())?;
                eprintln!("updated {}", doc.display());
            }
        }
        None => println!("{}", report::text_table(fresh)),
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Installed before duroxide's runtime tries to install its own (which would log to
    // stdout and mix with the table / JSON lines). RUST_LOG overrides the level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    if let Err(e) = real_main(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<(), BoxError> {
    if let Some(dir) = &cli.out {
        std::fs::create_dir_all(dir)?;
    }
    if cli.scenario == Scenario::Report {
        if cli.out.is_none() {
            return Err("report needs --out DIR (the directory holding the .jsonl files)".into());
        }
        return finish_report(&cli, &[]);
    }
    let providers = if cli.provider.is_empty() {
        ProviderKind::all_available()
    } else {
        cli.provider.clone()
    };
    if let Some(p) = providers.iter().find(|p| !p.available()) {
        return Err(format!(
            "provider `{p}` is not compiled in: run with `cargo run --release -p duroxide-pg-hybrid-bench --features incumbent -- …`"
        )
        .into());
    }
    if cli.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let database_url = loopback_without_tls(&cli.database_url);
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    let pgss = has_pg_stat_statements(&admin).await;
    let env = Env {
        url: database_url,
        admin,
        pg_stat_statements: pgss,
        force_proxy: cli.proxy,
    };
    let opts = Opts {
        providers: providers.clone(),
        rtt_ms: cli.rtt_ms.clone(),
        runs: cli.runs,
        quick: cli.quick,
        configs: cli.configs.clone(),
        duration_secs: cli.duration_secs,
        samples: cli.samples,
        activity_ms: cli.activity_ms,
        sizes: cli.sizes.clone(),
        backlog: cli.backlog,
    };
    let scenarios: Vec<Scenario> = if cli.scenario == Scenario::All {
        vec![
            Scenario::Throughput,
            Scenario::ProviderThroughput,
            Scenario::Latency,
            Scenario::History,
            Scenario::Backlog,
            Scenario::Idle,
        ]
    } else {
        vec![cli.scenario]
    };
    let names: Vec<String> = providers.iter().map(|p| p.name().to_string()).collect();
    let mut all = Vec::new();
    let mut failures = Vec::new();
    for scenario in scenarios {
        let started = Instant::now();
        eprintln!("== {} ({}) ==", scenario.name(), names.join(", "));
        let meta = machine::collect(
            &env.admin,
            &env.url,
            scenario.name(),
            cli.quick,
            names.clone(),
            pgss,
        )
        .await;
        match run_scenario(&env, &opts, scenario).await {
            Ok(records) => {
                eprintln!(
                    "   {} done in {:.0} s",
                    scenario.name(),
                    started.elapsed().as_secs_f64()
                );
                let mut lines = vec![Line::Meta(meta)];
                lines.extend(records.iter().cloned().map(Line::Result));
                let path = cli
                    .out
                    .as_ref()
                    .map(|d| d.join(format!("{}.jsonl", scenario.name())));
                write_lines(path.as_deref(), cli.json, &lines)?;
                all.extend(records);
            }
            Err(e) => {
                eprintln!("   {} FAILED: {e}", scenario.name());
                failures.push(format!("{}: {e}", scenario.name()));
            }
        }
    }
    finish_report(&cli, &all)?;
    env.admin.close().await;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}
