//! `ack_orchestration_item`: one call of the `ack_orchestration_item` SQL function.
//!
//! Rust does the parts SQL is bad at: serialising events and work items, deriving each
//! item's routing columns, and reducing the delta's KV and custom-status events to their
//! net effect, so the SQL side is a fixed sequence of set-based statements.

use std::time::Instant;

use duroxide::providers::{
    ExecutionMetadata, ProviderError, ScheduledActivityIdentifier, WorkItem,
};
use duroxide::{Event, EventKind};

use crate::codec::{decode_history, encode_event, encode_item, to_i64};
use crate::errors::{db_error, decode_error};
use crate::handover::{ClaimSpec, Handed};
use crate::provider::{PostgresProvider, TRACING_TARGET};
use crate::sql_fn::{Args, SqlFunction};

const OP: &str = "ack_orchestration_item";

/// The arguments both orchestration acks share, in declaration order, followed by `$extra`.
macro_rules! ack_args {
    ($($extra:literal),* $(,)?) => {
        &[
            "p_lock_token",
            "p_execution_id",
            "p_event_ids",
            "p_event_types",
            "p_event_data",
            "p_orchestration_name",
            "p_orchestration_version",
            "p_parent_instance_id",
            "p_status",
            "p_output",
            "p_pinned_major",
            "p_pinned_minor",
            "p_pinned_patch",
            "p_custom_status_set",
            "p_custom_status",
            "p_kv_clear_all",
            "p_kv_keys",
            "p_kv_values",
            "p_kv_updated_ms",
            "p_worker_items",
            "p_worker_instances",
            "p_worker_executions",
            "p_worker_activities",
            "p_worker_sessions",
            "p_worker_tags",
            "p_cancel_instances",
            "p_cancel_executions",
            "p_cancel_activities",
            "p_orch_instances",
            "p_orch_kinds",
            "p_orch_items",
            "p_orch_visible_at_ms",
            $($extra,)*
        ]
    };
}

/// Returns the instance id, or NULL to a resend (same `p_call_id`) of an ack that
/// committed (migrations/functions/05_ack.sql).
pub(crate) static ACK_ORCHESTRATION_ITEM: SqlFunction = SqlFunction {
    name: "ack_orchestration_item",
    args: ack_args!("p_notify_worker_items", "p_call_id"),
    columns: None,
};

/// `ack_orchestration_item` plus worker claims for waiting local worker fetches
/// (migrations/functions/09_handover.sql; `crate::handover`).
pub(crate) static ACK_ORCHESTRATION_HANDOVER: SqlFunction = SqlFunction {
    name: "ack_orchestration_handover",
    args: ack_args!(
        "p_handover_tokens",
        "p_handover_lock_timeout_ms",
        "p_handover_owner_ids",
        "p_handover_session_lock_timeout_ms",
        "p_handover_tag_mode",
        "p_handover_tags",
        "p_call_id",
    ),
    columns: Some(
        "o_instance_id, o_lock_token, o_work_item, o_attempt_count, o_item_instance_id, \
         o_item_execution_id, o_item_activity_id, o_item_session_id, o_item_tag, \
         o_history_guard",
    ),
};

/// One row of `ack_orchestration_handover`: an item handed over (`o_lock_token` set) or
/// the instance alone.
#[derive(sqlx::FromRow)]
struct HandoverRow {
    /// NULL for a resend of an ack that committed.
    o_instance_id: Option<String>,
    o_lock_token: Option<String>,
    o_work_item: Option<String>,
    o_attempt_count: Option<i32>,
    o_item_instance_id: Option<String>,
    o_item_execution_id: Option<i64>,
    o_item_activity_id: Option<i64>,
    o_item_session_id: Option<String>,
    o_item_tag: Option<String>,
    /// Guard of the last history row the ack appended (the same on every row).
    o_history_guard: Option<i64>,
}

/// Net KV effect of one turn's delta.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct KvChanges {
    /// A `KeyValuesCleared` occurred: tombstone every key known before the turn.
    pub clear_all: bool,
    /// Final state per key after the delta, in first-touched order: value `None` is a
    /// tombstone, timestamp `None` means "now" (database clock).
    pub keys: Vec<(String, Option<String>, Option<i64>)>,
}

