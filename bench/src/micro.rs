//! Provider-level micro-benchmarks that call the `Provider` trait directly (no runtime):
//!
//! - `history`: cost of `fetch_orchestration_item` for an instance whose history holds
//!   N events (time, and bytes on the wire counted by the proxy);
//! - `backlog`: `fetch_work_item` with a large backlog of future-visible work items;
//!   `fetch_orchestration_item` while one locked instance holds a large message backlog,
//!   next to 10,000 events for instances that do not exist, and next to 1,000 instances
//!   pinned outside the default version range; and the write side, 8 tasks raising
//!   events for one instance at once.
//!
//! State is created through the provider API (so every provider stores it in its own
//! format), and backlogs are then multiplied with one `INSERT … SELECT` that copies the
//! template row column by column, which works on any of the schemas.

use std::sync::Arc;
use std::time::{Duration, Instant};

use duroxide::providers::{
    DispatcherCapabilityFilter, ExecutionMetadata, Provider, TagFilter, WorkItem,
};
use duroxide::{Event, EventKind};
use futures::StreamExt;
use serde_json::json;
use sqlx::Row;

use crate::Opts;
use crate::providers::{BoxError, Env, Session};
use crate::results::{Record, median};
use duroxide_pg_hybrid_testkit::proxy::{Proxy, ProxySnapshot};

const LOCK: Duration = Duration::from_secs(30);
/// Calls made before measuring a backlog fetch. PL/pgSQL caches plans per connection
/// and switches to a generic plan after 5 executions, and sqlx hands out idle pooled
/// connections in turn, so 6 calls per pooled connection show the steady state a
/// long-running dispatcher sees (and open the connections the path needs).
const WARMUP_CALLS: usize = 6 * crate::providers::POOL_SIZE as usize;
/// Warm-up for history fetches: enough for every pooled connection to have prepared the
/// statements of the path (the hybrid path spreads its reads over several connections).
const HISTORY_WARMUP: usize = 20;

fn start_item(instance: &str) -> WorkItem {
    WorkItem::StartOrchestration {
        instance: instance.to_string(),
        orchestration: "Bench".to_string(),
        input: "{}".to_string(),
        version: Some("1.0.0".to_string()),
        parent_instance: None,
        parent_id: None,
        parent_execution_id: None,
        execution_id: 1,
    }
}

fn started_event(instance: &str) -> Event {
    Event::with_event_id(
        1,
        instance,
        1,
        None,
        EventKind::OrchestrationStarted {
            name: "Bench".to_string(),
            version: "1.0.0".to_string(),
            input: "{}".to_string(),
            parent_instance: None,
            parent_id: None,
            parent_execution_id: None,
            carry_forward_events: None,
            initial_custom_status: None,
        },
    )
}

