//! `idle`: what an idle runtime (default `RuntimeOptions`: 2 orchestration + 2 worker
//! dispatchers) costs the database: statements/s, request bursts/s and bytes/s, counted by
//! the proxy (and, if `pg_stat_statements` is installed, the server-wide call rate).

use std::time::{Duration, Instant};

use duroxide::runtime::{self, RuntimeOptions};
use serde_json::json;

use crate::Opts;
use crate::latency::registries;
use crate::providers::{BoxError, Env};
use crate::results::Record;

async fn server_calls(env: &Env) -> Option<f64> {
    if !env.pg_stat_statements {
        return None;
    }
    sqlx::query_scalar::<_, f64>("SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements")
        .fetch_one(&env.admin)
        .await
        .ok()
}

pub async fn run(env: &Env, opts: &Opts) -> Result<Vec<Record>, BoxError> {
    let window = Duration::from_secs(
        opts.duration_secs
            .unwrap_or(if opts.quick { 4 } else { 15 }),
    );
    let settle = Duration::from_secs(2);
    let rtts = opts.rtts(&[0]);
    let mut out = Vec::new();
    for &rtt in &rtts {
        for &kind in &opts.providers {
            let mut stmts = Vec::new();
            let mut rts = Vec::new();
            let mut bytes = Vec::new();
            let mut server = Vec::new();
            for run in 0..opts.runs {
                let session = env.session("idle", kind, rtt, true, false).await?;
                let provider = session.dyn_provider();
                let (acts, orchs) = registries(0);
                let rt = runtime::Runtime::start_with_options(
                    provider.clone(),
                    acts,
                    orchs,
                    RuntimeOptions::default(),
                )
                .await;
                tokio::time::sleep(settle).await;
                let before = session.snapshot().ok_or("idle needs the proxy")?;
                let server_before = server_calls(env).await;
                let t = Instant::now();
                tokio::time::sleep(window).await;
                let after = session.snapshot().ok_or("idle needs the proxy")?;
                let server_after = server_calls(env).await;
                let secs = t.elapsed().as_secs_f64();
                rt.shutdown(None).await;
                drop(provider);
                session.teardown(env).await;
                let d = after.since(&before);
                let s = d.statements as f64 / secs;
                eprintln!(
                    "  idle rtt={rtt}ms {kind} run {}: {s:.1} statements/s, {:.1} request bursts/s, {:.0} B/s{}",
                    run + 1,
                    d.bursts as f64 / secs,
                    (d.bytes_c2s + d.bytes_s2c) as f64 / secs,
                    if d.unparsed_connections > 0 {
                        " (some connections encrypted: statements undercounted)"
                    } else {
                        ""
                    }
                );
                stmts.push(s);
                rts.push(d.bursts as f64 / secs);
                bytes.push((d.bytes_c2s + d.bytes_s2c) as f64 / secs);
                if let (Some(a), Some(b)) = (server_after, server_before) {
                    server.push((a - b) / secs);
                }
            }
            let case = "2+2 dispatchers";
            let extra = json!({"window_secs": window.as_secs(), "runtime_options": "default", "source": "proxy"});
            out.push(
                Record::new(
                    "idle",
                    kind.name(),
                    case,
                    rtt,
                    "statements_per_s",
                    "stmts/s",
                    stmts,
                )
                .with_extra(extra),
            );
            out.push(Record::new(
                "idle",
                kind.name(),
                case,
                rtt,
                "round_trips_per_s",
                "bursts/s",
                rts,
            ));
            out.push(Record::new(
                "idle",
                kind.name(),
                case,
                rtt,
                "bytes_per_s",
                "B/s",
                bytes,
            ));
            if !server.is_empty() {
                let extra = json!({"note": "pg_stat_statements calls/s across the whole server, all clients"});
                out.push(
                    Record::new(
                        "idle",
                        kind.name(),
                        case,
                        rtt,
                        "server_calls_per_s",
                        "calls/s",
                        server,
                    )
                    .with_extra(extra),
                );
            }
        }
    }
    Ok(out)
}