/// Folds the delta's KV events in order. Only the last write per key matters, and a
/// clear-all discards everything before it.
pub(crate) fn reduce_kv(delta: &[Event]) -> KvChanges {
    let mut out = KvChanges::default();
    let put = |out: &mut KvChanges, key: &str, value: Option<String>, ts: Option<i64>| match out
        .keys
        .iter_mut()
        .find(|(k, _, _)| k == key)
    {
        Some(slot) => {
            slot.1 = value;
            slot.2 = ts;
        }
        None => out.keys.push((key.to_string(), value, ts)),
    };
    for e in delta {
        match &e.kind {
            EventKind::KeyValueSet {
                key,
                value,
                last_updated_at_ms,
            } => {
                let ts = i64::try_from(*last_updated_at_ms).unwrap_or(i64::MAX);
                put(&mut out, key, Some(value.clone()), Some(ts));
            }
            EventKind::KeyValueCleared { key } => put(&mut out, key, None, None),
            EventKind::KeyValuesCleared => {
                out.clear_all = true;
                out.keys.clear();
            }
            _ => {}
        }
    }
    out
}

/// The last `CustomStatusUpdated` of the delta: `Some(Some(s))` set, `Some(None)` clear,
/// `None` untouched.
pub(crate) fn last_custom_status(delta: &[Event]) -> Option<Option<String>> {
    delta.iter().rev().find_map(|e| match &e.kind {
        EventKind::CustomStatusUpdated { status } => Some(status.clone()),
        _ => None,
    })
}

#[derive(Default)]
struct WorkerRows {
    items: Vec<String>,
    instances: Vec<String>,
    executions: Vec<i64>,
    activities: Vec<i64>,
    sessions: Vec<Option<String>>,
    tags: Vec<Option<String>>,
}

#[derive(Default)]
struct OrchRows {
    instances: Vec<String>,
    kinds: Vec<String>,
    items: Vec<String>,
    visible_at: Vec<Option<i64>>,
}

