//! Text and JSON renderings of the library's schema and inspection results.

use std::fmt::Write as _;

use duroxide_pg_hybrid::inspect::{
    ExecutionDetail, InstanceDetail, InstanceSummary, QueueStats, QueuedMessage, WorkerItem,
};
use duroxide_pg_hybrid::schema::{self, MIGRATOR, SchemaStatus};
use serde_json::{Map, Value, json};

use crate::Output;

/// Longest value shown in a one-line summary before it is cut with `…`.
const MAX_VALUE_CHARS: usize = 60;
/// Longest whole summary.
const MAX_SUMMARY_CHARS: usize = 160;

pub(crate) fn migrate_status(schema_name: &str, st: &SchemaStatus) -> Output {
    let describe = |v: &i64| {
        MIGRATOR
            .iter()
            .find(|m| m.version == *v)
            .map(|m| m.description.to_string())
            .unwrap_or_else(|| "(unknown to this binary)".to_string())
    };
    let mut text = String::new();
    let found = st.applied.last().copied().unwrap_or(0);
    let _ = writeln!(
        text,
        "schema {schema_name:?}: at migration {found}, this binary expects {} ({})",
        schema::expected_version(),
        if st.is_current() {
            "current"
        } else {
            "NOT current"
        }
    );
    for (label, list) in [
        ("applied", &st.applied),
        ("pending", &st.pending),
        ("unknown", &st.unknown),
        ("checksum mismatch", &st.checksum_mismatch),
    ] {
        if list.is_empty() {
            let _ = writeln!(text, "{label}: none");
        } else {
            let _ = writeln!(text, "{label}:");
            for v in list {
                let _ = writeln!(text, "  {v} {}", describe(v));
            }
        }
    }
    for (label, list) in [
        ("function files pending", &st.functions_pending),
        ("function files newer in the schema", &st.functions_newer),
    ] {
        let _ = writeln!(
            text,
            "{label}: {}",
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        );
    }
    Output {
        text,
        json: json!({
            "schema": schema_name,
            "expected_version": schema::expected_version(),
            "functions_pending": st.functions_pending,
            "functions_newer": st.functions_newer,
            "version": found,
            "current": st.is_current(),
            "applied": st.applied,
            "pending": st.pending,
            "unknown": st.unknown,
            "checksum_mismatch": st.checksum_mismatch,
        }),
    }
}

pub(crate) fn stats(schema_name: &str, s: &QueueStats) -> Output {
    let age = |a: Option<i64>| a.map_or("-".to_string(), |ms| format!("{ms} ms"));
    let o = &s.orchestrator;
    let w = &s.worker;
    let i = &s.instances;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "schema {schema_name:?} at {} (database clock)",
        fmt_time(s.db_now_ms)
    );
    let _ = writeln!(
        text,
        "orchestrator queue: {} visible, {} delayed, {} locked; oldest visible {}",
        o.visible,
        o.delayed,
        o.locked,
        age(o.oldest_visible_age_ms)
    );
    if o.waiting_for_instance > 0 {
        let _ = writeln!(
            text,
            "                    {} of them wait for {} instances that do not exist (kept until started)",
            o.waiting_for_instance, o.orphan_instances
        );
    }
    let _ = writeln!(
        text,
        "worker queue:       {} ready, {} delayed, {} leased; oldest ready {}",
        w.ready,
        w.delayed,
        w.leased,
        age(w.oldest_ready_age_ms)
    );
    let _ = writeln!(
        text,
        "instances:          {} total: {} Running, {} Completed, {} Failed, {} ContinuedAsNew, {} other",
        i.total, i.running, i.completed, i.failed, i.continued_as_new, i.other
    );
    let _ = writeln!(
        text,
        "instance locks:     {} live, {} expired",
        s.instance_locks.live, s.instance_locks.expired
    );
    let _ = writeln!(text, "sessions:           {} live", s.sessions_live);
    Output {
        text,
        json: json!({
            "schema": schema_name,
            "db_now_ms": s.db_now_ms,
            "orchestrator_queue": {
                "visible": o.visible,
                "delayed": o.delayed,
                "locked": o.locked,
                "oldest_visible_age_ms": o.oldest_visible_age_ms,
                "waiting_for_instance": o.waiting_for_instance,
                "orphan_instances": o.orphan_instances,
            },
            "worker_queue": {
                "ready": w.ready,
                "delayed": w.delayed,
                "leased": w.leased,
                "oldest_ready_age_ms": w.oldest_ready_age_ms,
            },
            "instances": {
                "total": i.total,
                "running": i.running,
                "completed": i.completed,
                "failed": i.failed,
                "continued_as_new": i.continued_as_new,
                "other": i.other,
            },
            "instance_locks": { "live": s.instance_locks.live, "expired": s.instance_locks.expired },
            "sessions": { "live": s.sessions_live },
        }),
    }
}

