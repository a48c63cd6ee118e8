//! The history cache: decoded histories of instances this provider ran recently, so that
//! the next turn of the same execution reads only the events after the last one it holds
//! (`read_history_since`, `fetch_orchestration_turn` in
//! `migrations/functions/04_turn_reads.sql`).
//!
//! An entry is never served on trust. Each read sends the id and the guard (hash of the
//! stored text seeded with the row's creation time) of the last event the entry holds;
//! the database returns only later events when that row is still there unchanged and the
//! later events follow on without a gap, else the whole execution in the same call. So a
//! turn sees the events other processes appended in between, and an instance deleted and
//! re-created under the same id is read in full.
//!
//! An entry made by a turn also keeps the turn's KV snapshot (`kv_store`), which only an
//! execution's last ack changes (`05_ack.sql`): the next turn of the execution reuses it
//! when its history read is incremental and no event read since ends the execution
//! ([`crate::turn::HistoryRows::carried_kv`]).
//!
//! One entry per instance: a new execution (continue-as-new) replaces the previous one's
//! entry. Memory is bounded by a total number of events; the least recently used entries
//! go first, and an entry whose execution finished is dropped by the ack.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use duroxide::Event;

/// On the procedure path the claim's instance is not known in advance, so the call
/// carries the cache's entries; only histories at least this long are worth the bytes
/// (a shorter one costs about as little to read again as to describe).
pub(crate) const HINT_MIN_EVENTS: usize = 32;
/// At most this many entries (the most recently used) ride along with a procedure call.
pub(crate) const HINT_MAX_ENTRIES: usize = 64;
/// At most this many instances are remembered as read whole with a long history and no
/// entry (a process that reads instances it does not run); the set starts over when full.
const WANTED_MAX: usize = 1_024;

/// A turn's KV snapshot: `(key, value, last_updated_at_ms)` rows of `kv_store`.
pub(crate) type KvRows = Vec<(String, String, i64)>;

/// What this process holds of one execution's history.
#[derive(Clone)]
pub(crate) struct Held {
    pub execution_id: i64,
    /// `event_id` column of the last event held.
    pub last_event_id: i64,
    /// `history_row_guard` of that row.
    pub guard: i64,
    pub events: Arc<Vec<Event>>,
    /// The KV snapshot a turn of this execution read with these events (`None` when the
    /// entry came from `read(instance)`, which does not read KV).
    pub kv: Option<Arc<KvRows>>,
}

struct Entry {
    held: Held,
    used: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Use tick -> instance, oldest first.
    lru: BTreeMap<u64, String>,
    events: usize,
    tick: u64,
    /// Instances whose history `read` found long and had no entry for: the next read
    /// asks for the guard it needs to keep one.
    wanted: HashSet<String>,
}

impl State {
    fn remove(&mut self, instance: &str) -> Option<Entry> {
        let e = self.entries.remove(instance)?;
        self.lru.remove(&e.used);
        self.events -= weight(&e.held);
        Some(e)
    }

    fn touch(&mut self, instance: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(instance) {
            self.lru.remove(&e.used);
            e.used = tick;
            self.lru.insert(tick, instance.to_string());
        }
    }
}

/// What an entry counts against the bound: its events, and at least 1 (an empty
/// history kept with a turn's KV snapshot).
fn weight(held: &Held) -> usize {
    held.events.len().max(1)
}

/// Bounded, process-local cache of decoded histories (see the module docs).
pub(crate) struct HistoryCache {
    max_events: usize,
    state: Mutex<State>,
}