impl PostgresProvider {
    /// Keeps the history an ack committed for the `reads` activities it handed over
    /// (`crate::handover_reads`): the history cache's entry of the turn's fetch followed
    /// by `appended`, when their event ids follow on; otherwise (and when nothing was
    /// handed over) drops what was kept of the instance, whose history just changed.
    fn keep_handover_history(
        &self,
        instance: &str,
        execution_id: i64,
        appended: &[String],
        reads: u32,
    ) {
        let kept = &self.inner.handover_reads;
        if reads == 0 {
            kept.forget(instance);
            return;
        }
        // Decoded from the text stored, so the read returns what the database would.
        let Ok(appended) = decode_history(appended) else {
            kept.forget(instance);
            return;
        };
        let first = appended.first().map(Event::event_id);
        let before = if first == Some(1) {
            // The ack started the execution: nothing came before.
            None
        } else {
            match self.inner.history_cache.held(instance, execution_id) {
                Some(h)
                    if first.is_none() || h.events.last().map(|e| e.event_id() + 1) == first =>
                {
                    Some(h.events)
                }
                _ => {
                    kept.forget(instance);
                    return;
                }
            }
        };
        kept.keep(instance, before, appended, reads);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn ack_orchestration(
        &self,
        lock_token: &str,
        execution_id: u64,
        history_delta: Vec<Event>,
        worker_items: Vec<WorkItem>,
        orchestrator_items: Vec<WorkItem>,
        metadata: ExecutionMetadata,
        cancelled_activities: Vec<ScheduledActivityIdentifier>,
    ) -> Result<(), ProviderError> {
        let started = Instant::now();
        let bad = |msg: String| decode_error(OP, None, msg);
        let execution_id = to_i64("execution_id", execution_id).map_err(bad)?;

        let mut ev_ids = Vec::with_capacity(history_delta.len());
        let mut ev_types = Vec::with_capacity(history_delta.len());
        let mut ev_data = Vec::with_capacity(history_delta.len());
        for e in &history_delta {
            let enc = encode_event(e).map_err(bad)?;
            ev_ids.push(enc.event_id);
            ev_types.push(enc.event_type);
            ev_data.push(enc.json);
        }

        let mut w = WorkerRows::default();
        for item in &worker_items {
            let WorkItem::ActivityExecute {
                instance,
                execution_id,
                id,
                session_id,
                tag,
                ..
            } = item
            else {
                return Err(bad(format!(
                    "worker_items may only hold ActivityExecute, got {}",
                    crate::codec::work_item_kind(item)
                )));
            };
            w.items
                .push(serde_json::to_string(item).map_err(|e| bad(e.to_string()))?);
            w.instances.push(instance.clone());
            w.executions
                .push(to_i64("execution_id", *execution_id).map_err(bad)?);
            w.activities.push(to_i64("activity id", *id).map_err(bad)?);
            w.sessions.push(session_id.clone());
            w.tags.push(tag.clone());
        }

        let mut o = OrchRows::default();
        for item in &orchestrator_items {
            if matches!(item, WorkItem::ActivityExecute { .. }) {
                return Err(bad(
                    "orchestrator_items may not hold ActivityExecute".to_string()
                ));
            }
            let enc = encode_item(item).map_err(bad)?;
            let visible_at = match item {
                WorkItem::TimerFired { fire_at_ms, .. } => {
                    Some(to_i64("fire_at_ms", *fire_at_ms).map_err(bad)?)
                }
                _ => None,
            };
            o.instances.push(enc.instance);
            o.kinds.push(enc.kind.to_string());
            o.items.push(enc.json);
            o.visible_at.push(visible_at);
        }

        let mut c_inst = Vec::with_capacity(cancelled_activities.len());
        let mut c_exec = Vec::with_capacity(cancelled_activities.len());
        let mut c_act = Vec::with_capacity(cancelled_activities.len());
        for c in &cancelled_activities {
            c_inst.push(c.instance.clone());
            c_exec.push(to_i64("execution_id", c.execution_id).map_err(bad)?);
            c_act.push(to_i64("activity id", c.activity_id).map_err(bad)?);
        }

        let kv = reduce_kv(&history_delta);
        let mut kv_keys = Vec::with_capacity(kv.keys.len());
        let mut kv_values = Vec::with_capacity(kv.keys.len());
        let mut kv_ts = Vec::with_capacity(kv.keys.len());
        for (k, v, t) in kv.keys {
            kv_keys.push(k);
            kv_values.push(v);
            kv_ts.push(t);
        }
        let custom_status = last_custom_status(&history_delta);
        let pin = metadata.pinned_duroxide_version.as_ref().map(|v| {
            let c = |x: u64| i32::try_from(x).unwrap_or(i32::MAX);
            (c(v.major), c(v.minor), c(v.patch))
        });

        // Waiting local worker fetches that can take one of the new activities: the ack
        // claims one for each (handover.rs).
        let reservations = if self.handover_enabled() && !w.items.is_empty() {
            let items: Vec<_> = w
                .tags
                .iter()
                .cloned()
                .zip(w.sessions.iter().cloned())
                .collect();
            self.inner.notifier.reserve_work_waiters(&items)
        } else {
            Vec::new()
        };
        let mut h_tokens = Vec::with_capacity(reservations.len());
        let mut h_lock_ms = Vec::with_capacity(reservations.len());
        let mut h_owners = Vec::with_capacity(reservations.len());
        let mut h_session_ms = Vec::with_capacity(reservations.len());
        for r in &reservations {
            let (lock_ms, session_ms) = match &r.interest().claim {
                Some(ClaimSpec::Work {
                    lock_timeout_ms,
                    session_lock_timeout_ms,
                }) => (*lock_timeout_ms, *session_lock_timeout_ms),
                _ => (0, 0),
            };
            h_tokens.push(format!("work_{}", uuid::Uuid::new_v4()));
            h_lock_ms.push(lock_ms);
            h_owners.push(r.interest().session_owner.clone());
            h_session_ms.push(session_ms);
        }
        let (h_tag_mode, h_tags) = reservations
            .first()
            .map(|r| (r.interest().tag_mode, r.interest().tags.clone()))
            .unwrap_or((3, Vec::new()));

        let common = |a: Args| {
            a.bind("p_lock_token", lock_token)
                .bind("p_execution_id", execution_id)
                .bind("p_event_ids", &ev_ids)
                .bind("p_event_types", &ev_types)
                .bind("p_event_data", &ev_data)
                .bind("p_orchestration_name", &metadata.orchestration_name)
                .bind("p_orchestration_version", &metadata.orchestration_version)
                .bind("p_parent_instance_id", &metadata.parent_instance_id)
                .bind("p_status", &metadata.status)
                .bind("p_output", &metadata.output)
                .bind("p_pinned_major", pin.map(|p| p.0))
                .bind("p_pinned_minor", pin.map(|p| p.1))
                .bind("p_pinned_patch", pin.map(|p| p.2))
                .bind("p_custom_status_set", custom_status.is_some())
                .bind("p_custom_status", custom_status.clone().flatten())
                .bind("p_kv_clear_all", kv.clear_all)
                .bind("p_kv_keys", &kv_keys)
                .bind("p_kv_values", &kv_values)
                .bind("p_kv_updated_ms", &kv_ts)
                .bind("p_worker_items", &w.items)
                .bind("p_worker_instances", &w.instances)
                .bind("p_worker_executions", &w.executions)
                .bind("p_worker_activities", &w.activities)
                .bind("p_worker_sessions", &w.sessions)
                .bind("p_worker_tags", &w.tags)
                .bind("p_cancel_instances", &c_inst)
                .bind("p_cancel_executions", &c_exec)
                .bind("p_cancel_activities", &c_act)
                .bind("p_orch_instances", &o.instances)
                .bind("p_orch_kinds", &o.kinds)
                .bind("p_orch_items", &o.items)
                .bind("p_orch_visible_at_ms", &o.visible_at)
        };
        // One id per call, reused by resends: a resend of an ack that committed (its
        // reply was lost) is answered as done, so the call may be sent again.
        let call_id = uuid::Uuid::new_v4().to_string();
        // The hand-over function also returns the guard of the last event appended, which
        // lets the history cache keep what this ack wrote: worth it (one index lookup)
        // when the execution goes on and its next turn may run here.
        let keeps_history = !ev_ids.is_empty()
            && self.inner.history_cache.enabled()
            && !matches!(
                metadata.status.as_deref(),
                Some("Completed" | "Failed" | "ContinuedAsNew")
            );
        let result = if reservations.is_empty() && !keeps_history {
            let sql = self.call_sql(&ACK_ORCHESTRATION_ITEM);
            let args = || {
                common(Args::new(&ACK_ORCHESTRATION_ITEM))
                    .bind("p_notify_worker_items", true)
                    .bind("p_call_id", call_id.as_str())
                    .finish(OP)
            };
            on_conn!(
                idempotent: self,
                fetch_one,
                sqlx::query_scalar_with::<_, Option<String>, _>(&sql, args()?)
            )
            .map(|instance| (instance, None, Vec::new()))
        } else {
            let sql = self.call_sql(&ACK_ORCHESTRATION_HANDOVER);
            let args = || {
                common(Args::new(&ACK_ORCHESTRATION_HANDOVER))
                    .bind("p_handover_tokens", &h_tokens)
                    .bind("p_handover_lock_timeout_ms", &h_lock_ms)
                    .bind("p_handover_owner_ids", &h_owners)
                    .bind("p_handover_session_lock_timeout_ms", &h_session_ms)
                    .bind("p_handover_tag_mode", h_tag_mode)
                    .bind("p_handover_tags", &h_tags)
                    .bind("p_call_id", call_id.as_str())
                    .finish(OP)
            };
            on_conn!(
                idempotent: self,
                fetch_all,
                sqlx::query_as_with::<_, HandoverRow, _>(&sql, args()?)
            )
            .map(|rows| {
                let first = rows.first();
                let instance = first.and_then(|r| r.o_instance_id.clone());
                let guard = first.and_then(|r| r.o_history_guard);
                (instance, guard, rows)
            })
        };

        match result {
            Ok((instance, history_guard, handed)) => {
                let mut reservations: Vec<_> = h_tokens.into_iter().zip(reservations).collect();
                let mut handed_here = 0;
                for row in handed {
                    let (Some(token), Some(json), Some(item_instance)) =
                        (row.o_lock_token, row.o_work_item, row.o_item_instance_id)
                    else {
                        continue;
                    };
                    let Some(at) = reservations.iter().position(|(t, _)| *t == token) else {
                        continue;
                    };
                    let (_, reservation) = reservations.swap_remove(at);
                    let of_this_instance = instance.as_deref() == Some(item_instance.as_str());
                    let item = crate::worker::leased_item(
                        crate::worker::Leased {
                            json,
                            instance: item_instance,
                            attempt_count: row.o_attempt_count,
                            execution_id: row.o_item_execution_id,
                            activity_id: row.o_item_activity_id,
                            session_id: row.o_item_session_id,
                            tag: row.o_item_tag,
                        },
                        token,
                    );
                    if self.hand_over(reservation, Handed::Work(Box::new(item))) && of_this_instance
                    {
                        handed_here += 1;
                    }
                }
                // (None: a resend of this ack found it committed by an attempt whose reply
                // was lost; the reply does not name the instance, so nothing kept for
                // handed activities' reads stays.)
                if instance.is_none() {
                    self.inner.handover_reads.clear();
                }
                if let Some(instance) = &instance {
                    // The history this ack committed answers the read duroxide's worker
                    // makes before each activity handed over (handover_reads.rs).
                    self.keep_handover_history(instance, execution_id, &ev_data, handed_here);
                    // The next turn of this process reads only what others append. The
                    // events are decoded from the text stored, as a read would return them.
                    let stored = history_guard.and_then(|_| decode_history(&ev_data).ok());
                    self.inner.history_cache.extend(
                        instance,
                        execution_id,
                        stored.as_deref().unwrap_or(&history_delta),
                        history_guard.filter(|_| stored.is_some()),
                    );
                    if matches!(metadata.status.as_deref(), Some("Completed" | "Failed")) {
                        // The instance is done: its history will not be read for a turn
                        // again. (After ContinuedAsNew one more turn reads it, then the
                        // next execution's entry replaces it.)
                        self.inner.history_cache.forget(instance);
                    }
                }
                metrics::histogram!("duroxide_pg_ack_rows", "kind" => "history")
                    .record(ev_ids.len() as f64);
                metrics::histogram!("duroxide_pg_ack_rows", "kind" => "worker")
                    .record(w.items.len() as f64);
                metrics::histogram!("duroxide_pg_ack_rows", "kind" => "orchestrator")
                    .record(o.items.len() as f64);
                tracing::debug!(
                    target: TRACING_TARGET,
                    operation = OP,
                    instance = instance.as_deref().unwrap_or(""),
                    resent_after_commit = instance.is_none(),
                    execution_id,
                    events = ev_ids.len(),
                    worker_items = w.items.len(),
                    orchestrator_items = o.items.len(),
                    cancelled = c_inst.len(),
                    status = metadata.status.as_deref().unwrap_or(""),
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "acked orchestration turn"
                );
                Ok(())
            }
            Err(e) => {
                let err = db_error(OP, None, e);
                // The outcome may be unknown and the instance is not (the token names
                // it in the database): nothing kept for handed activities' reads stays.
                self.inner.handover_reads.clear();
                if err.is_retryable() && !reservations.is_empty() {
                    // The outcome may be unknown (the reply was lost): items this call
                    // may have claimed for the reserved fetches go back, attempt not
                    // counted (a token nobody holds changes nothing).
                    drop(reservations);
                    let p = self.clone();
                    tokio::spawn(async move {
                        for t in h_tokens {
                            let _ = p.abandon_work(&t, None, true).await;
                        }
                    });
                }
                tracing::debug!(
                    target: TRACING_TARGET,
                    operation = OP,
                    retryable = err.is_retryable(),
                    error = %err,
                    "ack rejected"
                );
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64, kind: EventKind) -> Event {
        Event::with_event_id(id, "i", 1, None, kind)
    }

    #[test]
    fn kv_reduction_keeps_last_write_and_clear_all_resets() {
        let delta = vec![
            ev(
                1,
                EventKind::KeyValueSet {
                    key: "a".into(),
                    value: "1".into(),
                    last_updated_at_ms: 5,
                },
            ),
            ev(
                2,
                EventKind::KeyValueSet {
                    key: "b".into(),
                    value: "2".into(),
                    last_updated_at_ms: 6,
                },
            ),
            ev(3, EventKind::KeyValuesCleared),
            ev(
                4,
                EventKind::KeyValueSet {
                    key: "a".into(),
                    value: "3".into(),
                    last_updated_at_ms: 7,
                },
            ),
            ev(5, EventKind::KeyValueCleared { key: "c".into() }),
            ev(
                6,
                EventKind::KeyValueSet {
                    key: "a".into(),
                    value: "4".into(),
                    last_updated_at_ms: 8,
                },
            ),
        ];
        let kv = reduce_kv(&delta);
        assert!(kv.clear_all);
        assert_eq!(
            kv.keys,
            vec![
                ("a".into(), Some("4".into()), Some(8)),
                ("c".into(), None, None)
            ]
        );
    }

    #[test]
    fn custom_status_takes_the_last_update() {
        let delta = vec![
            ev(
                1,
                EventKind::CustomStatusUpdated {
                    status: Some("x".into()),
                },
            ),
            ev(2, EventKind::CustomStatusUpdated { status: None }),
        ];
        assert_eq!(last_custom_status(&delta), Some(None));
        assert_eq!(last_custom_status(&[]), None);
    }
}
