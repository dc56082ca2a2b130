//! The loader's timer and window decisions, without I/O: which due-index buckets a
//! window load reads and when, which armed alarm comes next and how long the loop
//! sleeps until then, how a dispatch's conclusion arms an alarm again, and what an
//! armed alarm's record says when its time comes (not due yet: when to look again;
//! due: claim it). [`crate::loader::Loader::run`] keeps the I/O (NATS reads and
//! writes, leases, the dispatch tasks) and asks a [`Timeline`] everything else.
//!
//! Two clocks, as in the loop: alarm times are compared with the loader's
//! [`crate::loader::Clock`] (wall ms, `now_ms`), the load interval is counted on
//! tokio's monotonic [`Instant`] (`mono`), so a wall clock that jumps neither stops nor
//! floods the loads. Tests drive both on paused tokio time.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::time::Duration;

use tokio::time::Instant;

use crate::alarm::{bucket_of, partition_of, Record, Status};
use crate::store::DueEntry;

/// How far ahead of their time armed alarms have their records read, in batches.
pub(crate) const PREFETCH_LEAD_MS: u64 = 1_000;
/// Alarms one batch read covers at most.
pub(crate) const PREFETCH_BATCH: usize = 2_048;
/// How many armed alarms a read-ahead looks at (some may be known already).
const PREFETCH_SCAN: usize = 2 * PREFETCH_BATCH;

/// The shortest window-load interval.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// How long an index entry the record does not account for is given to be explained
/// by a record still being written (a set's entry precedes its record).
pub(crate) const ENTRY_GRACE_MS: u64 = 15_000;
/// How soon such an entry is looked at again.
pub(crate) const RECHECK_MS: u64 = 500;
/// How soon an alarm whose dispatch failed, or lost every compare-and-set, is looked
/// at again.
pub(crate) const AGAIN_MS: u64 = 1_000;

/// When to look at an alarm again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rearm {
    /// At this time if it falls in the loaded window (else its entry is loaded later).
    InWindow(u64),
    /// At this time, window or not: no entry will bring it back before a restart.
    Always(u64),
}

/// What a dispatch concluded about its alarm's entries in the due index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entries {
    /// Every one is still needed (or nothing is known).
    Keep,
    /// The alarm's record stored at `seq` decides: the entries stored before it are
    /// obsolete, except those in the bucket of `except` (the time its next action
    /// needs an entry for). Entries stored after it wait for their own record.
    Settled { seq: u64, except: Option<u64> },
}

/// A dispatch's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Next {
    /// When to look at the alarm again, if ever.
    pub(crate) rearm: Option<Rearm>,
    /// Which of its entries are obsolete.
    pub(crate) entries: Entries,
}

impl Next {
    pub(crate) fn settled(rearm: Option<Rearm>, seq: u64, except: Option<u64>) -> Next {
        Next {
            rearm,
            entries: Entries::Settled { seq, except },
        }
    }

    /// Looked at again at `at`, window or not; every entry kept.
    pub(crate) fn keep(at: u64) -> Next {
        Next {
            rearm: Some(Rearm::Always(at)),
            entries: Entries::Keep,
        }
    }

    /// A dispatch that failed (its entry is still there), or lost every
    /// compare-and-set (another loader is on it), at `now`: looked at again shortly.
    pub(crate) fn again(now: u64) -> Next {
        Next::keep(now.saturating_add(AGAIN_MS))
    }

    /// After a dispatch whose outcome `last` was stored at `last_seq`: its next action
    /// (a retry, a backoff), in the window, and the entry that needs.
    pub(crate) fn after_outcome(last: &Record, last_seq: u64, grace_ms: u64) -> Next {
        let next = last.next_action_ms(grace_ms);
        Next::settled(next.map(Rearm::InWindow), last_seq, next)
    }
}

/// An armed alarm whose record was not found at `now`: a young entry may precede its
/// record (looked at again soon); an old one is an orphan, settled.
pub(crate) fn unrecorded(entry: &DueEntry, now: u64) -> Next {
    if young(entry, now) {
        return Next::keep(now.saturating_add(RECHECK_MS));
    }
    Next::settled(None, entry.seq.saturating_add(1), None)
}