impl HistoryCache {
    /// `max_events == 0` turns the cache off.
    pub(crate) fn new(max_events: usize) -> Self {
        Self {
            max_events,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether the cache keeps anything (`history_cache_events` > 0).
    pub(crate) fn enabled(&self) -> bool {
        self.max_events > 0
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement; a panic elsewhere cannot leave
        // it half-updated in a way that matters (at worst an entry is read in full).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What is held of `instance`'s execution `execution_id` (marks it used).
    pub(crate) fn held(&self, instance: &str, execution_id: i64) -> Option<Held> {
        self.lookup(instance, Some(execution_id))
    }

    /// The entry of `instance`, whichever execution it holds (for a caller that does not
    /// know the instance's execution; a call uses it only when the execution matches).
    pub(crate) fn held_any(&self, instance: &str) -> Option<Held> {
        self.lookup(instance, None)
    }

    fn lookup(&self, instance: &str, execution_id: Option<i64>) -> Option<Held> {
        if self.max_events == 0 {
            return None;
        }
        let mut s = self.state();
        let held = s
            .entries
            .get(instance)
            .filter(|e| execution_id.is_none_or(|x| e.held.execution_id == x))
            .map(|e| e.held.clone())?;
        s.touch(instance);
        Some(held)
    }

    /// Entries for a procedure-path call: histories of at least [`HINT_MIN_EVENTS`]
    /// events, the [`HINT_MAX_ENTRIES`] most recently used.
    pub(crate) fn hints(&self) -> Vec<(String, Held)> {
        if self.max_events == 0 {
            return Vec::new();
        }
        let s = self.state();
        s.lru
            .values()
            .rev()
            .filter_map(|i| s.entries.get(i).map(|e| (i, e)))
            .filter(|(_, e)| e.held.events.len() >= HINT_MIN_EVENTS)
            .take(HINT_MAX_ENTRIES)
            .map(|(i, e)| (i.clone(), e.held.clone()))
            .collect()
    }

    /// Records the full history of `instance`'s execution as just read (with the KV
    /// snapshot that goes with it, if known), replacing any entry of the instance (an
    /// older execution's included), then evicts the least recently used entries beyond
    /// the bound. A history longer than the bound alone is not kept. `last`: id and guard
    /// of the last event; an empty history (`None`) is kept only with a turn's KV
    /// snapshot, as the start that turn's ack extends ([`Self::extend`]).
    pub(crate) fn store(
        &self,
        instance: &str,
        execution_id: i64,
        events: &[Event],
        last: Option<(i64, i64)>,
        kv: Option<Arc<KvRows>>,
    ) {
        if self.max_events == 0 {
            return;
        }
        let (last_event_id, guard) = match last {
            Some(l) if !events.is_empty() => l,
            None if events.is_empty() && kv.is_some() => (0, 0),
            _ => {
                self.forget(instance);
                return;
            }
        };
        if events.len() > self.max_events {
            self.forget(instance);
            return;
        }
        // The copy the cache keeps (the turn owns the other), made before taking the
        // lock: the lock only covers map updates.
        let held = Held {
            execution_id,
            last_event_id,
            guard,
            events: Arc::new(events.to_vec()),
            kv,
        };
        self.insert(instance, held);
    }

    /// The ack of a turn of `instance`'s execution `execution_id` appended `appended`,
    /// the last of which is stored with `guard`: the entry (what the turn read) becomes
    /// the history including them, so the next turn reads only what others write after.
    /// The KV snapshot goes when they end the execution (the ack changed `kv_store`).
    /// Without a guard (an ack that does not return one) an entry with events stays as it
    /// is (the next turn reads the appended rows); an entry that cannot be extended (not
    /// this execution, ids that do not follow on) is dropped.
    pub(crate) fn extend(
        &self,
        instance: &str,
        execution_id: i64,
        appended: &[Event],
        guard: Option<i64>,
    ) {
        if self.max_events == 0 || appended.is_empty() {
            return;
        }
        let mut s = self.state();
        let Some(entry) = s.entries.get(instance) else {
            return;
        };
        let held = &entry.held;
        let follows = held.execution_id == execution_id
            && appended
                .iter()
                .zip(held.last_event_id + 1..)
                .all(|(e, id)| i64::try_from(e.event_id()) == Ok(id));
        let (Some(guard), true) = (guard, follows) else {
            if !follows || held.events.is_empty() {
                s.remove(instance);
            }
            return;
        };
        let mut events = Vec::with_capacity(held.events.len() + appended.len());
        events.extend_from_slice(&held.events);
        events.extend_from_slice(appended);
        let ended = appended.iter().any(Event::is_terminal);
        let held = Held {
            execution_id,
            last_event_id: held.last_event_id + appended.len() as i64,
            guard,
            events: Arc::new(events),
            kv: held.kv.clone().filter(|_| !ended),
        };
        drop(s);
        if held.events.len() > self.max_events {
            self.forget(instance);
        } else {
            self.insert(instance, held);
        }
    }

    fn insert(&self, instance: &str, held: Held) {
        let mut s = self.state();
        s.remove(instance);
        s.events += weight(&held);
        s.entries
            .insert(instance.to_string(), Entry { held, used: 0 });
        s.touch(instance);
        while s.events > self.max_events {
            let Some((_, oldest)) = s.lru.pop_first() else {
                break;
            };
            if let Some(e) = s.entries.remove(&oldest) {
                s.events -= weight(&e.held);
            }
        }
        metrics::gauge!("duroxide_pg_history_cache_events").set(s.events as f64);
    }

    /// Gives `instance`'s entry the KV snapshot a turn read, when the entry still holds
    /// execution `execution_id` up to `last_event_id` (the turn read nothing new).
    pub(crate) fn attach_kv(
        &self,
        instance: &str,
        execution_id: i64,
        last_event_id: i64,
        kv: Arc<KvRows>,
    ) {
        if self.max_events == 0 {
            return;
        }
        let mut s = self.state();
        if let Some(e) = s.entries.get_mut(instance).filter(|e| {
            e.held.execution_id == execution_id && e.held.last_event_id == last_event_id
        }) {
            e.held.kv = Some(kv);
        }
    }

    /// `read` found `instance`'s history long and held no entry of it.
    pub(crate) fn want(&self, instance: &str) {
        if self.max_events == 0 {
            return;
        }
        let mut s = self.state();
        if s.wanted.len() >= WANTED_MAX {
            s.wanted.clear();
        }
        s.wanted.insert(instance.to_string());
    }

    /// Whether `read` found `instance`'s history long before (forgets it).
    pub(crate) fn take_wanted(&self, instance: &str) -> bool {
        self.max_events > 0 && self.state().wanted.remove(instance)
    }

    /// Drops `instance`'s entry (its execution ended, or its read failed).
    pub(crate) fn forget(&self, instance: &str) {
        if self.max_events == 0 {
            return;
        }
        self.state().remove(instance);
    }

    /// Events held in total (tests).
    #[cfg(test)]
    fn len_events(&self) -> usize {
        self.state().events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duroxide::EventKind;

    fn history(instance: &str, n: u64) -> Vec<Event> {
        (1..=n)
            .map(|id| {
                Event::with_event_id(
                    id,
                    instance,
                    1,
                    None,
                    EventKind::ExternalEvent {
                        name: "e".into(),
                        data: "d".into(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn bound_evicts_least_recently_used() {
        let c = HistoryCache::new(10);
        c.store("a", 1, &history("a", 4), Some((4, 7)), None);
        c.store("b", 1, &history("b", 4), Some((4, 7)), None);
        assert!(c.held("a", 1).is_some()); // a is now the most recent
        c.store("c", 1, &history("c", 4), Some((4, 7)), None);
        assert!(c.held("b", 1).is_none(), "b was least recently used");
        assert!(c.held("a", 1).is_some());
        assert!(c.held("c", 1).is_some());
        assert_eq!(c.len_events(), 8);
        c.store("big", 1, &history("big", 11), Some((11, 7)), None);
        assert!(c.held("big", 1).is_none(), "larger than the bound alone");
        assert_eq!(c.len_events(), 8);
    }

    #[test]
    fn one_entry_per_instance_and_execution_must_match() {
        let c = HistoryCache::new(100);
        c.store("a", 1, &history("a", 3), Some((3, 1)), None);
        assert!(c.held("a", 2).is_none());
        c.store("a", 2, &history("a", 2), Some((2, 9)), None);
        assert!(
            c.held("a", 1).is_none(),
            "continue-as-new replaced execution 1"
        );
        let h = c.held("a", 2).unwrap();
        assert_eq!((h.last_event_id, h.guard, h.events.len()), (2, 9, 2));
        assert_eq!(c.len_events(), 2);
        c.forget("a");
        assert!(c.held("a", 2).is_none());
        assert_eq!(c.len_events(), 0);
    }

    #[test]
    fn an_ack_extends_the_entry_its_turn_read() {
        let c = HistoryCache::new(100);
        let kv = Arc::new(vec![("k".to_string(), "v".to_string(), 1)]);
        // A first turn's empty history is kept only with its KV snapshot.
        c.store("a", 1, &[], None, None);
        assert!(c.held("a", 1).is_none());
        c.store("a", 1, &[], None, Some(kv.clone()));
        let h = c.held("a", 1).unwrap();
        assert_eq!((h.last_event_id, h.events.len()), (0, 0));
        assert_eq!(c.len_events(), 1, "an empty entry still counts");

        // The ack appended events 1..=3 and returned the last one's guard.
        let all = history("a", 5);
        c.extend("a", 1, &all[..3], Some(42));
        let h = c.held("a", 1).unwrap();
        assert_eq!((h.last_event_id, h.guard, h.events.len()), (3, 42, 3));
        assert!(h.kv.is_some(), "the execution goes on: the snapshot stays");

        // Without a guard the entry stays as the turn read it.
        c.extend("a", 1, &all[3..4], None);
        assert_eq!(c.held("a", 1).unwrap().last_event_id, 3);
        // Ids that do not follow on (event 4 was never added here), or another
        // execution: the entry goes.
        c.extend("a", 1, &all[4..5], Some(7));
        assert!(c.held("a", 1).is_none());
        c.store("a", 1, &all[..3], Some((3, 1)), Some(kv.clone()));
        c.extend("a", 2, &history("a", 1), Some(7));
        assert!(c.held("a", 1).is_none());

        // An empty entry the ack cannot extend (no guard) goes.
        c.store("b", 1, &[], None, Some(kv.clone()));
        c.extend("b", 1, &history("b", 2), None);
        assert!(c.held("b", 1).is_none());

        // Events that end the execution drop the KV snapshot (kv_store changed).
        c.store("d", 1, &history("d", 2), Some((2, 1)), Some(kv));
        let end = Event::with_event_id(
            3,
            "d",
            1,
            None,
            EventKind::OrchestrationCompleted { output: "o".into() },
        );
        c.extend("d", 1, &[end], Some(9));
        let h = c.held("d", 1).unwrap();
        assert_eq!((h.last_event_id, h.events.len()), (3, 3));
        assert!(h.kv.is_none());
    }

    #[test]
    fn wanted_is_taken_once_bounded_and_off_with_the_cache() {
        let c = HistoryCache::new(100);
        c.want("a");
        assert!(c.take_wanted("a"));
        assert!(!c.take_wanted("a"), "taken once");
        for i in 0..=WANTED_MAX {
            c.want(&format!("i{i}"));
        }
        assert!(c.state().wanted.len() <= WANTED_MAX);
        assert!(
            c.take_wanted(&format!("i{WANTED_MAX}")),
            "the newest is kept"
        );
        let off = HistoryCache::new(0);
        off.want("a");
        assert!(!off.take_wanted("a"));
    }

    #[test]
    fn hints_skip_short_histories_and_zero_disables() {
        let c = HistoryCache::new(1_000);
        c.store("short", 1, &history("short", 3), Some((3, 1)), None);
        c.store(
            "long",
            1,
            &history("long", HINT_MIN_EVENTS as u64),
            Some((32, 1)),
            None,
        );
        let hints = c.hints();
        assert_eq!(hints.len(), 1);
        assert_eq!(hints[0].0, "long");
        let off = HistoryCache::new(0);
        off.store("a", 1, &history("a", 3), Some((3, 1)), None);
        assert!(off.held("a", 1).is_none());
        assert!(off.hints().is_empty());
    }
}
