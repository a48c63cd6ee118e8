//! An orchestration turn, by lease lifecycle: the claim (`claim.rs`), the turn's reads
//! (`reads.rs` on the hybrid path, `procedure.rs` on the full-procedure path), the ack
//! (`ack.rs`), and renew/abandon (`lease.rs`).
//!
//! `fetch_orchestration_item` claims an instance (one round trip, `sp_fetch_and_lock`),
//! then loads what the turn needs. Two interchangeable paths share the claim and the
//! read functions:
//!
//! * hybrid: the claim (which returns the batch and the instance's name), then history
//!   and KV read concurrently on separate pooled connections (the history alone for an
//!   execution whose last turn ran here, `reads.rs`), so the serial depth is 2 round
//!   trips;
//! * procedure: `fetch_orchestration_turn`, claim and reads in one call (1 round trip).
//!
//! Both read only the history events this process has not seen yet when it ran the
//! instance's execution before (`crate::history_cache`).
//!
//! Both end in [`assemble`], so the item handed to duroxide is built by one piece of code
//! whichever path fetched it.

pub(crate) mod ack;
mod claim;
mod lease;
mod procedure;
mod reads;

pub(crate) use claim::{SP_FETCH_AND_LOCK, claim_args};
pub(crate) use lease::{ABANDON_TURN, RENEW_TURN};
pub(crate) use procedure::{FETCH_ORCHESTRATION_FULL, FETCH_ORCHESTRATION_TURN, TurnData};
pub(crate) use reads::{
    READ_BATCH_MESSAGES, READ_EXECUTION_HISTORY, READ_HISTORY_SINCE, READ_INSTANCE_META,
    READ_KV_SNAPSHOT,
};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duroxide::providers::{
    DispatcherCapabilityFilter, KvEntry, OrchestrationItem, ProviderError, WorkItem,
};
use duroxide::{Event, EventKind};

use crate::codec::{decode_history, decode_messages_strict, event_type};
use crate::handover::{ClaimSpec, Handed};
use crate::history_cache::{Held, HistoryCache, KvRows};
use crate::notify::{Interest, Queue};
use crate::options::FetchPath;
use crate::poll::Attempt;
use crate::provider::{PostgresProvider, TRACING_TARGET};
use crate::sql_fn::Args;

pub(crate) const OP: &str = "fetch_orchestration_item";

/// Arguments of the claim: lease length and the capability filter as SQL values.
#[derive(Debug, Clone)]
pub(crate) struct ClaimArgs {
    pub lock_timeout_ms: i64,
    pub filter_enabled: bool,
    pub min: (i32, i32, i32),
    pub max: (i32, i32, i32),
}

impl ClaimArgs {
    /// `None` when the filter admits nothing (an empty range list): no call is needed.
    fn new(lock_timeout: Duration, filter: Option<&DispatcherCapabilityFilter>) -> Option<Self> {
        let lock_timeout_ms = crate::codec::millis(lock_timeout);
        let Some(filter) = filter else {
            return Some(Self {
                lock_timeout_ms,
                filter_enabled: false,
                min: (0, 0, 0),
                max: (0, 0, 0),
            });
        };
        // duroxide's contract ("phase 1"): only the first range is honoured.
        let range = filter.supported_duroxide_versions.first()?;
        let v = |v: &semver::Version| (clamp(v.major), clamp(v.minor), clamp(v.patch));
        Some(Self {
            lock_timeout_ms,
            filter_enabled: true,
            min: v(&range.min),
            max: v(&range.max),
        })
    }
}

impl ClaimArgs {
    /// What a call that claims nothing sends (a hand-over function without a waiter).
    pub(crate) const NONE: Self = Self {
        lock_timeout_ms: 0,
        filter_enabled: false,
        min: (0, 0, 0),
        max: (0, 0, 0),
    };

    /// Binds the claim's arguments, declared with the same names in the same order by
    /// every function listed with `claim_args!`.
    pub(crate) fn bind_to(&self, args: Args) -> Args {
        args.bind("p_lock_timeout_ms", self.lock_timeout_ms)
            .bind("p_filter_enabled", self.filter_enabled)
            .bind("p_min_major", self.min.0)
            .bind("p_min_minor", self.min.1)
            .bind("p_min_patch", self.min.2)
            .bind("p_max_major", self.max.0)
            .bind("p_max_minor", self.max.1)
            .bind("p_max_patch", self.max.2)
    }
}

