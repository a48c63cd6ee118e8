//! Turning records into a readable table, a markdown snippet and charts.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::charts::{self, Bars};
use crate::results::{Line, Meta, Record};

pub const SCENARIOS: [&str; 6] = [
    "throughput",
    "provider-throughput",
    "latency",
    "history",
    "backlog",
    "idle",
];

/// Human description of a metric: (label, "higher"/"lower" is better).
fn describe(metric: &str) -> (&'static str, &'static str) {
    match metric {
        "orch_per_s" => ("orchestrations/s", "higher"),
        "failed_orchestrations" => ("failed orchestrations per run", "lower"),
        "activities_per_s" => ("activities/s", "higher"),
        "round_trips_per_orch" => (
            "client→server request bursts per orchestration (≈ round trips; all traffic during it, incl. idle polls)",
            "lower",
        ),
        "statements_per_orch" => ("statements per orchestration (all traffic)", "lower"),
        "provider_calls_per_orch" => ("provider calls per orchestration", "lower"),
        "server_exec_ms_per_orch" => (
            "server execution time per orchestration (ms, pg_stat_statements)",
            "lower",
        ),
        "server_statements_per_orch" => (
            "server statements per orchestration (pg_stat_statements, top level)",
            "lower",
        ),
        "completed_p50_ms" => ("p50 start → OrchestrationCompleted event (ms)", "lower"),
        "completed_p95_ms" => ("p95 start → OrchestrationCompleted event (ms)", "lower"),
        "observed_p50_ms" => ("p50 start → wait_for_orchestration returned (ms)", "lower"),
        "observed_p95_ms" => ("p95 start → wait_for_orchestration returned (ms)", "lower"),
        "fetch_ms" => ("fetch_orchestration_item time (ms)", "lower"),
        "fetch_bytes_from_server" => ("bytes server→client per fetch", "lower"),
        "fetch_round_trips" => (
            "client→server request bursts per fetch (≈ round trips, summed over connections)",
            "lower",
        ),
        "fetch_statements" => ("statements per fetch", "lower"),
        "read_ms" => ("client `read(instance)` of the same history (ms)", "lower"),
        "read_bytes_from_server" => ("bytes server→client per `read(instance)`", "lower"),
        "worker_empty_fetch_ms" => ("fetch_work_item, nothing visible (ms)", "lower"),
        "worker_fetch_ms" => ("fetch_work_item, one visible item (ms)", "lower"),
        "orch_empty_fetch_ms" => (
            "fetch_orchestration_item, nothing else runnable (ms)",
            "lower",
        ),
        "orch_fetch_other_ms" => ("fetch_orchestration_item of another instance (ms)", "lower"),
        "hot_instance_fetch_ms" => ("fetch of the hot instance itself, once (ms)", "lower"),
        "raise_event_ms" => (
            "client `raise_event` under concurrent writers (ms per event)",
            "lower",
        ),
        "statements_per_s" => ("statements/s while idle", "lower"),
        "round_trips_per_s" => ("client→server request bursts/s while idle", "lower"),
        "bytes_per_s" => ("bytes/s while idle (both directions)", "lower"),
        "server_calls_per_s" => ("pg_stat_statements calls/s (whole server)", "lower"),
        _ => ("", "lower"),
    }
}

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_string();
    }
    let a = v.abs();
    if a < 100.0 && v.fract() == 0.0 {
        return format!("{v:.0}");
    }
    if a >= 100.0 {
        let s = format!("{v:.0}");
        // thousands separators
        let (sign, digits) = if let Some(d) = s.strip_prefix('-') {
            ("-", d)
        } else {
            ("", s.as_str())
        };
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(r: &Record) -> String {
    if r.runs.len() > 1 && r.min != r.max {
        format!(
            "{} ({}–{})",
            fmt_num(r.median),
            fmt_num(r.min),
            fmt_num(r.max)
        )
    } else {
        fmt_num(r.median)
    }
}

/// Reads every `*.jsonl` results file of `dir`.
pub fn load(dir: &Path) -> Result<(Vec<Meta>, Vec<Record>), Box<dyn std::error::Error>> {
    let mut metas = Vec::new();
    let mut records = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort_by_key(|p| {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        SCENARIOS
            .iter()
            .position(|s| *s == stem)
            .unwrap_or(SCENARIOS.len())
    });
    for f in files {
        for line in std::fs::read_to_string(&f)?
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            match serde_json::from_str::<Line>(line)? {
                Line::Meta(m) => metas.push(m),
                Line::Result(r) => records.push(r),
            }
        }
    }
    Ok((metas, records))
}