fn summary_json(i: &InstanceSummary) -> Value {
    json!({
        "instance_id": i.instance_id,
        "orchestration_name": i.orchestration_name,
        "orchestration_version": i.orchestration_version,
        "current_execution_id": i.current_execution_id,
        "status": i.status,
        "created_at_ms": i.created_at_ms,
        "updated_at_ms": i.updated_at_ms,
        "parent_instance_id": i.parent_instance_id,
    })
}

pub(crate) fn instance_list(list: &[InstanceSummary]) -> Output {
    let header = [
        "INSTANCE",
        "STATUS",
        "EXEC",
        "ORCHESTRATION",
        "VERSION",
        "CREATED",
        "UPDATED",
        "PARENT",
    ];
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|i| {
            [
                i.instance_id.clone(),
                i.status.clone(),
                i.current_execution_id.to_string(),
                i.orchestration_name.clone(),
                i.orchestration_version
                    .clone()
                    .unwrap_or_else(|| "-".into()),
                fmt_time(i.created_at_ms),
                fmt_time(i.updated_at_ms),
                i.parent_instance_id.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (k, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if k + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        text.push_str(l.trim_end());
        text.push('\n');
    };
    line(&header);
    for r in &rows {
        line(&r.each_ref().map(String::as_str));
    }
    let _ = writeln!(
        text,
        "({} instance{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    Output {
        text,
        json: json!({ "instances": list.iter().map(summary_json).collect::<Vec<_>>() }),
    }
}

pub(crate) fn instance_detail(d: &InstanceDetail) -> Output {
    Output {
        text: detail_text(d),
        json: detail_json(d),
    }
}

fn detail_text(d: &InstanceDetail) -> String {
    let now = d.db_now_ms;
    let mut t = String::new();
    match &d.instance {
        Some(i) => {
            let _ = writeln!(
                t,
                "instance {}  {} {}  status {}  current execution {}",
                i.instance_id,
                i.orchestration_name,
                i.orchestration_version.as_deref().unwrap_or("-"),
                i.status,
                i.current_execution_id
            );
            let _ = writeln!(
                t,
                "  created {}  updated {}  parent {}",
                fmt_time(i.created_at_ms),
                fmt_time(i.updated_at_ms),
                i.parent_instance_id.as_deref().unwrap_or("-")
            );
            if let Some(cs) = &d.custom_status {
                let _ = writeln!(
                    t,
                    "  custom status (v{}): {}",
                    d.custom_status_version,
                    cut(cs, MAX_SUMMARY_CHARS)
                );
            }
        }
        None => {
            let _ = writeln!(
                t,
                "instance {}  (no instance row: not started yet, or started without metadata)",
                d.instance_id
            );
        }
    }

    for x in &d.executions {
        t.push('\n');
        execution_text(&mut t, x);
    }

    t.push('\n');
    if d.orchestrator_messages.is_empty() {
        let _ = writeln!(t, "orchestrator queue: empty");
    } else {
        let _ = writeln!(t, "orchestrator queue ({}):", d.orchestrator_messages.len());
        for m in &d.orchestrator_messages {
            let state = match &m.lock_token {
                Some(tok) => format!("locked by {tok}"),
                None => visibility(m.visible_at_ms, now),
            };
            let _ = writeln!(
                t,
                "  id {}  {}  {}  attempts {}  {}",
                m.id,
                m.kind,
                state,
                m.attempt_count,
                work_item_summary(&m.work_item, &["instance", "parent_instance"])
            );
        }
    }
    if d.worker_items.is_empty() {
        let _ = writeln!(t, "worker queue: empty");
    } else {
        let _ = writeln!(t, "worker queue ({}):", d.worker_items.len());
        for w in &d.worker_items {
            let state = match (&w.lock_token, w.locked_until_ms) {
                (Some(_), Some(until)) if w.leased => format!("leased for {} ms more", until - now),
                (Some(_), Some(until)) => format!("lease expired {} ms ago", now - until),
                _ => visibility(w.visible_at_ms, now),
            };
            let mut extra = String::new();
            if let Some(s) = &w.session_id {
                let _ = write!(extra, "  session {s}");
            }
            if let Some(tag) = &w.tag {
                let _ = write!(extra, "  tag {tag}");
            }
            let _ = writeln!(
                t,
                "  id {}  execution {} activity #{}  {}  attempts {}{}  {}",
                w.id,
                w.execution_id,
                w.activity_id,
                state,
                w.attempt_count,
                extra,
                work_item_summary(&w.work_item, &["instance", "execution_id", "id"])
            );
        }
    }
    match &d.lock {
        Some(l) if l.live => {
            let _ = writeln!(
                t,
                "instance lock: {} (live for {} ms more)",
                l.lock_token,
                l.locked_until_ms - now
            );
        }
        Some(l) => {
            let _ = writeln!(
                t,
                "instance lock: {} (expired {} ms ago)",
                l.lock_token,
                now - l.locked_until_ms
            );
        }
        None => {
            let _ = writeln!(t, "instance lock: none");
        }
    }
    if let Some(c) = &d.claim_state {
        let when = if !c.runnable {
            "waiting for the instance to start (claims do not look at it)".to_string()
        } else if c.claimable_at_ms > now {
            format!("claimable in {} ms", c.claimable_at_ms - now)
        } else {
            "claimable now".to_string()
        };
        let _ = writeln!(
            t,
            "claim state: {when}{}",
            c.pinned_version
                .as_deref()
                .map_or(String::new(), |v| format!(", pinned to {v}"))
        );
    }
    t
}

fn execution_text(t: &mut String, x: &ExecutionDetail) {
    let _ = writeln!(
        t,
        "execution {}  {}  started {}  completed {}  {} event{}",
        x.execution_id,
        x.status.as_deref().unwrap_or("(no execution row)"),
        x.started_at_ms.map_or("-".to_string(), fmt_time),
        x.completed_at_ms.map_or("-".to_string(), fmt_time),
        x.event_count,
        if x.event_count == 1 { "" } else { "s" }
    );
    let base = x.history.first().map(|h| h.created_at_ms).unwrap_or(0);
    let id_w = x
        .history
        .iter()
        .map(|h| h.event_id.to_string().len() + 1)
        .max()
        .unwrap_or(2);
    let deltas: Vec<String> = x
        .history
        .iter()
        .map(|h| format!("+{}ms", h.created_at_ms - base))
        .collect();
    let d_w = deltas.iter().map(String::len).max().unwrap_or(0);
    let ty_w = x
        .history
        .iter()
        .map(|h| h.event_type.len())
        .max()
        .unwrap_or(0);
    for (h, delta) in x.history.iter().zip(&deltas) {
        let id = format!("#{}", h.event_id);
        let line = format!(
            "  {id:<id_w$}  {delta:>d_w$}  {:<ty_w$}  {}",
            h.event_type,
            event_summary(&h.event_data)
        );
        t.push_str(line.trim_end());
        t.push('\n');
    }
    if let Some(out) = &x.output {
        let _ = writeln!(t, "  output: {}", cut(out, MAX_SUMMARY_CHARS));
    }
}

fn visibility(visible_at_ms: i64, now: i64) -> String {
    if visible_at_ms > now {
        format!("visible in {} ms", visible_at_ms - now)
    } else {
        "visible".to_string()
    }
}

/// Event fields already shown elsewhere on the line (or identical on every event).
const EVENT_SKIP: [&str; 7] = [
    "event_id",
    "source_event_id",
    "instance_id",
    "execution_id",
    "timestamp_ms",
    "duroxide_version",
    "type",
];

/// `src=#N k=v ...` of a stored event's JSON, undecodable rows shown as such.
pub(crate) fn event_summary(event_data: &str) -> String {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(event_data) else {
        return format!("(undecodable: {})", cut(event_data, MAX_VALUE_CHARS));
    };
    let mut parts = Vec::new();
    if let Some(src) = map.get("source_event_id").and_then(Value::as_u64) {
        parts.push(format!("src=#{src}"));
    }
    parts.extend(fields(&map, &EVENT_SKIP));
    cut(&parts.join(" "), MAX_SUMMARY_CHARS)
}

/// `k=v ...` of a stored work item (`{"Variant": {...}}`), without the `skip` fields.
pub(crate) fn work_item_summary(work_item: &str, skip: &[&str]) -> String {
    match serde_json::from_str::<Value>(work_item) {
        Ok(Value::Object(outer)) if outer.len() == 1 => match outer.values().next() {
            Some(Value::Object(inner)) => cut(&fields(inner, skip).join(" "), MAX_SUMMARY_CHARS),
            Some(other) => cut(&other.to_string(), MAX_SUMMARY_CHARS),
            None => String::new(),
        },
        _ => format!("(undecodable: {})", cut(work_item, MAX_VALUE_CHARS)),
    }
}

/// `k=v` of the object's non-null fields except `skip`: `name` and `version` first,
/// payloads (`input`) last, the rest alphabetically.
fn fields(map: &Map<String, Value>, skip: &[&str]) -> Vec<String> {
    let rank = |k: &str| match k {
        "name" => 0,
        "version" => 1,
        "input" => 3,
        _ => 2,
    };
    let mut entries: Vec<(&String, &Value)> = map
        .iter()
        .filter(|(k, v)| !skip.contains(&k.as_str()) && !v.is_null())
        .collect();
    entries.sort_by_key(|(k, _)| rank(k));
    entries
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{k}={}", cut(&v, MAX_VALUE_CHARS))
        })
        .collect()
}

