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
        }
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the window load (with its catch-up, sweep and cron planning) is due.
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
            .min(self.next_load.saturating_duration_since(mono))
    }

    /// The alarms whose records are worth reading ahead in one batch at `now_ms` (those
    /// due within [`PREFETCH_LEAD_MS`] not `known` yet), when the earliest of them is
    /// half the lead away and there are more than one.
    pub(crate) fn read_ahead(
        &self,
        now_ms: u64,
        known: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let horizon = now_ms.saturating_add(PREFETCH_LEAD_MS);
        let wanted: Vec<String> = self
            .armed
            .iter()
            .take_while(|(at, _)| *at <= horizon)
            .filter(|(_, id)| !known(id))
            .take(PREFETCH_BATCH)
            .map(|(_, id)| id.clone())
            .collect();
        let soon = self
            .armed
            .iter()
            .find(|(_, id)| !known(id))
            .is_some_and(|(at, _)| *at <= now_ms.saturating_add(PREFETCH_LEAD_MS / 2));
        (soon && wanted.len() > 1).then_some(wanted)
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
    use super::*;

    const T0: u64 = 1_700_000_000_000;
    const INTERVAL: Duration = Duration::from_secs(10);

    fn entry(id: &str, at_ms: u64, written_ms: u64, seq: u64) -> DueEntry {
        DueEntry {
            id: id.into(),
            at_ms,
            written_ms,
            seq,
        }
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
}
