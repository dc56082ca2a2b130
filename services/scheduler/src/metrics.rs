//! Counters an operator reads from `$SRV.STATS.turnstile-scheduler` (the `data` of
//! the `schedule` endpoint).

use std::sync::atomic::{AtomicU64, Ordering};

/// The scheduler's counters since start.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Runs stored in the log.
    pub runs_stored: AtomicU64,
    /// Assignments stored in the log.
    pub assignments_stored: AtomicU64,
    /// Runs written as single publishes.
    pub singles_written: AtomicU64,
    /// Atomic batches committed (two or more runs in one write).
    pub batches_committed: AtomicU64,

    /// Atomic batches refused as a whole and rewritten run by run.
    pub batches_refused: AtomicU64,
    /// Writes that lost the race for a slot to another writer.
    pub races_lost: AtomicU64,
    /// Requests answered as duplicates of an earlier message id.
    pub duplicates: AtomicU64,
    /// Faults found in the log (foreign messages, losses): each also a fault event.
    pub faults: AtomicU64,
    /// Heads loaded by reading a whole subject (the tail was not a verified run).
    pub head_scans: AtomicU64,
    /// Dedupe windows built anew (an actor's first load, or a log behind its index).
    pub window_loads: AtomicU64,
    /// Head reloads that kept the dedupe index and read only the messages after the
    /// head it held.
    pub window_reloads: AtomicU64,
    /// Messages read by window loads and reloads (headers only).
    pub window_messages_read: AtomicU64,
    /// Batches that waited because an id's dedupe claim (an unsigned `Ts-Ids` hint)
    /// could not be checked against its run yet (the log could not be read).
    pub dedupe_checks_deferred: AtomicU64,
    /// Requests answered `busy` at intake: an admission bound (bytes or count) was full.
    pub busy: AtomicU64,
    /// Requests answered `busy` after waiting past `max_queue_wait` in their queue.
    pub shed: AtomicU64,
    /// Requests refused `queue_key_held`.
    pub queue_key_held: AtomicU64,
    /// The newest revision of the process-settings bucket this replica applied
    /// (`turnstile process set` waits until every replica reports its write).
    pub settings_revision: AtomicU64,
}

impl Metrics {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "runs_stored": get(&self.runs_stored),
            "assignments_stored": get(&self.assignments_stored),
            "singles_written": get(&self.singles_written),
            "batches_committed": get(&self.batches_committed),

            "batches_refused": get(&self.batches_refused),
            "races_lost": get(&self.races_lost),
            "duplicates": get(&self.duplicates),
            "faults": get(&self.faults),
            "head_scans": get(&self.head_scans),
            "window_loads": get(&self.window_loads),
            "window_reloads": get(&self.window_reloads),
            "window_messages_read": get(&self.window_messages_read),
            "dedupe_checks_deferred": get(&self.dedupe_checks_deferred),
            "busy": get(&self.busy),
            "shed": get(&self.shed),
            "queue_key_held": get(&self.queue_key_held),
            "settings_revision": get(&self.settings_revision),
        })
    }
}