/// At most `max` characters, newlines flattened, `…` marking a cut.
fn cut(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Parsed JSON of a stored payload, or the raw text when it does not parse.
fn payload(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

fn message_json(m: &QueuedMessage) -> Value {
    json!({
        "id": m.id,
        "kind": m.kind,
        "visible_at_ms": m.visible_at_ms,
        "lock_token": m.lock_token,
        "attempt_count": m.attempt_count,
        "created_at_ms": m.created_at_ms,
        "work_item": payload(&m.work_item),
    })
}

fn worker_json(w: &WorkerItem) -> Value {
    json!({
        "id": w.id,
        "execution_id": w.execution_id,
        "activity_id": w.activity_id,
        "session_id": w.session_id,
        "tag": w.tag,
        "visible_at_ms": w.visible_at_ms,
        "lock_token": w.lock_token,
        "locked_until_ms": w.locked_until_ms,
        "leased": w.leased,
        "attempt_count": w.attempt_count,
        "created_at_ms": w.created_at_ms,
        "work_item": payload(&w.work_item),
    })
}

fn detail_json(d: &InstanceDetail) -> Value {
    json!({
        "instance_id": d.instance_id,
        "db_now_ms": d.db_now_ms,
        "instance": d.instance.as_ref().map(summary_json),
        "custom_status": d.custom_status,
        "custom_status_version": d.custom_status_version,
        "executions": d.executions.iter().map(|x| json!({
            "execution_id": x.execution_id,
            "status": x.status,
            "output": x.output,
            "started_at_ms": x.started_at_ms,
            "completed_at_ms": x.completed_at_ms,
            "event_count": x.event_count,
            "history": x.history.iter().map(|h| json!({
                "event_id": h.event_id,
                "event_type": h.event_type,
                "created_at_ms": h.created_at_ms,
                "event": payload(&h.event_data),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "orchestrator_messages": d.orchestrator_messages.iter().map(message_json).collect::<Vec<_>>(),
        "worker_items": d.worker_items.iter().map(worker_json).collect::<Vec<_>>(),
        "lock": d.lock.as_ref().map(|l| json!({
            "lock_token": l.lock_token,
            "locked_until_ms": l.locked_until_ms,
            "locked_at_ms": l.locked_at_ms,
            "live": l.live,
        })),
        "claim_state": d.claim_state.as_ref().map(|c| json!({
            "visible_at_ms": c.visible_at_ms,
            "claimable_at_ms": c.claimable_at_ms,
            "runnable": c.runnable,
            "pinned_version": c.pinned_version,
        })),
    })
}

/// `YYYY-MM-DD HH:MM:SS.mmmZ` (UTC) of epoch milliseconds.
pub(crate) fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(fmt_time(951_782_400_123), "2000-02-29 00:00:00.123Z");
        assert_eq!(fmt_time(1_795_000_000_000), "2026-11-18 11:06:40.000Z");
        assert_eq!(fmt_time(-1), "1969-12-31 23:59:59.999Z");
    }

    #[test]
    fn summarises_events_and_items() {
        let ev = r#"{"event_id":3,"source_event_id":2,"instance_id":"i","execution_id":1,"timestamp_ms":5,"duroxide_version":"0.1.32","type":"ActivityCompleted","result":"ok"}"#;
        assert_eq!(event_summary(ev), "src=#2 result=ok");
        assert!(event_summary("not json").starts_with("(undecodable"));
        let item = r#"{"StartOrchestration":{"instance":"i","orchestration":"O","input":"{}","version":null}}"#;
        assert_eq!(
            work_item_summary(item, &["instance"]),
            "orchestration=O input={}"
        );
        let long = "x".repeat(500);
        assert_eq!(cut(&long, 10).chars().count(), 10);
    }
}