fn provider_order(records: &[&Record]) -> Vec<String> {
    let order = ["hybrid", "procedure", "incumbent"];
    let mut ps: Vec<String> = records.iter().map(|r| r.provider.clone()).collect();
    ps.sort_by_key(|p| order.iter().position(|o| o == p).unwrap_or(order.len()));
    ps.dedup();
    ps
}

/// One table: a metric, its rows as (case, RTT), and the records.
struct Table<'a> {
    metric: String,
    rows: Vec<(String, u64)>,
    recs: Vec<&'a Record>,
    /// The scenario ran at more than one RTT (rows are labelled with it).
    multi_rtt: bool,
}

impl<'a> Table<'a> {
    fn get(&self, provider: &str, row: &(String, u64)) -> Option<&'a Record> {
        self.recs
            .iter()
            .copied()
            .find(|r| r.provider == provider && r.case == row.0 && r.rtt_ms == row.1)
    }

    fn label(&self, row: &(String, u64)) -> String {
        if self.multi_rtt {
            format!("{}, RTT {} ms", row.0, row.1)
        } else {
            row.0.clone()
        }
    }

    fn rtt_note(&self) -> String {
        if self.multi_rtt {
            String::new()
        } else {
            format!(" — RTT {} ms", self.recs[0].rtt_ms)
        }
    }
}

/// A scenario's records as one table per metric (in first-seen order), rows by
/// (case, RTT) sorted by RTT then first-seen case order.
fn tables<'a>(records: &'a [Record], scenario: &str) -> Vec<Table<'a>> {
    let recs: Vec<&Record> = records.iter().filter(|r| r.scenario == scenario).collect();
    let mut rtts: Vec<u64> = recs.iter().map(|r| r.rtt_ms).collect();
    rtts.sort_unstable();
    rtts.dedup();
    let multi_rtt = rtts.len() > 1;
    let mut cases: Vec<&str> = Vec::new();
    for r in &recs {
        if !cases.contains(&r.case.as_str()) {
            cases.push(&r.case);
        }
    }
    let mut out: Vec<Table<'a>> = Vec::new();
    for r in recs {
        let i = match out.iter().position(|t| t.metric == r.metric) {
            Some(i) => i,
            None => {
                out.push(Table {
                    metric: r.metric.clone(),
                    rows: Vec::new(),
                    recs: Vec::new(),
                    multi_rtt,
                });
                out.len() - 1
            }
        };
        let t = &mut out[i];
        let row = (r.case.clone(), r.rtt_ms);
        if !t.rows.contains(&row) {
            t.rows.push(row);
        }
        t.recs.push(r);
    }
    for t in &mut out {
        t.rows
            .sort_by_key(|(c, rtt)| (*rtt, cases.iter().position(|x| x == c)));
    }
    out
}

fn ratio(a: Option<&Record>, inc: Option<&Record>) -> String {
    match (a, inc) {
        (Some(a), Some(b)) if b.median != 0.0 && a.median.is_finite() && b.median.is_finite() => {
            let r = a.median / b.median;
            if r >= 10.0 {
                format!("{r:.1}×")
            } else if r >= 0.1 || r == 0.0 {
                format!("{r:.2}×")
            } else {
                format!("{r:.3}×")
            }
        }
        _ => "–".into(),
    }
}