/// An armed alarm whose record (stored at `rseq`) was read at `now`: none when it is
/// due (the loader claims it); otherwise when to look at it again and which of its
/// entries the record made obsolete. Replaced to a later time: looked at then; a claim
/// (another loader's, perhaps alive): when its dispatch timeout plus `grace_ms` runs
/// out; final (cancelled, done): never.
pub(crate) fn later(
    entry: &DueEntry,
    record: &Record,
    rseq: u64,
    now: u64,
    grace_ms: u64,
) -> Option<Next> {
    let young = young(entry, now);
    let Some(next) = record.next_action_ms(grace_ms) else {
        if young && entry.seq > rseq {
            return Some(Next::keep(now.saturating_add(RECHECK_MS)));
        }
        return Some(Next::settled(
            None,
            rseq.max(entry.seq.saturating_add(1)),
            None,
        ));
    };
    if next <= now {
        return None;
    }
    Some(match record.status {
        // Replaced or re-armed: its own entry exists (written before the record); this
        // one is obsolete unless it is that one (or the record that needs it is still
        // on its way).
        Status::Pending { .. } => {
            if young && entry.seq > rseq && bucket_of(next) != bucket_of(entry.at_ms) {
                Next::keep(now.saturating_add(RECHECK_MS).min(next))
            } else {
                Next::settled(Some(Rearm::InWindow(next)), rseq, Some(next))
            }
        }
        // Claimed by a loader that may be alive: look again when its claim runs out.
        // Its entries stay: a restart finds the alarm by them, and the sweep cannot
        // pass them.
        _ => Next::keep(next),
    })
}

/// An entry is young for a while after it was written (a record that needs it may
/// still be on its way).
fn young(entry: &DueEntry, now: u64) -> bool {
    now < entry.written_ms.saturating_add(ENTRY_GRACE_MS)
}

/// Per armed alarm: when it is looked at, and the entry that armed it.
type ArmedAt = HashMap<String, (u64, DueEntry)>;

/// The armed alarms (one time per alarm, the earliest) and the loaded window.
#[derive(Debug)]
pub(crate) struct Timeline {
    interval: Duration,
    /// The armed alarms in the order they are looked at.
    armed: BTreeSet<(u64, String)>,
    armed_at: ArmedAt,
    /// Every partition's window is loaded through this bucket; a partition taken over
    /// is caught up to it from its own checkpoint.
    loaded_through: u64,
    /// When the next window load is due (monotonic).
    next_load: Instant,
    /// The last alarm a read-ahead asked for: the next one starts after it.
    ahead: Option<(u64, String)>,
}