fn metadata() -> ExecutionMetadata {
    ExecutionMetadata {
        orchestration_name: Some("Bench".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        ..Default::default()
    }
}

/// Creates `instance` with a history of `events` events (the start event, then
/// ActivityScheduled/ActivityCompleted pairs carrying `payload`).
async fn create_instance(
    p: &dyn Provider,
    instance: &str,
    events: usize,
    payload: &str,
) -> Result<(), BoxError> {
    p.enqueue_for_orchestrator(start_item(instance), None)
        .await?;
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await?
        .ok_or_else(|| format!("could not fetch new instance {instance}"))?;
    let mut delta = vec![started_event(instance)];
    let mut id = 2u64;
    while delta.len() < events {
        let scheduled = id;
        delta.push(Event::with_event_id(
            id,
            instance,
            1,
            None,
            EventKind::ActivityScheduled {
                name: "Work".to_string(),
                input: payload.to_string(),
                session_id: None,
                tag: None,
            },
        ));
        id += 1;
        if delta.len() < events {
            delta.push(Event::with_event_id(
                id,
                instance,
                1,
                Some(scheduled),
                EventKind::ActivityCompleted {
                    result: payload.to_string(),
                },
            ));
            id += 1;
        }
    }
    p.ack_orchestration_item(&token, 1, delta, vec![], vec![], metadata(), vec![])
        .await?;
    Ok(())
}

fn poke(instance: &str) -> WorkItem {
    WorkItem::ExternalRaised {
        instance: instance.to_string(),
        name: "poke".to_string(),
        data: "x".to_string(),
    }
}

fn activity(instance: &str, id: u64) -> WorkItem {
    WorkItem::ActivityExecute {
        instance: instance.to_string(),
        execution_id: 1,
        id,
        name: "Work".to_string(),
        input: "x".to_string(),
        session_id: None,
        tag: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Copies the only row of `schema.table` until the table holds `1 + copies` rows, then
/// analyzes it (as autovacuum would have on a long-lived queue).
async fn multiply_row(env: &Env, schema: &str, table: &str, copies: usize) -> Result<(), BoxError> {
    let cols: Vec<String> = sqlx::query(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = $2 AND column_name <> 'id' \
           AND is_generated = 'NEVER' AND identity_generation IS NULL \
         ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&env.admin)
    .await?
    .iter()
    .map(|r| format!("\"{}\"", r.get::<String, _>(0)))
    .collect();
    if cols.is_empty() {
        return Err(format!("table {schema}.{table} not found").into());
    }
    let list = cols.join(", ");
    let t = format!("\"{schema}\".\"{table}\"");
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
        .fetch_one(&env.admin)
        .await?;
    if n != 1 {
        return Err(format!("expected exactly one template row in {t}, found {n}").into());
    }
    let sql = format!("INSERT INTO {t} ({list}) SELECT {list} FROM {t}, generate_series(1, $1)");
    sqlx::query(&sql)
        .bind(copies as i64)
        .execute(&env.admin)
        .await?;
    sqlx::query(&format!("ANALYZE {t}"))
        .execute(&env.admin)
        .await?;
    Ok(())
}

/// Times `calls` sequential calls of `f` after `warmup` untimed ones.
async fn time_calls<F, Fut>(warmup: usize, calls: usize, mut f: F) -> Result<Vec<f64>, BoxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Duration, BoxError>>,
{
    for _ in 0..warmup {
        f().await?;
    }
    let mut out = Vec::with_capacity(calls);
    for _ in 0..calls {
        out.push(ms(f().await?));
    }
    Ok(out)
}

/// Timed fetch of an orchestration item that must be `instance` (then abandoned).
async fn fetch_orch_expect(
    p: &dyn Provider,
    instance: &str,
) -> Result<(Duration, usize, usize), BoxError> {
    let t = Instant::now();
    let got = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await?;
    let elapsed = t.elapsed();
    let (item, token, _) =
        got.ok_or_else(|| format!("expected to fetch {instance}, got nothing"))?;
    p.abandon_orchestration_item(&token, None, true).await?;
    if item.instance != instance {
        return Err(format!("expected to fetch {instance}, got {}", item.instance).into());
    }
    Ok((elapsed, item.history.len(), item.messages.len()))
}

// ---------------------------------------------------------------------------------------
// history

pub fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|x| {
            x.trim()
                .replace('_', "")
                .parse()
                .map_err(|_| format!("bad size {x:?}"))
        })
        .collect()
}

pub async fn history(env: &Env, opts: &Opts) -> Result<Vec<Record>, BoxError> {
    let sizes = parse_sizes(&opts.sizes)?;
    let rtts = opts.rtts(&[0, 10]);
    let calls = if opts.quick { 3 } else { 5 };
    // ~256-character payloads make events of ~420 bytes of JSON, as in the incumbent's
    // own measurement of this cost.
    let payload = "p".repeat(256);
    let mut out = Vec::new();
    for &rtt in &rtts {
        for &kind in &opts.providers {
            for &events in &sizes {
                let session = env.session("hist", kind, rtt, true, true).await?;
                let r = history_one(&session, events, &payload, calls, opts.runs).await;
                session.teardown(env).await;
                let HistoryCosts {
                    fetch_runs: runs,
                    bytes,
                    round_trips: rts,
                    statements: stmts,
                    read_ms,
                    read_bytes,
                } = r?;
                let case = format!("{events} events");
                eprintln!(
                    "  history {case} rtt={rtt}ms {kind}: fetch {:.2} ms (runs {:?}), {} bytes from server, {} request bursts; read {:.2} ms, {} bytes",
                    median(&runs),
                    runs.iter()
                        .map(|v| (v * 100.0).round() / 100.0)
                        .collect::<Vec<_>>(),
                    bytes,
                    rts,
                    median(&read_ms),
                    read_bytes
                );
                let extra = json!({"payload_chars": payload.len(), "calls_per_run": calls, "warmup_calls": HISTORY_WARMUP, "measured": "turns after the first: fetch, then an ack adding 2 events"});
                out.push(
                    Record::new("history", kind.name(), &case, rtt, "fetch_ms", "ms", runs)
                        .with_extra(extra),
                );
                out.push(Record::new(
                    "history",
                    kind.name(),
                    &case,
                    rtt,
                    "fetch_bytes_from_server",
                    "bytes",
                    vec![bytes],
                ));
                out.push(Record::new(
                    "history",
                    kind.name(),
                    &case,
                    rtt,
                    "fetch_round_trips",
                    "bursts",
                    vec![rts],
                ));
                out.push(Record::new(
                    "history",
                    kind.name(),
                    &case,
                    rtt,
                    "fetch_statements",
                    "stmts",
                    vec![stmts],
                ));
                out.push(Record::new(
                    "history",
                    kind.name(),
                    &case,
                    rtt,
                    "read_ms",
                    "ms",
                    read_ms,
                ));
                out.push(Record::new(
                    "history",
                    kind.name(),
                    &case,
                    rtt,
                    "read_bytes_from_server",
                    "bytes",
                    vec![read_bytes],
                ));
            }
        }
    }
    Ok(out)
}

/// One orchestration turn of the history instance: a timed fetch (whose history must hold
/// `*len` events), then an ack appending an ActivityScheduled/ActivityCompleted pair and
/// a message, so the next turn has 2 new events. A turn after the first is what a
/// running orchestration costs: providers with a history cache read only the new events.
async fn history_turn(
    p: &dyn Provider,
    instance: &str,
    len: &mut usize,
    payload: &str,
    counted: Option<(&Proxy, Duration)>,
) -> Result<(Duration, Option<ProxySnapshot>), BoxError> {
    let before = counted.map(|(proxy, _)| proxy.snapshot());
    let t = Instant::now();
    let got = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await?;
    let elapsed = t.elapsed();
    let mut traffic = None;
    if let (Some((proxy, settle)), Some(before)) = (counted, before) {
        // Let background traffic the call caused (e.g. sqlx's on-release ping) reach
        // the proxy before reading the counters.
        tokio::time::sleep(settle).await;
        traffic = Some(proxy.snapshot().since(&before));
    }
    let (item, token, _) =
        got.ok_or_else(|| format!("expected to fetch {instance}, got nothing"))?;
    if item.instance != instance {
        return Err(format!("expected to fetch {instance}, got {}", item.instance).into());
    }
    if item.history.len() != *len {
        return Err(format!(
            "fetched history has {} events, expected {len}",
            item.history.len()
        )
        .into());
    }
    let id = *len as u64 + 1;
    let delta = vec![
        Event::with_event_id(
            id,
            instance,
            1,
            None,
            EventKind::ActivityScheduled {
                name: "Work".to_string(),
                input: payload.to_string(),
                session_id: None,
                tag: None,
            },
        ),
        Event::with_event_id(
            id + 1,
            instance,
            1,
            Some(id),
            EventKind::ActivityCompleted {
                result: payload.to_string(),
            },
        ),
    ];
    p.ack_orchestration_item(
        &token,
        1,
        delta,
        vec![],
        vec![poke(instance)],
        metadata(),
        vec![],
    )
    .await?;
    *len += 2;
    Ok((elapsed, traffic))
}

/// Returns (per-run median fetch ms, bytes server→client, round trips, statements), all
/// of turns after the first (the first turn of a process reads the whole history).
async fn history_one(
    session: &Session,
    events: usize,
    payload: &str,
    calls: usize,
    runs: usize,
) -> Result<HistoryCosts, BoxError> {
    let direct = session.direct.as_provider();
    let proxied = session.provider.as_provider();
    let instance = format!("hist-{events}");
    create_instance(direct.as_ref(), &instance, events, payload).await?;
    direct
        .enqueue_for_orchestrator(poke(&instance), None)
        .await?;
    let mut len = events;

    // Timing: over the direct connection at RTT 0, through the proxy otherwise.
    let timed = if session.rtt_ms == 0 {
        direct.clone()
    } else {
        proxied.clone()
    };
    let mut per_run = Vec::with_capacity(runs);
    for run in 0..runs {
        let warmup = if run == 0 { HISTORY_WARMUP } else { 1 };
        for _ in 0..warmup {
            history_turn(timed.as_ref(), &instance, &mut len, payload, None).await?;
        }
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let (d, _) = history_turn(timed.as_ref(), &instance, &mut len, payload, None).await?;
            times.push(ms(d));
        }
        per_run.push(median(&times));
    }

    // Bytes, round trips and statements of warm turns through the proxy (medians; the
    // warm-up lets the pool open the connections the path needs, cache its statements,
    // and gives the proxied provider its own first turn).
    let proxy = session.proxy.as_ref().ok_or("history needs the proxy")?;
    for _ in 0..HISTORY_WARMUP {
        history_turn(proxied.as_ref(), &instance, &mut len, payload, None).await?;
    }
    let settle = Duration::from_millis(5 + session.rtt_ms);
    let (mut bytes, mut rts, mut stmts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..calls {
        let (_, d) = history_turn(
            proxied.as_ref(),
            &instance,
            &mut len,
            payload,
            Some((proxy, settle)),
        )
        .await?;
        let d = d.ok_or("turn not measured")?;
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!("    debug: {d:?}");
        }
        bytes.push(d.bytes_s2c as f64);
        rts.push(d.bursts as f64);
        stmts.push(d.statements as f64);
    }

    // duroxide's `read(instance)` after a turn (its worker makes it before every
    // activity, its client on every status poll): time and bytes, through the proxy.
    let (mut read_ms, mut read_bytes) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let before = proxy.snapshot();
        let t = Instant::now();
        let history = proxied.read(&instance).await?;
        read_ms.push(ms(t.elapsed()));
        tokio::time::sleep(settle).await;
        read_bytes.push(proxy.snapshot().since(&before).bytes_s2c as f64);
        if history.len() != len {
            return Err(format!("read {} events, expected {len}", history.len()).into());
        }
    }
    Ok(HistoryCosts {
        fetch_runs: per_run,
        bytes: median(&bytes),
        round_trips: median(&rts),
        statements: median(&stmts),
        read_ms,
        read_bytes: median(&read_bytes),
    })
}