/// The readable console table.
pub fn text_table(records: &[Record]) -> String {
    let mut s = String::new();
    for scenario in SCENARIOS {
        let tables = tables(records, scenario);
        if tables.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n== {scenario} ==");
        for t in &tables {
            let providers = provider_order(&t.recs);
            let (label, better) = describe(&t.metric);
            let _ = writeln!(
                s,
                "\n{}{}  [{label}; {better} is better]",
                t.metric,
                t.rtt_note()
            );
            let mut header = format!("{:<40}", "case");
            for p in &providers {
                let _ = write!(header, "{p:>24}");
            }
            let has_inc = providers.iter().any(|p| p == "incumbent") && providers.len() > 1;
            let others: Vec<&String> = providers.iter().filter(|p| *p != "incumbent").collect();
            if has_inc {
                for p in &others {
                    let _ = write!(header, "{:>16}", format!("{p}/inc"));
                }
            }
            let _ = writeln!(s, "{header}");
            for row in &t.rows {
                let mut line = format!("{:<40}", t.label(row));
                for p in &providers {
                    let v = t.get(p, row).map(cell).unwrap_or_else(|| "–".into());
                    let _ = write!(line, "{v:>24}");
                }
                if has_inc {
                    for p in &others {
                        let _ = write!(
                            line,
                            "{:>16}",
                            ratio(t.get(p, row), t.get("incumbent", row))
                        );
                    }
                }
                let _ = writeln!(s, "{line}");
            }
        }
    }
    s
}

/// The distinct commits the runs were made at, in order.
fn commits(metas: &[Meta]) -> String {
    let mut out: Vec<String> = Vec::new();
    for m in metas {
        let c = m.git_commit.clone().unwrap_or_else(|| "?".into());
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out.join(", ")
}

fn scenario_title(s: &str) -> &'static str {
    match s {
        "throughput" => {
            "Throughput: duroxide stress harness, fan-out 5 × 10 ms activities, 20 in flight"
        }
        "provider-throughput" => {
            "Provider-bound throughput: stress harness, fan-out 5 × 0 ms activities, 100 in flight; per-orchestration provider and server cost"
        }
        "latency" => {
            "Latency: one orchestration of 5 sequential activities at a time, default RuntimeOptions"
        }
        "history" => "History: fetch_orchestration_item cost vs history size (~450-byte events)",
        "backlog" => "Backlog: fetch cost next to large queues",
        "idle" => "Idle: what an idle runtime (2 orchestration + 2 worker dispatchers) sends",
        _ => "",
    }
}

/// Relative path from directory `from` to `to` (both made absolute first).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let abs = |p: &Path| {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                c => out.push(c),
            }
        }
        out
    };
    let (from, to) = (abs(from), abs(to));
    let fc: Vec<_> = from.components().collect();
    let tc: Vec<_> = to.components().collect();
    let common = fc.iter().zip(&tc).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..fc.len() {
        out.push("..");
    }
    for c in &tc[common..] {
        out.push(c);
    }
    out
}

