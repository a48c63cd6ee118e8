//! Encoding of events and work items for storage, and decoding on the way back.
//!
//! Payloads are stored as the exact `serde_json` text duroxide produced; the provider only
//! derives a few routing columns from them (variant name, routing instance, activity
//! identity) and never rewrites them.

use duroxide::Event;
use duroxide::providers::WorkItem;

/// A work item ready for an INSERT: its JSON, variant name and routing instance.
pub(crate) struct EncodedItem {
    pub json: String,
    pub kind: &'static str,
    pub instance: String,
}

/// Variant name of a work item (the externally tagged serde key).
pub(crate) fn work_item_kind(item: &WorkItem) -> &'static str {
    match item {
        WorkItem::StartOrchestration { .. } => "StartOrchestration",
        WorkItem::ActivityExecute { .. } => "ActivityExecute",
        WorkItem::ActivityCompleted { .. } => "ActivityCompleted",
        WorkItem::ActivityFailed { .. } => "ActivityFailed",
        WorkItem::TimerFired { .. } => "TimerFired",
        WorkItem::ExternalRaised { .. } => "ExternalRaised",
        WorkItem::SubOrchCompleted { .. } => "SubOrchCompleted",
        WorkItem::SubOrchFailed { .. } => "SubOrchFailed",
        WorkItem::CancelInstance { .. } => "CancelInstance",
        WorkItem::ContinueAsNew { .. } => "ContinueAsNew",
        WorkItem::QueueMessage { .. } => "QueueMessage",
        // Variants added behind duroxide features (e.g. replay-version-test).
        #[allow(unreachable_patterns)]
        _ => "Other",
    }
}

/// The instance whose queue a work item belongs to.
pub(crate) fn routing_instance(item: &WorkItem) -> Option<&str> {
    match item {
        WorkItem::StartOrchestration { instance, .. }
        | WorkItem::ActivityExecute { instance, .. }
        | WorkItem::ActivityCompleted { instance, .. }
        | WorkItem::ActivityFailed { instance, .. }
        | WorkItem::TimerFired { instance, .. }
        | WorkItem::ExternalRaised { instance, .. }
        | WorkItem::CancelInstance { instance, .. }
        | WorkItem::ContinueAsNew { instance, .. }
        | WorkItem::QueueMessage { instance, .. } => Some(instance),
        WorkItem::SubOrchCompleted {
            parent_instance, ..
        }
        | WorkItem::SubOrchFailed {
            parent_instance, ..
        } => Some(parent_instance),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

pub(crate) fn encode_item(item: &WorkItem) -> Result<EncodedItem, String> {
    let instance = routing_instance(item)
        .ok_or_else(|| format!("work item {} has no routing instance", work_item_kind(item)))?
        .to_string();
    let json =
        serde_json::to_string(item).map_err(|e| format!("cannot serialize work item: {e}"))?;
    Ok(EncodedItem {
        json,
        kind: work_item_kind(item),
        instance,
    })
}

/// `type` of a serialized event: the flattened `EventKind` tag. Found by scanning for the
/// first `"type":"` key, which cannot occur inside a string value (its quotes would be
/// escaped there).
pub(crate) fn event_type(json: &str) -> &str {
    const KEY: &str = "\"type\":\"";
    json.find(KEY)
        .and_then(|start| {
            let rest = &json[start + KEY.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .unwrap_or("Unknown")
}

/// A history event ready for an INSERT.
pub(crate) struct EncodedEvent {
    pub event_id: i64,
    pub event_type: String,
    pub json: String,
}

pub(crate) fn encode_event(event: &Event) -> Result<EncodedEvent, String> {
    if event.event_id() == 0 {
        return Err("event_id 0 is not a valid history position (ids start at 1)".to_string());
    }
    let json = serde_json::to_string(event).map_err(|e| format!("cannot serialize event: {e}"))?;
    let event_id = i64::try_from(event.event_id())
        .map_err(|_| format!("event_id {} does not fit in BIGINT", event.event_id()))?;
    Ok(EncodedEvent {
        event_id,
        event_type: event_type(&json).to_string(),
        json,
    })
}

/// Decodes a whole history; any undecodable row fails the whole read (never a partial
/// history).
pub(crate) fn decode_history(rows: &[String]) -> Result<Vec<Event>, String> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            serde_json::from_str::<Event>(row)
                .map_err(|e| format!("history row {} does not decode as an Event: {e}", i + 1))
        })
        .collect()
}

/// Decodes a batch of queued messages, failing on the first row that does not decode
/// (message names the instance and the row's position). For the turn's assembly
/// (`src/turn/mod.rs`): a failure goes to duroxide as `history_error` with an empty
/// history, so the runtime abandons the turn with back-off and poisons the instance after
/// `max_attempts`, instead of a message being dropped silently.
pub(crate) fn decode_messages_strict(
    instance: &str,
    rows: &[String],
) -> Result<Vec<WorkItem>, String> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            serde_json::from_str::<WorkItem>(row).map_err(|e| {
                format!(
                    "instance {instance:?}: queued message {} of {} does not decode as a WorkItem: {e}",
                    i + 1,
                    rows.len()
                )
            })
        })
        .collect()
}

/// u64 -> BIGINT, refusing values PostgreSQL cannot store.
pub(crate) fn to_i64(what: &str, v: u64) -> Result<i64, String> {
    i64::try_from(v).map_err(|_| format!("{what} {v} does not fit in BIGINT"))
}

/// Duration -> whole milliseconds as BIGINT (saturating).
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_message_decoding_reports_the_bad_row() {
        let good = serde_json::to_string(&WorkItem::QueueMessage {
            instance: "i".into(),
            name: "n".into(),
            data: "d".into(),
        })
        .unwrap();
        assert_eq!(
            decode_messages_strict("i", std::slice::from_ref(&good))
                .unwrap()
                .len(),
            1
        );
        let e = decode_messages_strict("i", &[good, "{\"Nope\":1}".into()]).unwrap_err();
        assert!(e.contains("\"i\"") && e.contains("message 2 of 2"), "{e}");
    }

    #[test]
    fn finds_event_type_not_fooled_by_payloads() {
        let json = r#"{"event_id":1,"source_event_id":null,"instance_id":"x\"type\":\"Evil","execution_id":1,"timestamp_ms":1,"duroxide_version":"0.1.32","type":"ActivityScheduled","name":"A","input":"{\"type\":\"no\"}"}"#;
        assert_eq!(event_type(json), "ActivityScheduled");
        assert_eq!(event_type("{}"), "Unknown");
    }

    #[test]
    fn kinds_match_serde_tags() {
        let item = WorkItem::QueueMessage {
            instance: "i".into(),
            name: "n".into(),
            data: "d".into(),
        };
        let enc = encode_item(&item).unwrap();
        assert!(
            enc.json.starts_with(&format!("{{\"{}\":", enc.kind)),
            "{}",
            enc.json
        );
        let item = WorkItem::SubOrchCompleted {
            parent_instance: "p".into(),
            parent_execution_id: 1,
            parent_id: 2,
            result: "r".into(),
        };
        let enc = encode_item(&item).unwrap();
        assert_eq!(enc.instance, "p");
        assert!(enc.json.starts_with("{\"SubOrchCompleted\":"));
    }
}