/// What `history_one` measured.
struct HistoryCosts {
    /// Median fetch time per run.
    fetch_runs: Vec<f64>,
    bytes: f64,
    round_trips: f64,
    statements: f64,
    /// `read(instance)` times, one per call.
    read_ms: Vec<f64>,
    read_bytes: f64,
}

// ---------------------------------------------------------------------------------------
// backlog

pub async fn backlog(env: &Env, opts: &Opts) -> Result<Vec<Record>, BoxError> {
    let n = opts
        .backlog
        .unwrap_or(if opts.quick { 20_000 } else { 100_000 });
    let rtts = opts.rtts(&[0]);
    let calls = if opts.quick { 5 } else { 10 };
    let mut out = Vec::new();
    for &rtt in &rtts {
        for &kind in &opts.providers {
            let case = format!("{n} future work items");
            let session = env.session("bl_w", kind, rtt, false, false).await?;
            let r = backlog_worker(env, &session, n, calls, opts.runs).await;
            session.teardown(env).await;
            let (empty, one) = r?;
            eprintln!(
                "  backlog {case} rtt={rtt}ms {kind}: empty poll {:.2} ms, fetch one {:.2} ms",
                median(&empty),
                median(&one)
            );
            let extra = json!({"backlog": n, "calls_per_run": calls, "warmup_calls": WARMUP_CALLS});
            out.push(
                Record::new(
                    "backlog",
                    kind.name(),
                    &case,
                    rtt,
                    "worker_empty_fetch_ms",
                    "ms",
                    empty,
                )
                .with_extra(extra),
            );
            out.push(Record::new(
                "backlog",
                kind.name(),
                &case,
                rtt,
                "worker_fetch_ms",
                "ms",
                one,
            ));

            let case = format!("1 locked instance with {n} messages");
            let session = env.session("bl_o", kind, rtt, false, false).await?;
            let r = backlog_orchestrator(env, &session, n, calls, opts.runs).await;
            session.teardown(env).await;
            let (hot_ms, hot_msgs, empty, other) = r?;
            eprintln!(
                "  backlog {case} rtt={rtt}ms {kind}: hot fetch {hot_ms:.0} ms ({hot_msgs} msgs), empty poll {:.2} ms, fetch other {:.2} ms",
                median(&empty),
                median(&other)
            );
            let extra = json!({"backlog": n, "calls_per_run": calls, "hot_instance_messages_returned": hot_msgs});
            out.push(
                Record::new(
                    "backlog",
                    kind.name(),
                    &case,
                    rtt,
                    "orch_empty_fetch_ms",
                    "ms",
                    empty,
                )
                .with_extra(extra),
            );
            out.push(Record::new(
                "backlog",
                kind.name(),
                &case,
                rtt,
                "orch_fetch_other_ms",
                "ms",
                other,
            ));
            out.push(Record::new(
                "backlog",
                kind.name(),
                &case,
                rtt,
                "hot_instance_fetch_ms",
                "ms",
                vec![hot_ms],
            ));

            // Work nobody can run now must not slow the claim of work that can run.
            for (label, blockers) in [
                (
                    format!("{} orphan events", opts.orphans()),
                    Blockers::Orphans(opts.orphans()),
                ),
                (
                    format!("{} incompatible instances", opts.incompatible()),
                    Blockers::Incompatible(opts.incompatible()),
                ),
            ] {
                let session = env.session("bl_b", kind, rtt, false, false).await?;
                let r = backlog_blocked(&session, &blockers, calls, opts.runs).await;
                session.teardown(env).await;
                let (empty, other) = r?;
                eprintln!(
                    "  backlog {label} rtt={rtt}ms {kind}: empty poll {:.2} ms, fetch other {:.2} ms",
                    median(&empty),
                    median(&other)
                );
                out.push(Record::new(
                    "backlog",
                    kind.name(),
                    &label,
                    rtt,
                    "orch_empty_fetch_ms",
                    "ms",
                    empty,
                ));
                out.push(Record::new(
                    "backlog",
                    kind.name(),
                    &label,
                    rtt,
                    "orch_fetch_other_ms",
                    "ms",
                    other,
                ));
            }

            // Write side: 8 tasks raising events for one instance at once.
            let case = "8 writers raise events for 1 instance".to_string();
            let session = env.session("bl_f", kind, rtt, false, false).await?;
            let r = fan_in(&session, opts.runs).await;
            session.teardown(env).await;
            let per_event = r?;
            eprintln!(
                "  backlog {case} rtt={rtt}ms {kind}: {:.3} ms per raise_event",
                median(&per_event)
            );
            out.push(Record::new(
                "backlog",
                kind.name(),
                &case,
                rtt,
                "raise_event_ms",
                "ms",
                per_event,
            ));
        }
    }
    Ok(out)
}