/// The markdown snippet; `img_prefix` is prepended to chart file names.
pub fn markdown(
    metas: &[Meta],
    records: &[Record],
    charts: &[(String, String)],
    img_prefix: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!-- generated by duroxide-pg-hybrid-bench (`report`); edit the bench, not this text -->"
    );
    if let Some(m) = metas.first() {
        let _ = writeln!(s, "\n#### Machine and server\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| CPU | {} ({} cores) |", m.cpu_model, m.cores);
        let _ = writeln!(s, "| Memory | {} GiB |", m.memory_gib);
        let _ = writeln!(s, "| Kernel | {} |", m.kernel);
        let _ = writeln!(s, "| PostgreSQL | {} |", m.postgres_version);
        let settings = m
            .postgres_settings
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(s, "| Server settings | {settings} |");
        let _ = writeln!(
            s,
            "| Connection | `{}` (RTT 0: direct; RTT > 0: through the bench's delay proxy) |",
            m.database_url
        );
        let _ = writeln!(
            s,
            "| pg_stat_statements | {} |",
            if m.pg_stat_statements {
                "available"
            } else {
                "not loaded (statements counted by the proxy)"
            }
        );
        let _ = writeln!(
            s,
            "| Code | duroxide {}, duroxide-pg-hybrid {}{}; incumbent: {} |",
            m.duroxide_version,
            commits(metas),
            if metas.iter().any(|m| m.git_dirty == Some(true)) {
                " (working tree with uncommitted changes)"
            } else {
                ""
            },
            m.incumbent_crate
                .clone()
                .unwrap_or_else(|| "not compiled in".into())
        );
        let mut runs: Vec<String> = metas
            .iter()
            .map(|m| {
                format!(
                    "`{}` {} {}",
                    m.scenario,
                    m.started_at,
                    if m.quick { "(quick)" } else { "" }
                )
            })
            .collect();
        runs.dedup();
        let _ = writeln!(s, "| Runs | {} |", runs.join("; "));
    }
    for scenario in SCENARIOS {
        let tables = tables(records, scenario);
        if tables.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n#### {}\n", scenario_title(scenario));
        if let Some(extra) = records
            .iter()
            .find(|r| r.scenario == scenario && !r.extra.is_null())
            .map(|r| &r.extra)
        {
            let _ = writeln!(s, "Parameters: `{extra}`\n");
        }
        for t in &tables {
            let providers = provider_order(&t.recs);
            let (label, better) = describe(&t.metric);
            let _ = writeln!(s, "**{label}**{}, {better} is better\n", t.rtt_note());
            let has_inc = providers.iter().any(|p| p == "incumbent") && providers.len() > 1;
            let others: Vec<&String> = providers.iter().filter(|p| *p != "incumbent").collect();
            let mut header = "| case |".to_string();
            let mut sep = "|---|".to_string();
            for p in &providers {
                let _ = write!(header, " {p} |");
                sep.push_str("---:|");
            }
            if has_inc {
                for p in &others {
                    let _ = write!(header, " {p} ÷ incumbent |");
                    sep.push_str("---:|");
                }
            }
            let _ = writeln!(s, "{header}\n{sep}");
            for row in &t.rows {
                let mut line = format!("| {} |", t.label(row));
                for p in &providers {
                    let v = t.get(p, row).map(cell).unwrap_or_else(|| "–".into());
                    let _ = write!(line, " {v} |");
                }
                if has_inc {
                    for p in &others {
                        let _ =
                            write!(line, " {} |", ratio(t.get(p, row), t.get("incumbent", row)));
                    }
                }
                let _ = writeln!(s, "{line}");
            }
            let _ = writeln!(s);
        }
        for (file, alt) in charts.iter().filter(|(f, _)| f.starts_with(scenario)) {
            let _ = writeln!(s, "![{alt}]({img_prefix}{file})\n");
        }
    }
    let _ = writeln!(
        s,
        "Cells: median of the runs (min–max). Ratios: median ÷ incumbent median."
    );
    s
}

/// What [`write_report`] produced and read.
pub struct Report {
    /// (file name, alt text) of each chart written.
    pub charts: Vec<(String, String)>,
    pub metas: Vec<Meta>,
    pub records: Vec<Record>,
}

