//! The history an orchestration ack committed, kept for the activities it handed over.
//!
//! duroxide 0.1.32's worker calls `read(instance)` before every activity, for the
//! orchestration's name and version (`get_orchestration_descriptor`): one round trip
//! per activity, and a read of the whole execution. When this provider's orchestration
//! ack hands an activity to a waiting worker fetch (`handover.rs`), it knows that history
//! exactly: the turn held the instance's lease from its fetch (whose history the
//! history cache holds) to the ack's commit, and the ack appended the turn's events. So
//! the ack keeps that history, and the next `read(instance)` per handed activity within
//! a short window (`ProviderOptions::handover_history_window`, default 200 ms) returns
//! it instead of asking the database.
//!
//! A worker fetch of this provider that claims an activity itself (no hand-over) reads
//! the instance's history in the same call when it is short (`src/worker.rs`), and keeps
//! it the same way for the read that follows.
//!
//! What that read returns is the instance's history as of the ack's commit, which
//! happened before the read was called: it misses a turn another process acked in
//! between (a turn needs a lease of its own, taken after this ack; the worker reads
//! within microseconds of the hand-over), or as of the worker claim. This process's own later acks, history
//! appends and deletes drop the entry. A window of zero turns this off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use duroxide::Event;

/// Entries beyond this many are not kept (each lives for one window; a process hands
/// over far fewer activities per window).
const MAX_ENTRIES: usize = 4096;

struct Entry {
    /// The history the turn's fetch read (the history cache's entry), if any.
    before: Option<Arc<Vec<Event>>>,
    /// The events the ack appended.
    appended: Arc<Vec<Event>>,
    /// Reads left to answer: one per activity handed over.
    reads_left: u32,
    until: Instant,
}

/// Histories committed by acks that handed activities over, by instance.
pub(crate) struct HandoverReads {
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl HandoverReads {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            entries: Mutex::default(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `instance`'s history as the ack committed it (`before` followed by
    /// `appended`) for `reads` reads. `before` must be the whole execution up to the
    /// first appended event; the caller checks that the ids follow on.
    pub(crate) fn keep(
        &self,
        instance: &str,
        before: Option<Arc<Vec<Event>>>,
        appended: Vec<Event>,
        reads: u32,
    ) {
        if self.window.is_zero() || reads == 0 {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.until > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        // A newer ack of the instance replaces an older entry; reads still owed to the
        // older hand-over get the newer history.
        let reads_left = entries.get(instance).map_or(0, |e| e.reads_left) + reads;
        entries.insert(
            instance.to_string(),
            Entry {
                before,
                appended: Arc::new(appended),
                reads_left,
                until: now + self.window,
            },
        );
    }

    /// Whether histories are kept at all (a window above zero).
    pub(crate) fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// The kept history of `instance`, when a read is still owed and the window is open.
    pub(crate) fn take(&self, instance: &str) -> Option<Vec<Event>> {
        if self.window.is_zero() {
            return None;
        }
        let mut entries = self.entries();
        let entry = entries.get_mut(instance)?;
        if entry.until <= Instant::now() {
            entries.remove(instance);
            return None;
        }
        entry.reads_left -= 1;
        let (before, appended) = (entry.before.clone(), entry.appended.clone());
        if entry.reads_left == 0 {
            entries.remove(instance);
        }
        drop(entries);
        let before = before.as_deref().map_or(&[][..], Vec::as_slice);
        let mut history = Vec::with_capacity(before.len() + appended.len());
        history.extend_from_slice(before);
        history.extend_from_slice(&appended);
        Some(history)
    }

    /// Drops `instance`'s entry (this process changed its history).
    pub(crate) fn forget(&self, instance: &str) {
        if !self.window.is_zero() {
            self.entries().remove(instance);
        }
    }

    /// Drops every entry (instances deleted through this provider).
    pub(crate) fn clear(&self) {
        if !self.window.is_zero() {
            self.entries().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duroxide::EventKind;

    fn events(from: u64, to: u64) -> Vec<Event> {
        (from..=to)
            .map(|id| {
                Event::with_event_id(
                    id,
                    "i",
                    1,
                    None,
                    EventKind::ActivityScheduled {
                        name: "A".into(),
                        input: id.to_string(),
                        session_id: None,
                        tag: None,
                    },
                )
            })
            .collect()
    }

    fn ids(h: &[Event]) -> Vec<u64> {
        h.iter().map(|e| e.event_id()).collect()
    }

    #[test]
    fn one_read_per_handed_activity_then_the_database() {
        let r = HandoverReads::new(Duration::from_secs(5));
        r.keep("i", Some(Arc::new(events(1, 3))), events(4, 5), 2);
        assert_eq!(ids(&r.take("i").unwrap()), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(&r.take("i").unwrap()), vec![1, 2, 3, 4, 5]);
        assert!(r.take("i").is_none());
        assert!(r.take("other").is_none());
    }

    #[test]
    fn a_newer_ack_replaces_the_history_and_adds_its_reads() {
        let r = HandoverReads::new(Duration::from_secs(5));
        r.keep("i", None, events(1, 2), 1);
        r.keep("i", Some(Arc::new(events(1, 2))), events(3, 3), 1);
        assert_eq!(ids(&r.take("i").unwrap()), vec![1, 2, 3]);
        assert_eq!(ids(&r.take("i").unwrap()), vec![1, 2, 3]);
        assert!(r.take("i").is_none());
    }

    #[test]
    fn the_window_closes_and_forget_and_clear_drop() {
        let r = HandoverReads::new(Duration::from_millis(1));
        r.keep("i", None, events(1, 2), 1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.take("i").is_none());

        let r = HandoverReads::new(Duration::from_secs(5));
        r.keep("i", None, events(1, 2), 3);
        r.forget("i");
        assert!(r.take("i").is_none());
        r.keep("a", None, events(1, 2), 1);
        r.keep("b", None, events(1, 2), 1);
        r.clear();
        assert!(r.take("a").is_none() && r.take("b").is_none());

        let off = HandoverReads::new(Duration::ZERO);
        off.keep("i", None, events(1, 2), 1);
        assert!(off.take("i").is_none());
    }
}