/// Work queued that a default runtime cannot run.
enum Blockers {
    /// Events for instances that do not exist.
    Orphans(usize),
    /// Instances pinned to a duroxide version outside the default range, each with a
    /// visible event.
    Incompatible(usize),
}

/// `items`, enqueued with 8 calls in flight.
async fn enqueue_concurrently(p: &Arc<dyn Provider>, items: Vec<WorkItem>) -> Result<(), BoxError> {
    let results: Vec<Result<(), duroxide::providers::ProviderError>> = futures::stream::iter(items)
        .map(|item| {
            let p = p.clone();
            async move { p.enqueue_for_orchestrator(item, None).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Returns per-run medians of (empty poll, fetch of another instance), both with the
/// default capability filter, next to `blockers`.
async fn backlog_blocked(
    session: &Session,
    blockers: &Blockers,
    calls: usize,
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>), BoxError> {
    let p = session.dyn_provider();
    let t = Instant::now();
    match blockers {
        Blockers::Orphans(n) => {
            let items = (0..*n).map(|i| poke(&format!("ghost-{i}"))).collect();
            enqueue_concurrently(&p, items).await?;
        }
        Blockers::Incompatible(n) => {
            for i in 0..*n {
                create_pinned_instance(p.as_ref(), &format!("pinned-{i}")).await?;
            }
            let items = (0..*n).map(|i| poke(&format!("pinned-{i}"))).collect();
            enqueue_concurrently(&p, items).await?;
        }
    }
    eprintln!(
        "    seeded the blockers in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let filter = DispatcherCapabilityFilter::default_for_current_build();

    let mut empty_runs = Vec::new();
    let mut other_runs = Vec::new();
    let mut next = 0usize;
    for run in 0..runs {
        let warmup = if run == 0 { WARMUP_CALLS } else { 1 };
        let empty = time_calls(warmup, calls, || {
            let (p, filter) = (p.clone(), filter.clone());
            async move {
                let t = Instant::now();
                let got = p
                    .fetch_orchestration_item(LOCK, Duration::ZERO, Some(&filter))
                    .await?;
                let d = t.elapsed();
                // A provider may hand a blocker out as a turn (the incumbent claims events
                // for instances that do not exist; its runtime then acks them away): the
                // poll counts, and the blocker is put back a day out.
                if let Some((item, token, _)) = got {
                    if item.instance.starts_with("other-") {
                        return Err(format!(
                            "fetched {} although nothing is runnable",
                            item.instance
                        )
                        .into());
                    }
                    p.abandon_orchestration_item(&token, Some(Duration::from_secs(86_400)), true)
                        .await?;
                }
                Ok(d)
            }
        })
        .await?;
        let mut other = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            let id = format!("other-{next}");
            next += 1;
            p.enqueue_for_orchestrator(start_item(&id), None).await?;
            // Time until the new instance is claimed; blockers handed out on the way are
            // put back a day out (their claims count in the time).
            let t = Instant::now();
            let (token, d) = loop {
                let got = p
                    .fetch_orchestration_item(LOCK, Duration::ZERO, Some(&filter))
                    .await?;
                let (item, token, _) = got.ok_or_else(|| format!("{id} was not fetched"))?;
                if item.instance == id {
                    break (token, t.elapsed());
                }
                p.abandon_orchestration_item(&token, Some(Duration::from_secs(86_400)), true)
                    .await?;
            };
            // Completed, so the next iteration finds only the blockers and its own start.
            p.ack_orchestration_item(
                &token,
                1,
                vec![started_event(&id)],
                vec![],
                vec![],
                ExecutionMetadata {
                    status: Some("Completed".to_string()),
                    output: Some(String::new()),
                    ..metadata()
                },
                vec![],
            )
            .await?;
            if i >= warmup {
                other.push(ms(d));
            }
        }
        empty_runs.push(median(&empty));
        other_runs.push(median(&other));
    }
    Ok((empty_runs, other_runs))
}

/// Creates `instance` pinned to duroxide 99.0.0 (outside every real runtime's range).
async fn create_pinned_instance(p: &dyn Provider, instance: &str) -> Result<(), BoxError> {
    p.enqueue_for_orchestrator(start_item(instance), None)
        .await?;
    let (_, token, _) = p
        .fetch_orchestration_item(LOCK, Duration::ZERO, None)
        .await?
        .ok_or_else(|| format!("could not fetch new instance {instance}"))?;
    let meta = ExecutionMetadata {
        pinned_duroxide_version: Some(semver::Version::new(99, 0, 0)),
        ..metadata()
    };
    p.ack_orchestration_item(
        &token,
        1,
        vec![started_event(instance)],
        vec![],
        vec![],
        meta,
        vec![],
    )
    .await?;
    Ok(())
}

/// Per run: mean ms per `raise_event`-equivalent enqueue while 8 tasks send 200 events
/// each to one existing instance.
async fn fan_in(session: &Session, runs: usize) -> Result<Vec<f64>, BoxError> {
    const TASKS: usize = 8;
    const PER_TASK: usize = 200;
    let p = session.dyn_provider();
    create_instance(p.as_ref(), "target", 1, "").await?;
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    for _ in 0..PER_TASK {
                        p.enqueue_for_orchestrator(poke("target"), None).await?;
                    }
                    Ok::<(), duroxide::providers::ProviderError>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        // Wall time per event of one writer (each writer's events are sequential).
        out.push(ms(t.elapsed()) / PER_TASK as f64);
        // Drain the events so every run starts from the same queue.
        while let Some((_, token, _)) = p
            .fetch_orchestration_item(LOCK, Duration::ZERO, None)
            .await?
        {
            p.ack_orchestration_item(&token, 1, vec![], vec![], vec![], metadata(), vec![])
                .await?;
        }
    }
    Ok(out)
}

/// Returns per-run medians of (empty poll, fetch of the one visible item).
async fn backlog_worker(
    env: &Env,
    session: &Session,
    n: usize,
    calls: usize,
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>), BoxError> {
    let p = session.dyn_provider();
    let filter = TagFilter::DefaultOnly;
    // Template: an activity abandoned with a one-day delay (future-visible, unlocked).
    p.enqueue_for_worker(activity("backlog", 1)).await?;
    let (_, token, _) = p
        .fetch_work_item(LOCK, Duration::ZERO, None, &filter)
        .await?
        .ok_or("could not fetch the template work item")?;
    p.abandon_work_item(&token, Some(Duration::from_secs(86_400)), false)
        .await?;
    let t = Instant::now();
    multiply_row(env, &session.schema, "worker_queue", n - 1).await?;
    eprintln!(
        "    seeded {n} future work items in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut empty_runs = Vec::new();
    let mut one_runs = Vec::new();
    let mut next_id = 2u64;
    for run in 0..runs {
        let warmup = if run == 0 { WARMUP_CALLS } else { 1 };
        let empty = time_calls(warmup, calls, || {
            let p = p.clone();
            let filter = filter.clone();
            async move {
                let t = Instant::now();
                let got = p
                    .fetch_work_item(LOCK, Duration::ZERO, None, &filter)
                    .await?;
                let d = t.elapsed();
                if got.is_some() {
                    return Err("fetched a work item that should not be visible".into());
                }
                Ok(d)
            }
        })
        .await?;
        let mut one = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            p.enqueue_for_worker(activity("visible", next_id)).await?;
            next_id += 1;
            let t = Instant::now();
            let got = p
                .fetch_work_item(LOCK, Duration::ZERO, None, &filter)
                .await?;
            let d = t.elapsed();
            let (_, token, _) = got.ok_or("the visible work item was not fetched")?;
            p.ack_work_item(&token, None).await?;
            if i >= warmup {
                one.push(ms(d));
            }
        }
        empty_runs.push(median(&empty));
        one_runs.push(median(&one));
    }
    Ok((empty_runs, one_runs))
}

/// Returns (hot-instance fetch ms, messages it returned, per-run medians of empty poll,
/// per-run medians of fetching another instance).
async fn backlog_orchestrator(
    env: &Env,
    session: &Session,
    n: usize,
    calls: usize,
    runs: usize,
) -> Result<(f64, usize, Vec<f64>, Vec<f64>), BoxError> {
    let p = session.dyn_provider();
    create_instance(p.as_ref(), "hot", 1, "").await?;
    p.enqueue_for_orchestrator(poke("hot"), None).await?;
    let t = Instant::now();
    multiply_row(env, &session.schema, "orchestrator_queue", n - 1).await?;
    eprintln!(
        "    seeded {n} messages for one instance in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Lock the hot instance for the rest of the run.
    let t = Instant::now();
    let (item, _hot_token, _) = p
        .fetch_orchestration_item(Duration::from_secs(3600), Duration::ZERO, None)
        .await?
        .ok_or("could not fetch the hot instance")?;
    let hot_ms = ms(t.elapsed());
    if item.instance != "hot" {
        return Err(format!("expected the hot instance, fetched {}", item.instance).into());
    }
    let hot_msgs = item.messages.len();
    drop(item);

    let mut empty_runs = Vec::new();
    for run in 0..runs {
        let warmup = if run == 0 { WARMUP_CALLS } else { 1 };
        let empty = time_calls(warmup, calls, || {
            let p = p.clone();
            async move {
                let t = Instant::now();
                let got = p
                    .fetch_orchestration_item(LOCK, Duration::ZERO, None)
                    .await?;
                let d = t.elapsed();
                if let Some((item, token, _)) = got {
                    p.abandon_orchestration_item(&token, None, true).await?;
                    return Err(format!(
                        "fetched {} while only a locked instance had work",
                        item.instance
                    )
                    .into());
                }
                Ok(d)
            }
        })
        .await?;
        empty_runs.push(median(&empty));
    }

    p.enqueue_for_orchestrator(start_item("other"), None)
        .await?;
    let mut other_runs = Vec::new();
    for run in 0..runs {
        let warmup = if run == 0 { WARMUP_CALLS } else { 1 };
        let other = time_calls(warmup, calls, || {
            let p = p.clone();
            async move { Ok(fetch_orch_expect(p.as_ref(), "other").await?.0) }
        })
        .await?;
        other_runs.push(median(&other));
    }
    Ok((hot_ms, hot_msgs, empty_runs, other_runs))
}