impl Timeline {
    /// A timeline loading every `interval` (at least [`MIN_INTERVAL`]), nothing loaded
    /// yet at `now_ms`, the first load due at `mono`.
    pub(crate) fn new(interval: Duration, now_ms: u64, mono: Instant) -> Timeline {
        Timeline {
            interval: interval.max(MIN_INTERVAL),
            armed: BTreeSet::new(),
            armed_at: HashMap::new(),
            loaded_through: bucket_of(now_ms).saturating_sub(1),
            next_load: mono,
            ahead: None,
        }
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the window load (with the sweep, cron planning and the retry of failed
    /// catch-ups) is due.
    pub(crate) fn load_due(&self, mono: Instant) -> bool {
        mono >= self.next_load
    }

    /// How far a load at `now_ms` reaches: now + 2 × interval (cron ticks are planned
    /// up to there too).
    pub(crate) fn horizon(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(2 * self.interval_ms())
    }

    /// The buckets a load at `now_ms` reads: those after the ones loaded, through the
    /// bucket of the horizon; none if they are all loaded (a clock that went back).
    pub(crate) fn window(&self, now_ms: u64) -> Option<RangeInclusive<u64>> {
        let until = bucket_of(self.horizon(now_ms));
        (self.loaded_through < until).then(|| self.loaded_through + 1..=until)
    }

    /// The window was read through bucket `until`.
    pub(crate) fn loaded(&mut self, until: u64) {
        self.loaded_through = until;
    }

    /// The load's round ended at `mono`: the next one is due an interval later.
    pub(crate) fn load_done(&mut self, mono: Instant) {
        self.next_load = mono + self.interval;
    }

    /// The last bucket loaded.
    pub(crate) fn loaded_through(&self) -> u64 {
        self.loaded_through
    }

    /// Whether an entry due at `at_ms` falls in the loaded window (a watched entry is
    /// armed at once if so; else its bucket's load brings it).
    pub(crate) fn in_window(&self, at_ms: u64) -> bool {
        bucket_of(at_ms) <= self.loaded_through
    }

    /// Arms `entry` for its own time.
    pub(crate) fn arm(&mut self, entry: DueEntry) -> bool {
        self.arm_at(entry.at_ms, entry)
    }

    /// Arms `entry` to be looked at at `at` (keeps the earliest time per alarm, with its
    /// entry, and the youngest write time).
    pub(crate) fn arm_at(&mut self, mut at: u64, mut entry: DueEntry) -> bool {
        if !crate::alarm::is_token(&entry.id, crate::alarm::MAX_ID) {
            return false;
        }
        if let Some((old_at, old)) = self.armed_at.get(&entry.id) {
            let written_ms = entry.written_ms.max(old.written_ms);
            if *old_at <= at {
                at = *old_at;
                entry = old.clone();
            } else {
                self.armed.remove(&(*old_at, entry.id.clone()));
            }
            entry.written_ms = written_ms;
        }
        self.armed.insert((at, entry.id.clone()));
        self.armed_at.insert(entry.id.clone(), (at, entry));
        true
    }

    /// A dispatch of `entry` concluded `next`: armed again when it says so (`InWindow`
    /// only inside the loaded window: beyond it its entry is loaded with its bucket).
    pub(crate) fn rearm(&mut self, next: &Next, entry: DueEntry) {
        match next.rearm {
            // Looked at later for the same entry: it keeps its subject.
            Some(Rearm::Always(at)) => {
                self.arm_at(at, entry);
            }
            // Looked at again, the entry keeps its write time.
            Some(Rearm::InWindow(at)) if self.in_window(at) => {
                self.arm(DueEntry { at_ms: at, ..entry });
            }
            _ => {}
        }
    }

    /// The first armed alarm if its time has come at `now_ms`, disarmed, with the entry
    /// that armed it. An entry "written" in the future (a skewed or a forged clock) is
    /// young from now on only: its grace must run out, or it would be looked at
    /// forever.
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<DueEntry> {
        let (at, _) = self.armed.first()?;
        if *at > now_ms {
            return None;
        }
        let (at, id) = self.armed.pop_first()?;
        let mut entry = self.armed_at.remove(&id).map_or(
            DueEntry {
                id,
                at_ms: at,
                written_ms: 0,
                seq: 0,
            },
            |(_, e)| e,
        );
        entry.written_ms = entry.written_ms.min(now_ms);
        Some(entry)
    }

    /// How long the loop may sleep at `now_ms` (`mono`): until the first armed alarm,
    /// and no later than the next load.
    pub(crate) fn wake(&self, now_ms: u64, mono: Instant) -> Duration {
        self.armed
            .first()
            .map(|(at, _)| Duration::from_millis(at.saturating_sub(now_ms)))
            .unwrap_or(self.interval)
            .min(self.until_load(mono))
    }

    /// How long until the next load (`mono`).
    pub(crate) fn until_load(&self, mono: Instant) -> Duration {
        self.next_load.saturating_duration_since(mono)
    }

    /// Whether an armed alarm is due at `now_ms`.
    pub(crate) fn has_due(&self, now_ms: u64) -> bool {
        self.armed.first().is_some_and(|(at, _)| *at <= now_ms)
    }

    /// The alarms whose records are worth reading ahead in one batch at `now_ms` (those
    /// due within [`PREFETCH_LEAD_MS`] not `known` yet, among the [`PREFETCH_SCAN`]
    /// armed after the last batch asked for), when the earliest of them is half the
    /// lead away and there are more than one. The loop asks this after every event, so
    /// it costs a batch's walk only when it gives one: a backlog read ahead is not
    /// walked again each time. An alarm armed before the last batch's end since then
    /// is read when it fires.
    pub(crate) fn read_ahead(
        &mut self,
        now_ms: u64,
        known: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        use std::ops::Bound;
        let horizon = now_ms.saturating_add(PREFETCH_LEAD_MS);
        // A mark past the horizon: the clock went back; start over.
        let from = match &self.ahead {
            Some(k) if k.0 <= horizon => Bound::Excluded(k.clone()),
            _ => Bound::Unbounded,
        };
        let mut unknown = self
            .armed
            .range((from, Bound::Unbounded))
            .take(PREFETCH_SCAN)
            .take_while(|(at, _)| *at <= horizon)
            .filter(|(_, id)| !known(id))
            .peekable();
        let soon = unknown
            .peek()
            .is_some_and(|(at, _)| *at <= now_ms.saturating_add(PREFETCH_LEAD_MS / 2));
        if !soon {
            return None;
        }
        let wanted: Vec<&(u64, String)> = unknown.take(PREFETCH_BATCH).collect();
        if wanted.len() < 2 {
            return None;
        }
        self.ahead = wanted.last().map(|k| (*k).clone());
        Some(wanted.into_iter().map(|(_, id)| id.clone()).collect())
    }

    /// Whether alarm `id` is armed.
    pub(crate) fn is_armed(&self, id: &str) -> bool {
        self.armed_at.contains_key(id)
    }

    /// Partition `p` given up: its alarms are disarmed.
    pub(crate) fn forget(&mut self, p: u32) {
        self.armed.retain(|(_, id)| partition_of(id) != p);
        self.armed_at.retain(|id, _| partition_of(id) != p);
    }

    /// How many alarms are armed.
    pub(crate) fn len(&self) -> usize {
        self.armed.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::alarm::{Alarm, Event, RetryPolicy, Target, BUCKET_MS};
    use crate::loader::{Clock, Metrics};

    /// A bucket's start: the injected clock starts here (or a little after).
    const T0: u64 = 1_700_000_000_000;
    const B0: u64 = T0 / BUCKET_MS;
    const INTERVAL: Duration = Duration::from_secs(10);
    const GRACE: u64 = 2_000;
    const TIMEOUT: u64 = 5_000;

    fn alarm(id: &str, due_ms: u64) -> Alarm {
        Alarm {
            id: id.into(),
            due_ms,
            target: Target::Subject("work.x".into()),
            body: Vec::new(),
            headers: Vec::new(),
            dispatch_timeout_ms: TIMEOUT,
            retry: RetryPolicy::default(),
            cron: None,
        }
    }

    fn entry(id: &str, at_ms: u64, written_ms: u64, seq: u64) -> DueEntry {
        DueEntry {
            id: id.into(),
            at_ms,
            written_ms,
            seq,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// What the target answers a dispatch.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Ok,
        RetryIn(u64),
    }

    /// A claim won: the alarm, its due time then, and the injected clock's reading.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Firing {
        id: String,
        due_ms: u64,
        at_ms: u64,
    }

    fn firing(id: &str, due_ms: u64, at_ms: u64) -> Firing {
        Firing {
            id: id.into(),
            due_ms,
            at_ms,
        }
    }

    /// `Loader::run`'s timer part on paused tokio time, with the store and the target
    /// in memory: the same timeline calls in the same order (window load when due,
    /// then what is due, then a tokio sleep of `wake`), and `Loader::dispatch`'s
    /// decisions (`later`, `unrecorded`, `Next::after_outcome`) around the claim.
    /// The clock is the paused tokio `Instant` as wall ms, plus a skew a test sets.
    struct Loop {
        timeline: Timeline,
        clock: Clock,
        skew: Arc<AtomicI64>,
        origin: Instant,
        /// The due index: bucket → alarm → its entry there.
        index: BTreeMap<u64, BTreeMap<String, DueEntry>>,
        /// Each alarm's last record and its sequence.
        records: HashMap<String, (Record, u64)>,
        seq: u64,
        answers: HashMap<String, VecDeque<Answer>>,
        /// The window loads: when (tokio time since the start) and which buckets.
        loads: Vec<(Duration, RangeInclusive<u64>)>,
        fired: Vec<Firing>,
        metrics: Metrics,
    }

    impl Loop {
        /// A loop whose clock reads `start_ms` now.
        fn new(start_ms: u64) -> Loop {
            let origin = Instant::now();
            let skew = Arc::new(AtomicI64::new(0));
            let s = Arc::clone(&skew);
            let clock: Clock = Arc::new(move || {
                let elapsed = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
                start_ms
                    .saturating_add(elapsed)
                    .saturating_add_signed(s.load(Ordering::SeqCst))
            });
            Loop {
                timeline: Timeline::new(INTERVAL, clock(), origin),
                clock,
                skew,
                origin,
                index: BTreeMap::new(),
                records: HashMap::new(),
                seq: 0,
                answers: HashMap::new(),
                loads: Vec::new(),
                fired: Vec::new(),
                metrics: Metrics::default(),
            }
        }

        fn now(&self) -> u64 {
            (self.clock)()
        }

        fn record(&self, id: &str) -> Record {
            self.records[id].0.clone()
        }

        fn append(&mut self, record: Record) -> u64 {
            self.seq += 1;
            self.records
                .insert(record.alarm.id.clone(), (record, self.seq));
            self.seq
        }

        /// An entry stored in the index, then seen by the loop's watch: armed at once
        /// if it falls in the loaded window.
        fn put_due(&mut self, id: &str, at_ms: u64) {
            self.seq += 1;
            let e = entry(id, at_ms, self.now(), self.seq);
            self.index
                .entry(bucket_of(at_ms))
                .or_default()
                .insert(id.into(), e.clone());
            if self.timeline.in_window(at_ms) {
                self.timeline.arm(e);
            }
        }

        fn remove_due(&mut self, id: &str, at_ms: u64) {
            if let Some(b) = self.index.get_mut(&bucket_of(at_ms)) {
                b.remove(id);
            }
        }

        /// A client sets (or replaces) `id`, as the API does: the entry (never behind
        /// the present), the record, then the old entry removed.
        fn set(&mut self, id: &str, due_ms: u64) {
            let now = self.now();
            let old = self.records.get(id).and_then(|(r, _)| r.next_action_ms(0));
            let at = due_ms.max(now);
            self.put_due(id, at);
            self.append(Record::set(alarm(id, due_ms), now));
            if let Some(old_at) = old.filter(|o| bucket_of(*o) != bucket_of(at)) {
                self.remove_due(id, old_at);
            }
        }

        /// A client cancels `id`, as the API does.
        fn cancel(&mut self, id: &str) {
            let record = self.record(id);
            let cancelled = record.cancelled(self.now()).expect("not final");
            self.append(cancelled);
            if let Some(at) = record.next_action_ms(0) {
                self.remove_due(id, at);
            }
        }

        /// One round of the loop; how long it may sleep.
        fn round(&mut self) -> Duration {
            let now = self.now();
            let mono = Instant::now();
            if self.timeline.load_due(mono) {
                if let Some(window) = self.timeline.window(now) {
                    let until = *window.end();
                    let entries: Vec<DueEntry> = self
                        .index
                        .range(window.clone())
                        .flat_map(|(_, es)| es.values().cloned())
                        .collect();
                    for e in entries {
                        self.timeline.arm(e);
                    }
                    self.timeline.loaded(until);
                    self.loads.push((self.origin.elapsed(), window));
                }
                self.timeline.load_done(mono);
            }
            let mut looked = 0;
            while let Some(entry) = self.timeline.pop_due(now) {
                looked += 1;
                assert!(looked < 1_000, "the loop spins on {entry:?} at {now}");
                let next = self.dispatch(&entry, now);
                self.timeline.rearm(&next, entry);
            }
            self.timeline.wake(now, Instant::now())
        }

        /// `Loader::dispatch` with the store and the target in memory.
        fn dispatch(&mut self, entry: &DueEntry, now: u64) -> Next {
            let Some((record, rseq)) = self.records.get(&entry.id).cloned() else {
                return unrecorded(entry, now);
            };
            if let Some(next) = later(entry, &record, rseq, now, GRACE) {
                return next;
            }
            let Some(claim) = record.claim(now, "L1") else {
                return Next::settled(None, rseq, None);
            };
            self.append(claim.clone());
            self.fired.push(firing(&entry.id, claim.alarm.due_ms, now));
            let answer = self
                .answers
                .get_mut(&entry.id)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Answer::Ok);
            let outcome = match answer {
                Answer::Ok => {
                    let r = claim.delivered(now, None, false);
                    if let Event::Delivered { lateness_ms, .. } = r.event {
                        self.metrics.lateness(lateness_ms);
                    }
                    r
                }
                Answer::RetryIn(n) => claim.retry_asked(now, n, None),
            };
            if let Some(at) = outcome.next_action_ms(GRACE) {
                self.put_due(&entry.id, at);
            }
            let last_seq = self.append(outcome.clone());
            Next::after_outcome(&outcome, last_seq, GRACE)
        }

        /// Runs the loop for `d` of tokio time: its sleeps are tokio sleeps, which
        /// paused time skips through.
        async fn run_for(&mut self, d: Duration) {
            let deadline = Instant::now() + d;
            for _ in 0..100_000 {
                let wake = self.round();
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                tokio::time::sleep(wake.min(deadline - now)).await;
            }
            assert!(
                Instant::now() >= deadline,
                "the loop spins without sleeping"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn alarms_fire_in_due_order_exactly_at_their_due_time() {
        let mut l = Loop::new(T0);
        for (id, ms) in [
            ("a", 7_500),
            ("b", 3_200),
            ("c", 12_000),
            ("d", 3_200),
            ("e", 29_999),
        ] {
            l.set(id, T0 + ms);
        }
        l.run_for(secs(40)).await;
        let want: Vec<Firing> = [
            ("b", 3_200),
            ("d", 3_200),
            ("a", 7_500),
            ("c", 12_000),
            ("e", 29_999),
        ]
        .iter()
        .map(|(id, ms)| firing(id, T0 + ms, T0 + ms))
        .collect();
        assert_eq!(l.fired, want);
        let lateness = &l.metrics.snapshot()["lateness_ms"];
        assert_eq!(lateness["samples"], 5);
        assert_eq!(lateness["max"], 0);
        assert_eq!(lateness["p50"], 0);
        for id in ["a", "b", "c", "d", "e"] {
            assert!(
                matches!(l.record(id).event, Event::Delivered { lateness_ms: 0, .. }),
                "{id}: {:?}",
                l.record(id).event
            );
        }
        assert_eq!(l.timeline.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_load_every_interval_covers_now_to_two_intervals_ahead_by_bucket() {
        // Three seconds into bucket B0.
        let mut l = Loop::new(T0 + 3_000);
        l.set("far", T0 + 45_000); // bucket B0 + 4
        l.run_for(secs(12)).await;
        // At 0 s the buckets of [now, now + 20 s]; at 10 s the one that came in reach.
        assert_eq!(
            l.loads,
            vec![(secs(0), B0..=B0 + 2), (secs(10), B0 + 3..=B0 + 3)]
        );
        assert!(!l.timeline.is_armed("far"), "beyond the window");
        // Set inside the loaded window: armed at once; beyond it: by its bucket's load.
        l.set("near", T0 + 20_000);
        assert!(l.timeline.is_armed("near"));
        l.set("beyond", T0 + 40_001);
        assert!(!l.timeline.is_armed("beyond"));
        l.run_for(secs(40)).await;
        assert_eq!(
            l.loads,
            vec![
                (secs(0), B0..=B0 + 2),
                (secs(10), B0 + 3..=B0 + 3),
                (secs(20), B0 + 4..=B0 + 4),
                (secs(30), B0 + 5..=B0 + 5),
                (secs(40), B0 + 6..=B0 + 6),
                (secs(50), B0 + 7..=B0 + 7),
            ]
        );
        assert_eq!(
            l.fired,
            vec![
                firing("near", T0 + 20_000, T0 + 20_000),
                firing("beyond", T0 + 40_001, T0 + 40_001),
                firing("far", T0 + 45_000, T0 + 45_000),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replacing_an_armed_alarm_moves_its_firing_and_cancelling_it_stops_it() {
        let mut l = Loop::new(T0);
        for (id, ms) in [
            ("later", 5_000),
            ("sooner", 6_000),
            ("gone", 8_000),
            ("kept", 9_000),
        ] {
            l.set(id, T0 + ms);
        }
        l.run_for(secs(1)).await;
        assert_eq!(l.timeline.len(), 4);
        assert!(l.fired.is_empty());
        l.set("later", T0 + 14_000);
        l.set("sooner", T0 + 2_000);
        l.cancel("gone");
        l.run_for(secs(29)).await;
        assert_eq!(
            l.fired,
            vec![
                firing("sooner", T0 + 2_000, T0 + 2_000),
                firing("kept", T0 + 9_000, T0 + 9_000),
                firing("later", T0 + 14_000, T0 + 14_000),
            ]
        );
        assert!(matches!(l.record("gone").status, Status::Cancelled { .. }));
        assert_eq!(l.timeline.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_asked_re_arms_the_alarm_at_now_plus_n() {
        let mut l = Loop::new(T0);
        l.answers.insert(
            "x".into(),
            VecDeque::from([Answer::RetryIn(4_000), Answer::RetryIn(45_000)]),
        );
        l.set("x", T0 + 2_000);
        l.run_for(secs(7)).await;
        assert_eq!(
            l.fired,
            vec![
                firing("x", T0 + 2_000, T0 + 2_000),
                firing("x", T0 + 6_000, T0 + 6_000),
            ]
        );
        // In 45 s: beyond the window (through B0 + 2), so not armed until its bucket
        // is loaded (at 30 s: the window then reaches B0 + 5).
        assert!(!l.timeline.is_armed("x"));
        l.run_for(secs(53)).await;
        assert_eq!(l.fired.len(), 3);
        assert_eq!(l.fired[2], firing("x", T0 + 51_000, T0 + 51_000));
        assert!(matches!(l.record("x").status, Status::Done { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_time_in_the_past_fires_at_once() {
        let mut l = Loop::new(T0);
        l.run_for(secs(5)).await;
        // Indexed at the present (never behind it): armed, and due, at once.
        l.set("late", T0 - 30_000);
        assert_eq!(l.timeline.wake(l.now(), Instant::now()), Duration::ZERO);
        l.run_for(Duration::ZERO).await;
        assert_eq!(l.fired, vec![firing("late", T0 - 30_000, T0 + 5_000)]);
        assert!(matches!(
            l.record("late").event,
            Event::Delivered {
                lateness_ms: 35_000,
                ..
            }
        ));
        // An entry armed behind the present (a catch-up) is due at once too.
        assert!(l.timeline.arm(entry("old", T0 - 60_000, 0, 1)));
        assert_eq!(l.timeline.wake(l.now(), Instant::now()), Duration::ZERO);
        assert_eq!(
            l.timeline.pop_due(l.now()).map(|e| (e.id, e.at_ms)),
            Some(("old".to_string(), T0 - 60_000))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_whose_loader_died_is_taken_over_when_its_dispatch_timeout_runs_out() {
        let mut l = Loop::new(T0);
        l.set("x", T0);
        // Another loader claimed it at T0 and died mid-dispatch.
        let claim = l.record("x").claim(T0, "L2").expect("pending");
        l.append(claim);
        l.run_for(Duration::from_millis(TIMEOUT + GRACE - 1)).await;
        assert!(l.fired.is_empty(), "taken over early: {:?}", l.fired);
        assert!(l.timeline.is_armed("x"));
        l.run_for(secs(10)).await;
        assert_eq!(l.fired, vec![firing("x", T0, T0 + TIMEOUT + GRACE)]);
        assert!(matches!(l.record("x").status, Status::Done { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_that_jumps_neither_fires_early_nor_loses_alarms() {
        let mut l = Loop::new(T0);
        for (id, ms) in [
            ("a", 5_000),
            ("b", 15_000),
            ("c", 25_000),
            ("d", 50_000),
            ("e", 70_000),
        ] {
            l.set(id, T0 + ms);
        }
        l.run_for(secs(2)).await;
        assert!(l.fired.is_empty());
        // Forward 30 s: what is due by the new reading fires at once, in order.
        l.skew.store(30_000, Ordering::SeqCst);
        l.run_for(Duration::ZERO).await;
        assert_eq!(
            l.fired,
            vec![
                firing("a", T0 + 5_000, T0 + 32_000),
                firing("b", T0 + 15_000, T0 + 32_000),
                firing("c", T0 + 25_000, T0 + 32_000),
            ]
        );
        // The next load (10 s on the monotonic clock) reads every bucket up to the new
        // horizon: none is skipped.
        l.run_for(secs(8)).await;
        assert_eq!(l.loads.last(), Some(&(secs(10), B0 + 3..=B0 + 6)));
        assert!(l.timeline.is_armed("d"));
        // Back 40 s: the clock reads T0 again; d waits for it to reach its time.
        l.skew.store(-10_000, Ordering::SeqCst);
        l.run_for(secs(75)).await;
        assert_eq!(
            &l.fired[3..],
            &[
                firing("d", T0 + 50_000, T0 + 50_000),
                firing("e", T0 + 70_000, T0 + 70_000),
            ]
        );
        for f in &l.fired {
            assert!(f.at_ms >= f.due_ms, "fired early: {f:?}");
        }
        // Loads resumed when the horizon passed the loaded window: each bucket once.
        let loaded: Vec<u64> = l.loads.iter().flat_map(|(_, r)| r.clone()).collect();
        assert_eq!(loaded, (B0..=B0 + 9).collect::<Vec<_>>());
        assert_eq!(l.loads[2].0, secs(60), "no load while the clock was behind");
    }

    #[test]
    fn a_record_says_when_its_alarm_is_looked_at_again() {
        let now = T0 + 20_000;
        // Written long ago (not young), sequence 5.
        let e = entry("x", T0 + 20_000, T0, 5);
        let set = Record::set(alarm("x", T0 + 20_000), T0);
        assert_eq!(later(&e, &set, 6, now, GRACE), None, "due: claim it");
        // Replaced to later: looked at then, in the window; entries before the
        // record obsolete except the one it needs.
        let moved = Record::set(alarm("x", T0 + 44_000), T0 + 1_000);
        assert_eq!(
            later(&e, &moved, 6, now, GRACE),
            Some(Next::settled(
                Some(Rearm::InWindow(T0 + 44_000)),
                6,
                Some(T0 + 44_000)
            ))
        );
        // Cancelled: never again, its entries obsolete.
        let cancelled = set.cancelled(T0 + 1_000).expect("pending");
        assert_eq!(
            later(&e, &cancelled, 6, now, GRACE),
            Some(Next::settled(None, 6, None))
        );
        // Claimed by another loader: when its dispatch timeout plus the grace ends.
        let claimed = set.claim(T0 + 19_000, "L2").expect("pending");
        let end = T0 + 19_000 + TIMEOUT + GRACE;
        assert_eq!(later(&e, &claimed, 6, now, GRACE), Some(Next::keep(end)));
        assert_eq!(later(&e, &claimed, 6, end, GRACE), None, "taken over");
        // A young entry newer than the record (its record is on its way): soon again.
        let young = entry("x", T0 + 50_000, now - 1_000, 9);
        assert_eq!(
            later(&young, &moved, 6, now, GRACE),
            Some(Next::keep(now + RECHECK_MS))
        );
        assert_eq!(
            later(&young, &cancelled, 6, now, GRACE),
            Some(Next::keep(now + RECHECK_MS))
        );
        // No record: young, soon again; old, an orphan settled through its sequence.
        assert_eq!(unrecorded(&young, now), Next::keep(now + RECHECK_MS));
        assert_eq!(unrecorded(&e, now), Next::settled(None, 6, None));
        // A failed dispatch is looked at again shortly; a retry asked at now + N.
        assert_eq!(Next::again(now), Next::keep(now + AGAIN_MS));
        let retry = claimed.retry_asked(now, 4_000, None);
        assert_eq!(
            Next::after_outcome(&retry, 12, GRACE),
            Next::settled(Some(Rearm::InWindow(now + 4_000)), 12, Some(now + 4_000))
        );
    }

    #[test]
    fn arming_keeps_the_earliest_time_and_the_youngest_write_per_alarm() {
        let mut t = Timeline::new(INTERVAL, T0, Instant::now());
        t.arm(entry("x", 50, 7, 0));
        t.arm(entry("x", 90, 9, 0));
        t.arm(entry("x", 20, 3, 0));
        assert!(!t.arm(entry("bad id", 1, 0, 0)));
        assert_eq!(t.len(), 1);
        assert_eq!(t.pop_due(19), None);
        assert_eq!(t.pop_due(20), Some(entry("x", 20, 9, 0)));
        assert_eq!(t.len(), 0);
        // Looked at again later for the same entry: the entry (its subject) is kept,
        // and one "written" in the future is young from now on only.
        t.arm_at(12_500, entry("y", 9_000, 99_999, 4));
        assert_eq!(t.pop_due(13_000), Some(entry("y", 9_000, 13_000, 4)));
    }

    #[test]
    fn rearming_in_the_window_only_and_forgetting_a_partition() {
        let mut t = Timeline::new(INTERVAL, T0, Instant::now());
        t.loaded(B0 + 2);
        let e = entry("x", T0, 0, 1);
        // Beyond the loaded window: its bucket's load brings it back, not the rearm.
        t.rearm(
            &Next::settled(Some(Rearm::InWindow(T0 + 30_000)), 2, None),
            e.clone(),
        );
        assert!(!t.is_armed("x"));
        t.rearm(&Next::settled(None, 2, None), e.clone());
        assert!(!t.is_armed("x"));
        t.rearm(
            &Next::settled(Some(Rearm::InWindow(T0 + 29_999)), 2, None),
            e.clone(),
        );
        assert_eq!(t.pop_due(T0 + 29_999), Some(entry("x", T0 + 29_999, 0, 1)));
        // `Always` arms beyond the window too, keeping the entry.
        t.rearm(&Next::keep(T0 + 90_000), e.clone());
        assert_eq!(t.pop_due(T0 + 90_000), Some(e.clone()));
        t.arm(e.clone());
        t.forget(partition_of("x") + 1);
        assert!(t.is_armed("x"));
        t.forget(partition_of("x"));
        assert!(!t.is_armed("x"));
    }

    #[test]
    fn records_are_read_ahead_in_a_batch_when_the_first_is_half_the_lead_away() {
        let mut t = Timeline::new(INTERVAL, T0, Instant::now());
        for (id, ms) in [("a", 600), ("b", 900), ("c", 1_100), ("d", 1_101)] {
            t.arm(entry(id, T0 + ms, 0, 1));
        }
        assert_eq!(t.read_ahead(T0, |_| false), None, "a is 600 ms away");
        assert_eq!(
            t.read_ahead(T0 + 100, |_| false),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(
            t.read_ahead(T0 + 100, |id| id != "b"),
            None,
            "one left to read"
        );
    }

    #[test]
    fn a_read_ahead_starts_after_the_last_batch_and_over_when_the_clock_went_back() {
        let mut t = Timeline::new(INTERVAL, T0, Instant::now());
        for (id, ms) in [("a", 50), ("b", 200), ("c", 300), ("d", 400)] {
            t.arm(entry(id, T0 + ms, 0, 1));
        }
        assert_eq!(
            t.read_ahead(T0, |_| false),
            Some(vec!["a".into(), "b".into(), "c".into(), "d".into()])
        );
        for (id, ms) in [("e", 500), ("f", 600)] {
            t.arm(entry(id, T0 + ms, 0, 1));
        }
        // Nothing known (the answers were lost): still only what came after the batch.
        assert_eq!(
            t.read_ahead(T0, |_| false),
            Some(vec!["e".into(), "f".into()])
        );
        assert_eq!(t.read_ahead(T0, |_| false), None, "nothing new");
        // The clock went back: the mark (f) is past the horizon.
        assert_eq!(
            t.read_ahead(T0 - 450, |id| id > "b"),
            Some(vec!["a".into(), "b".into()])
        );
    }
}