/// Writes charts and `summary.md` into `dir` from the `.jsonl` files there.
pub fn write_report(dir: &Path) -> Result<Report, Box<dyn std::error::Error>> {
    let (metas, records) = load(dir)?;
    let mut made = Vec::new();
    let specs: [(&str, &str); 2] = [
        (
            "latency_vs_rtt.svg",
            "Latency vs round-trip time (p50 solid with min–max, p95 dashed)",
        ),
        (
            "latency_observed_vs_rtt.svg",
            "Client-observed latency vs round-trip time",
        ),
    ];
    if charts::latency_vs_rtt(
        &records,
        &dir.join(specs[0].0),
        "completed",
        "Chain of 5 activities: start → completed vs RTT",
    )? {
        made.push((specs[0].0.to_string(), specs[0].1.to_string()));
    }
    if charts::latency_vs_rtt(
        &records,
        &dir.join(specs[1].0),
        "observed",
        "Chain of 5 activities: start → wait_for_orchestration returned",
    )? {
        made.push((specs[1].0.to_string(), specs[1].1.to_string()));
    }
    let mut rtts: Vec<u64> = records
        .iter()
        .filter(|r| r.scenario == "throughput")
        .map(|r| r.rtt_ms)
        .collect();
    rtts.sort_unstable();
    rtts.dedup();
    for rtt in rtts {
        let file = if rtt == 0 {
            "throughput.svg".to_string()
        } else {
            format!("throughput_rtt{rtt}.svg")
        };
        let title = format!(
            "Fan-out stress harness, orchestrations/s per dispatcher config (RTT {rtt} ms)"
        );
        if charts::grouped_bars(
            &records,
            &dir.join(&file),
            &Bars {
                scenario: "throughput",
                metric: "orch_per_s",
                rtt,
                title: &title,
                x_desc: "orchestration:worker dispatchers",
                y_desc: "orchestrations/s",
                log: false,
            },
        )? {
            made.push((file, "Throughput per dispatcher configuration".to_string()));
        }
    }
    if charts::grouped_bars(
        &records,
        &dir.join("history.svg"),
        &Bars {
            scenario: "history",
            metric: "fetch_ms",
            rtt: 0,
            title: "fetch_orchestration_item time vs history size (RTT 0)",
            x_desc: "history size",
            y_desc: "ms per fetch (log scale)",
            log: true,
        },
    )? {
        made.push((
            "history.svg".to_string(),
            "Fetch time vs history size".to_string(),
        ));
    }
    if charts::grouped_bars(
        &records,
        &dir.join("idle.svg"),
        &Bars {
            scenario: "idle",
            metric: "statements_per_s",
            rtt: 0,
            title: "Statements/s sent by an idle 2+2 runtime (RTT 0)",
            x_desc: "",
            y_desc: "statements/s",
            log: false,
        },
    )? {
        made.push((
            "idle.svg".to_string(),
            "Idle statements per second".to_string(),
        ));
    }
    let md = markdown(&metas, &records, &made, "");
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(Report {
        charts: made,
        metas,
        records,
    })
}

pub const DOC_BEGIN: &str = "<!-- bench:begin -->";
pub const DOC_END: &str = "<!-- bench:end -->";

/// Replaces the text between the bench markers of `doc` with the snippet (chart links
/// made relative to the document).
pub fn update_doc(
    doc: &Path,
    dir: &Path,
    metas: &[Meta],
    records: &[Record],
    charts: &[(String, String)],
) -> Result<(), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(doc)?;
    let (Some(b), Some(e)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        return Err(format!("{} has no {DOC_BEGIN} … {DOC_END} markers", doc.display()).into());
    };
    let doc_dir = doc
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut prefix = relative(doc_dir, dir).to_string_lossy().replace('\\', "/");
    if !prefix.is_empty() {
        prefix.push('/');
    }
    let md = markdown(metas, records, charts, &prefix);
    let new = format!("{}{DOC_BEGIN}\n{md}{}", &text[..b], &text[e..]);
    std::fs::write(doc, new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_paths() {
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(1.2345), "1.23");
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/b/c/d")),
            PathBuf::from("c/d")
        );
        assert_eq!(
            relative(Path::new("/a/x"), Path::new("/a/b")),
            PathBuf::from("../b")
        );
    }
}