fn clamp(v: u64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// A won claim: its keys, and the batch when the claiming call returned it.
#[derive(Debug)]
pub(crate) struct Claim {
    pub instance: String,
    pub lock_token: String,
    pub execution_id: i64,
    pub attempt_count: i32,
    /// The tagged messages and the instance row's name and version, as the claim found
    /// them (`sp_fetch_and_lock`, and a hand-over's `claim_instance_turn`): the hybrid
    /// path then does not read them. `None`: read them.
    pub batch: Option<Box<Batch>>,
}

/// What a claiming call returns of its turn besides the keys.
#[derive(Debug)]
pub(crate) struct Batch {
    pub messages: Vec<String>,
    /// `Some((name, version))` when the instance row exists.
    pub meta: Option<(String, Option<String>)>,
}

impl Batch {
    /// From a claiming call's columns; `None` when it returned no batch.
    pub(crate) fn from_columns(
        messages: Option<Vec<String>>,
        has_instance: Option<bool>,
        name: Option<String>,
        version: Option<String>,
    ) -> Option<Box<Self>> {
        Some(Box::new(Self {
            messages: messages?,
            meta: name
                .filter(|_| has_instance.unwrap_or(false))
                .map(|n| (n, version)),
        }))
    }
}

/// Raw rows of a claimed turn, as either path loaded them.
pub(crate) struct TurnRows {
    pub claim: Claim,
    /// `Some((name, version))` when the instance row exists.
    pub meta: Option<(String, Option<String>)>,
    pub messages: Vec<String>,
    pub history: HistoryRows,
    pub kv: Arc<KvRows>,
}

/// A turn's history as read: the events this process held plus the rows read after them
/// (an incremental read), or every row of the execution (`held: None`).
pub(crate) struct HistoryRows {
    pub held: Option<Arc<Vec<Event>>>,
    pub rows: Vec<String>,
    /// `(event_id, guard)` of the execution's last event, for the cache; `None` for an
    /// empty history.
    pub last: Option<(i64, i64)>,
    /// The held entry's KV snapshot, while it is still `kv_store`'s content: see
    /// [`Self::carried_kv`].
    kv: Option<Arc<KvRows>>,
}

impl HistoryRows {
    /// Combines a `read_history_since` result with what was sent to it. `incremental`
    /// without `held` cannot happen (the database only answers incrementally to an
    /// entry it was given); it is treated as "nothing held" by the caller's check.
    pub(crate) fn from_read(
        incremental: bool,
        held: Option<&Held>,
        rows: Vec<String>,
        last_event_id: Option<i64>,
        last_guard: Option<i64>,
    ) -> Result<Self, String> {
        let (held, kv) = match (incremental, held) {
            (false, _) => (None, None),
            (true, Some(h)) => {
                // kv_store changes only in the ack that ends an execution (05_ack.sql),
                // and that ack appends the event that ends it.
                let ended = rows.iter().any(|r| ends_execution(event_type(r)));
                (Some(h.events.clone()), h.kv.clone().filter(|_| !ended))
            }
            (true, None) => {
                return Err("history read answered incrementally to no cache entry".into());
            }
        };
        let label = if held.is_some() {
            "incremental"
        } else {
            "full"
        };
        metrics::counter!("duroxide_pg_history_reads_total", "read" => label).increment(1);
        metrics::counter!("duroxide_pg_history_rows_read_total").increment(rows.len() as u64);
        Ok(Self {
            held,
            rows,
            last: last_event_id.zip(last_guard),
            kv,
        })
    }

    /// The KV snapshot held with the cache entry when it is still `kv_store`'s content:
    /// the read was incremental (same instance, same execution, rows only appended) and
    /// no row read ends the execution. `None`: the turn must read KV.
    pub(crate) fn carried_kv(&self) -> Option<Arc<KvRows>> {
        self.kv.clone()
    }

    /// The whole history of `instance`'s execution `execution_id`: the held events, then
    /// the rows read. The cache entry becomes that history (left as it is when nothing
    /// was new; dropped first otherwise, so the held events are usually taken over
    /// without a copy), or is dropped when the rows do not decode or nothing was read.
    /// `kv`: the KV snapshot a turn read with these rows (`None` from `read`, which
    /// keeps the entry's snapshot while [`Self::carried_kv`] has it).
    pub(crate) fn into_history(
        self,
        cache: &HistoryCache,
        instance: &str,
        execution_id: i64,
        kv: Option<Arc<KvRows>>,
    ) -> Result<Vec<Event>, String> {
        let Self {
            held,
            rows,
            last,
            kv: carried,
        } = self;
        let kv = kv.or(carried);
        if let Some(h) = &held
            && rows.is_empty()
        {
            if let (Some(kv), Some((last_event_id, _))) = (kv, last) {
                cache.attach_kv(instance, execution_id, last_event_id, kv);
            }
            return Ok(h.as_ref().clone());
        }
        let held_len = held.as_ref().map_or(0, |h| h.len());
        if held.is_some() {
            cache.forget(instance);
        }
        let decoded = decode_history(&rows).map(|new| match held {
            Some(h) => {
                let mut all = Arc::unwrap_or_clone(h);
                all.extend(new);
                all
            }
            None => new,
        });
        match &decoded {
            Ok(h) => cache.store(instance, execution_id, h, last, kv),
            Err(_) => cache.forget(instance),
        }
        // Row numbers in the message count from the first row read.
        decoded.map_err(|e| {
            if held_len > 0 {
                format!("{e} (after {held_len} cached events)")
            } else {
                e
            }
        })
    }
}

impl PostgresProvider {
    pub(crate) async fn fetch_orchestration(
        &self,
        lock_timeout: Duration,
        poll_timeout: Duration,
        filter: Option<&DispatcherCapabilityFilter>,
    ) -> Result<Option<(OrchestrationItem, String, u32)>, ProviderError> {
        let Some(args) = ClaimArgs::new(lock_timeout, filter) else {
            return Ok(None);
        };
        let started = Instant::now();
        let args = Arc::new(args);
        let mut interest = Interest::any(Queue::Orchestrator);
        interest.claim = self
            .handover_enabled()
            .then(|| ClaimSpec::Turn(args.clone()));
        interest.quiet_key = Some((args.filter_enabled, args.min, args.max));
        let args = &*args;
        let rows = self
            .poll_for(interest, poll_timeout, |handed| async move {
                match handed {
                    None => match self.fetch_path() {
                        FetchPath::Hybrid => self.fetch_hybrid(args).await,
                        FetchPath::Procedure => self.fetch_procedure(args).await,
                    },
                    Some(Handed::Turn(rows)) => Ok(Attempt::Claimed(*rows)),
                    Some(Handed::Claim(claim)) => self.read_claimed(claim).await,
                    Some(other) => {
                        // Never happens (worker items go to worker fetches); give it
                        // back rather than lose it.
                        self.release_handed(other).await;
                        Ok(Attempt::Empty { wake_in: None })
                    }
                }
            })
            .await?;
        let Some(rows) = rows else {
            return Ok(None);
        };
        let fetched = assemble(rows, &self.inner.history_cache);
        tracing::debug!(
            target: TRACING_TARGET,
            operation = OP,
            instance = %fetched.0.instance,
            execution_id = fetched.0.execution_id,
            messages = fetched.0.messages.len(),
            history = fetched.0.history.len(),
            attempt = fetched.2,
            fetch_path = %self.fetch_path(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "claimed orchestration turn"
        );
        Ok(Some(fetched))
    }

    async fn fetch_hybrid(&self, args: &ClaimArgs) -> Result<Attempt<TurnRows>, ProviderError> {
        match self.claim(args).await? {
            Attempt::Claimed(c) => self.read_claimed(c).await,
            Attempt::Empty { wake_in } => Ok(Attempt::Empty { wake_in }),
        }
    }

    /// The hybrid path's second round trip: the claimed turn's concurrent reads.
    async fn read_claimed(&self, claim: Claim) -> Result<Attempt<TurnRows>, ProviderError> {
        // A future dropped during the reads (runtime shutdown) leaves the claim to its
        // lease, exactly like a dropped procedure-path call that the server committed:
        // the instance stays hidden until the lease runs out, and nothing is lost.
        let mut claim = claim;
        let batch = claim.batch.take();
        match self.read_turn(&claim, batch).await {
            Ok(reads) => Ok(Attempt::Claimed(TurnRows {
                claim,
                meta: reads.meta,
                messages: reads.messages,
                history: reads.history,
                kv: reads.kv,
            })),
            Err(e) => {
                // Never return an error while holding a lease: give the instance back
                // (attempt not counted, messages visible at once) and report the error.
                self.release_claim(&claim.lock_token, &claim.instance).await;
                Err(e)
            }
        }
    }
}

/// Whether an event of this type ends its execution (`Event::is_terminal`).
fn ends_execution(event_type: &str) -> bool {
    matches!(
        event_type,
        "OrchestrationCompleted" | "OrchestrationFailed" | "OrchestrationContinuedAsNew"
    )
}

/// Claim contention: candidates a claim passed over (rows held by concurrent claims,
/// leases won by others, instances not runnable yet).
fn record_skipped(skipped: Option<i32>) {
    if let Some(n) = skipped.filter(|n| *n > 0) {
        metrics::counter!("duroxide_pg_claim_skipped_candidates_total").increment(n as u64);
    }
}

/// Builds the item duroxide sees from the raw rows of either path, and records the
/// history in the cache.
fn assemble(rows: TurnRows, cache: &HistoryCache) -> (OrchestrationItem, String, u32) {
    let TurnRows {
        claim,
        meta,
        messages,
        history,
        kv,
    } = rows;
    let instance = claim.instance;
    // A message that does not decode is never dropped: the turn goes to duroxide with
    // history_error, which retries it and poisons the instance after max attempts, the
    // way it treats history it cannot read.
    let (messages, message_error) = match decode_messages_strict(&instance, &messages) {
        Ok(m) => (m, None),
        Err(e) => {
            tracing::warn!(
                target: TRACING_TARGET,
                operation = OP,
                instance = %instance,
                error = %e,
                "queued message does not decode; handing the turn to duroxide with history_error"
            );
            (Vec::new(), Some(e))
        }
    };
    let decoded = history.into_history(cache, &instance, claim.execution_id, Some(kv.clone()));
    let (history, history_error) = match decoded {
        Ok(_) if message_error.is_some() => (Vec::new(), message_error),
        Ok(h) => (h, None),
        Err(e) => {
            tracing::warn!(
                target: TRACING_TARGET,
                operation = OP,
                instance = %instance,
                error = %e,
                "history does not decode; handing the turn to duroxide with history_error"
            );
            (Vec::new(), Some(format!("instance {instance:?}: {e}")))
        }
    };
    let mut execution_id = u64::try_from(claim.execution_id).unwrap_or(1);
    let (name, version) = match meta {
        Some((name, version)) => (name, version.unwrap_or_else(|| "unknown".to_string())),
        None => {
            // No instance row yet (first turn, or acks without metadata): the start
            // event in history, else the start message in the batch.
            let from_history = history.iter().find_map(|e| match &e.kind {
                EventKind::OrchestrationStarted { name, version, .. } => {
                    Some((name.clone(), version.clone()))
                }
                _ => None,
            });
            match from_history {
                Some(nv) => nv,
                None => {
                    execution_id = 1;
                    messages
                        .iter()
                        .find_map(|m| match m {
                            WorkItem::StartOrchestration {
                                orchestration,
                                version,
                                ..
                            }
                            | WorkItem::ContinueAsNew {
                                orchestration,
                                version,
                                ..
                            } => Some((
                                orchestration.clone(),
                                version.clone().unwrap_or_else(|| "unknown".to_string()),
                            )),
                            _ => None,
                        })
                        .unwrap_or_else(|| ("Unknown".to_string(), "unknown".to_string()))
                }
            }
        }
    };
    let kv_snapshot: HashMap<String, KvEntry> = if history_error.is_some() {
        HashMap::new()
    } else {
        kv.iter()
            .map(|(k, value, ts)| {
                (
                    k.clone(),
                    KvEntry {
                        value: value.clone(),
                        last_updated_at_ms: u64::try_from(*ts).unwrap_or(0),
                    },
                )
            })
            .collect()
    };
    let attempts = u32::try_from(claim.attempt_count).unwrap_or(0);
    let item = OrchestrationItem {
        instance,
        orchestration_name: name,
        execution_id,
        version,
        history,
        messages,
        history_error,
        kv_snapshot,
    };
    (item, claim.lock_token, attempts)
}
