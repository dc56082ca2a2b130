//! The scheduling decisions, pure: no NATS, no tokio, no clock. The actor feeds
//! requests and the log's state in and carries the decisions out.
//!
//! - [`Head`]: where a process's chain stands (next slot, previous hash, the
//!   subject sequence the next write must expect).
//! - [`DedupeIndex`]: client message ids seen within the idempotency window.
//! - [`plan`]: which requests are duplicates and which get new slots.
//! - [`build_run`]: the run of new assignments, chained (the signer seals it).
//! - [`KeyPlan`]: the key set a run declares and the keys that must seal it.

use std::collections::{BTreeSet, HashMap};

use protocol::chain;
use protocol::hash::Hash32;
use protocol::merkle::Tree;
use protocol::seal::Seal;
use protocol::wire::{Entry, Run, RECORD_VERSION};
use protocol::ProcessId;

/// Where a process's chain stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The slot the next assignment gets.
    pub next_slot: u64,
    /// The chain hash the next assignment links to.
    pub prev: Hash32,
    /// The stream's last sequence on the process's subject (0: none), whatever is
    /// stored there (a run of the chain or a foreign message); the next write expects
    /// exactly this (`Nats-Expected-Last-Subject-Sequence`) and signs it as `prev_seq`.
    pub seq: u64,
    /// Stream sequence of the chain's last run (0: none): what an audit re-checks.
    pub run_seq: u64,
    /// Timestamp of the last assignment; timestamps never go backwards.
    pub timestamp_ms: u64,
    /// The key set the chain's last run declares (none: no run yet, or a version 2
    /// run): a next run declaring another set is sealed by these keys too.
    pub keys: Option<Vec<String>>,
}

impl Head {
    /// The head of a process with no assignment.
    pub fn genesis(process: &ProcessId) -> Head {
        Head {
            next_slot: 0,
            prev: chain::genesis(process),
            seq: 0,
            run_seq: 0,
            timestamp_ms: 0,
            keys: None,
        }
    }

    /// The head after `run` was stored at stream sequence `seq`.
    pub fn after(run: &Run, seq: u64) -> Head {
        Head {
            next_slot: run.last_slot() + 1,
            prev: run.head(),
            seq,
            run_seq: seq,
            timestamp_ms: run.entries.last().map(|e| e.timestamp_ms).unwrap_or(0),
            keys: run.keys.clone(),
        }
    }
}

/// Where an already scheduled message id lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Its slot.
    pub slot: u64,
    /// The stream sequence of its run.
    pub seq: u64,
}

/// Client message ids scheduled within the idempotency window, oldest first.
/// After the window an id is forgotten and the same id gets a new slot.
///
/// Ids learnt from signed runs of the chain are facts. Ids learnt from unsigned
/// `Ts-Ids` headers (the headers-only window load) are *hints*: any message on the
/// subject can carry such a header, so each hint is checked against its signed run
/// before it is believed ([`DedupeIndex::hints`], [`DedupeIndex::confirm`]), and
/// an id may have several until one is confirmed.
#[derive(Debug, Default)]
pub struct DedupeIndex {
    window_ms: u64,
    ids: HashMap<String, Seen>,
    hints: HashMap<String, Vec<Seen>>,
    /// The newest timestamp each id was seen at: an id is forgotten a window after it.
    latest: HashMap<String, u64>,
    /// (timestamp, id) of every sighting, oldest first; stale ones are skipped.
    order: BTreeSet<(u64, String)>,
}

impl DedupeIndex {
    /// An index remembering ids for `window_ms`.
    pub fn new(window_ms: u64) -> DedupeIndex {
        DedupeIndex {
            window_ms,
            ..Default::default()
        }
    }

    fn seen_at(&mut self, id: &str, timestamp_ms: u64) {
        let latest = self.latest.entry(id.to_string()).or_insert(timestamp_ms);
        *latest = (*latest).max(timestamp_ms);
        self.order.insert((timestamp_ms, id.to_string()));
    }

    /// Records `id` as scheduled at `slot` in the run at `seq`, at `timestamp_ms`
    /// (from a signed run of the chain). A later sighting of the same id (it was
    /// scheduled again after its window) replaces the earlier one.
    pub fn insert(&mut self, id: String, seen: Seen, timestamp_ms: u64) {
        if self.window_ms == 0 {
            return;
        }
        self.hints.remove(&id);
        self.seen_at(&id, timestamp_ms);
        self.ids.insert(id, seen);
    }

    /// Records an unchecked claim that `id` is at `seen` (an unsigned header).
    pub fn insert_hint(&mut self, id: String, seen: Seen, timestamp_ms: u64) {
        if self.window_ms == 0 || self.ids.contains_key(&id) {
            return;
        }
        self.seen_at(&id, timestamp_ms);
        let claims = self.hints.entry(id).or_default();
        if !claims.contains(&seen) {
            claims.push(seen);
        }
    }

    /// Records the claims of one stored message's `Ts-Ids` header (`[slot, id]`
    /// pairs of the run at `seq`, stamped `timestamp_ms`), each as a hint.
    pub fn insert_hints(
        &mut self,
        seq: u64,
        ids: impl IntoIterator<Item = (u64, String)>,
        timestamp_ms: u64,
    ) {
        for (slot, id) in ids {
            self.insert_hint(id, Seen { slot, seq }, timestamp_ms);
        }
    }

    /// The unchecked claims about `id`, oldest first (none once confirmed).
    pub fn hints(&self, id: &str) -> &[Seen] {
        self.hints.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Settles the claims about `id`: `found` is the one its signed run confirmed, if
    /// any; the others are dropped.
    pub fn confirm(&mut self, id: &str, found: Option<Seen>) {
        self.hints.remove(id);
        if let Some(seen) = found {
            self.ids.insert(id.to_string(), seen);
        }
    }

    /// Where `id` was scheduled, if within the window (confirmed ids only).
    pub fn get(&self, id: &str) -> Option<Seen> {
        self.ids.get(id).copied()
    }

    /// Forgets ids whose newest sighting is older than the window as of `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.window_ms);
        while let Some((ts, id)) = self.order.first().cloned() {
            if ts >= horizon {
                break;
            }
            self.order.pop_first();
            if self.latest.get(&id) == Some(&ts) {
                self.latest.remove(&id);
                self.ids.remove(&id);
                self.hints.remove(&id);
            }
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// How far a process's [`DedupeIndex`] has taken its log in: every message of the
/// subject through stream sequence `seq` (its ids, as facts or hints, where within
/// the window), when the chain's next slot was `next_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    /// The last stream sequence taken in.
    pub seq: u64,
    /// The chain's next slot then.
    pub next_slot: u64,
}

impl Indexed {
    /// After a run with `prev_seq` was stored (or judged) at `seq`, with `next_slot`
    /// next: the index covers it too if it covered everything up to the message the
    /// run was written after (it was then the very next message of the subject).
    pub fn advance(&mut self, prev_seq: u64, seq: u64, next_slot: u64) {
        if prev_seq <= self.seq && seq > self.seq {
            self.seq = seq;
            self.next_slot = self.next_slot.max(next_slot);
        }
    }
}

/// How a head (re)load brings the dedupe index up to the head it loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRead {
    /// Build the index anew from the whole window: the first load, or a log that
    /// is now behind what the index took in (messages were lost: their sequences and
    /// slots may be given again, and what the index says of them is void).
    Full,
    /// Keep the index: read only the messages after this stream sequence (the one it
    /// already took in), through the loaded head's.
    After(u64),
}

/// How to bring the index that took in `held` (none: nothing yet) up to `loaded`.
pub fn window_read(held: Option<Indexed>, loaded: &Head) -> WindowRead {
    match held {
        Some(h) if loaded.seq >= h.seq && loaded.next_slot >= h.next_slot => {
            WindowRead::After(h.seq)
        }
        _ => WindowRead::Full,
    }
}

/// What to do with one request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Give it the next slot (its position in the new run).
    Assign(usize),
    /// Its id was already scheduled: answer with that assignment.
    Duplicate(Seen),
    /// Its id appears earlier in this same batch: answer with that request's
    /// assignment (the position in the new run).
    SameAs(usize),
    /// An unsigned header claims its id was scheduled and the claim is not yet checked
    /// against its signed run (the run could not be read): it may be a duplicate, so
    /// it is never given a new slot until the claim is settled.
    Unchecked,
}

/// Decides, for each request's optional message id, whether it gets a new slot.
pub fn plan(index: &DedupeIndex, ids: &[Option<&str>]) -> Vec<Decision> {
    let mut in_batch: HashMap<&str, usize> = HashMap::new();
    let mut next = 0;
    ids.iter()
        .map(|id| match id {
            Some(id) => {
                if let Some(seen) = index.get(id) {
                    Decision::Duplicate(seen)
                } else if !index.hints(id).is_empty() {
                    Decision::Unchecked
                } else if let Some(pos) = in_batch.get(id) {
                    Decision::SameAs(*pos)
                } else {
                    in_batch.insert(id, next);
                    next += 1;
                    Decision::Assign(next - 1)
                }
            }
            None => {
                next += 1;
                Decision::Assign(next - 1)
            }
        })
        .collect()
}

/// One new assignment's content.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The message id (client's or generated).
    pub message_id: String,
    /// Stored headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Which keys the next run of a process carries (schemas/chain.md "Which keys a run
/// must carry"): it declares the process settings' keys, and is sealed by them and —
/// when the chain's last run declares another set — by every key of that set too
/// (the handover: the keys that were required consent to the change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPlan {
    /// The set the run declares: the settings' keys, sorted, each once (empty: no
    /// particular key; the scheduler's default key seals it).
    pub declares: Vec<String>,
    /// The key ids that seal the run (empty: the default key).
    pub seal_with: Vec<String>,
}

impl KeyPlan {
    /// The plan for a run declaring `settings` after a run declaring `head`.
    pub fn new(settings: &[String], head: Option<&[String]>) -> KeyPlan {
        let declares = protocol::keys::key_set(settings);
        let seal_with = match head {
            Some(old) if old != declares.as_slice() => {
                protocol::keys::key_set(&[declares.as_slice(), old].concat())
            }
            _ => declares.clone(),
        };
        KeyPlan {
            declares,
            seal_with,
        }
    }

    /// Whether the run hands the chain over from another key set.
    pub fn is_handover(&self) -> bool {
        self.seal_with != self.declares
    }
}

/// Builds the run of `messages` on top of `head`, timestamped `max(now_ms, head's)`,
/// declaring the head's key set (the actor declares its [`KeyPlan`]'s), not yet
/// sealed. Returns the run's Merkle tree too (for its statement and receipts).
pub fn build_run(
    process: &ProcessId,
    head: &Head,
    messages: Vec<NewMessage>,
    now_ms: u64,
) -> (Run, Tree) {
    let ts = now_ms.max(head.timestamp_ms);
    let mut prev = head.prev;
    let entries = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let slot = head.next_slot + i as u64;
            let body_hash = Hash32::digest(&m.body);
            let fields = chain::Fields {
                process: process.as_str(),
                slot,
                message_id: &m.message_id,
                timestamp_ms: ts,
                headers: &m.headers,
                body_hash,
            };
            let chain_hash = chain::chain_hash(&prev, &fields);
            let e = Entry {
                slot,
                message_id: m.message_id,
                timestamp_ms: ts,
                headers: m.headers,
                body: m.body,
                prev_hash: prev,
                chain_hash,
            };
            prev = chain_hash;
            e
        })
        .collect();
    let run = Run {
        v: RECORD_VERSION,
        process: process.to_string(),
        prev_seq: head.seq,
        first_slot: head.next_slot,
        keys: Some(head.keys.clone().unwrap_or_default()),
        entries,
        seal: Seal::default(),
    };
    let tree = run.tree();
    (run, tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::keys::Keypair;
    use protocol::seal;
    use protocol::verify::{LogVerifier, TrustedKeys, Verdict};

    fn msg(id: &str) -> NewMessage {
        NewMessage {
            message_id: id.into(),
            headers: vec![],
            body: id.as_bytes().to_vec(),
        }
    }

    #[test]
    fn given_seen_and_repeated_ids_when_planning_then_only_new_ones_get_slots() {
        let mut index = DedupeIndex::new(1000);
        index.insert("old".into(), Seen { slot: 3, seq: 9 }, 100);
        let d = plan(
            &index,
            &[None, Some("a"), Some("old"), Some("a"), None, Some("b")],
        );
        assert_eq!(
            d,
            vec![
                Decision::Assign(0),
                Decision::Assign(1),
                Decision::Duplicate(Seen { slot: 3, seq: 9 }),
                Decision::SameAs(1),
                Decision::Assign(2),
                Decision::Assign(3),
            ]
        );
    }

    #[test]
    fn given_an_unchecked_claim_when_planning_then_the_id_gets_no_slot_until_settled() {
        let mut index = DedupeIndex::new(1000);
        index.insert_hints(7, [(4, "claimed".to_string())], 100);
        let d = plan(&index, &[Some("claimed"), Some("claimed"), Some("new")]);
        assert_eq!(
            d,
            vec![
                Decision::Unchecked,
                Decision::Unchecked,
                Decision::Assign(0)
            ]
        );
        // Its signed run holds it: a duplicate. Disproved: a new slot.
        index.confirm("claimed", Some(Seen { slot: 4, seq: 7 }));
        assert_eq!(
            plan(&index, &[Some("claimed")]),
            vec![Decision::Duplicate(Seen { slot: 4, seq: 7 })]
        );
        index.insert_hints(8, [(5, "forged".to_string())], 100);
        index.confirm("forged", None);
        assert_eq!(plan(&index, &[Some("forged")]), vec![Decision::Assign(0)]);
    }

    #[test]
    fn given_a_window_when_time_passes_then_ids_are_forgotten_in_order() {
        let mut index = DedupeIndex::new(100);
        index.insert("a".into(), Seen { slot: 0, seq: 1 }, 1000);
        index.insert("b".into(), Seen { slot: 1, seq: 2 }, 1050);
        index.prune(1100);
        assert!(
            index.get("a").is_some(),
            "exactly at the horizon is still inside"
        );
        index.prune(1101);
        assert_eq!(
            (index.get("a"), index.get("b").map(|s| s.slot)),
            (None, Some(1))
        );
        index.prune(1151);
        assert!(index.is_empty());
        // A zero window remembers nothing.
        let mut off = DedupeIndex::new(0);
        off.insert("a".into(), Seen { slot: 0, seq: 1 }, 1);
        assert!(off.get("a").is_none());
    }

    #[test]
    fn given_unsigned_hints_then_none_is_believed_until_one_is_confirmed() {
        let mut index = DedupeIndex::new(1000);
        let forged = Seen { slot: 1, seq: 5 };
        let genuine = Seen { slot: 2, seq: 9 };
        index.insert_hint("a".into(), forged, 100);
        index.insert_hint("a".into(), genuine, 101);
        assert_eq!(index.get("a"), None, "a hint is not a fact");
        assert_eq!(index.hints("a"), &[forged, genuine]);
        index.confirm("a", Some(genuine));
        assert_eq!((index.get("a"), index.hints("a")), (Some(genuine), &[][..]));
        // A hint never overrides a fact.
        index.insert_hint("a".into(), forged, 102);
        assert_eq!((index.get("a"), index.hints("a")), (Some(genuine), &[][..]));
        // All claims refuted: the id is unknown.
        index.insert_hint("b".into(), forged, 103);
        index.confirm("b", None);
        assert_eq!((index.get("b"), index.hints("b")), (None, &[][..]));
    }

    #[test]
    fn given_an_id_seen_again_later_then_it_is_remembered_a_window_after_the_later_sighting() {
        let mut index = DedupeIndex::new(100);
        index.insert("a".into(), Seen { slot: 0, seq: 1 }, 1000);
        index.insert("a".into(), Seen { slot: 7, seq: 9 }, 1080);
        index.prune(1150);
        assert_eq!(
            index.get("a"),
            Some(Seen { slot: 7, seq: 9 }),
            "not by its first time"
        );
        index.prune(1181);
        assert_eq!(index.get("a"), None);
        // Sightings may come out of time order (headers of several replicas).
        index.insert_hint("b".into(), Seen { slot: 1, seq: 3 }, 2000);
        index.insert_hint("b".into(), Seen { slot: 2, seq: 4 }, 1990);
        index.prune(2095);
        assert_eq!(index.hints("b").len(), 2);
        index.prune(2101);
        assert!(index.hints("b").is_empty() && index.is_empty());
    }

    /// A stored message as the window reader sees it: (seq, `Ts-Ids` pairs, time).
    type Stored = (u64, Vec<(u64, String)>, u64);

    /// Takes the messages of `log` after `after` through `through` into `index`, as
    /// the window reader does; returns how many it read.
    fn take_in(index: &mut DedupeIndex, log: &[Stored], after: u64, through: u64) -> usize {
        let mut read = 0;
        for (seq, ids, ts) in log.iter().filter(|m| m.0 > after && m.0 <= through) {
            index.insert_hints(*seq, ids.clone(), *ts);
            read += 1;
        }
        read
    }

    fn head_at(seq: u64, next_slot: u64) -> Head {
        Head {
            next_slot,
            prev: Hash32::ZERO,
            seq,
            run_seq: seq,
            timestamp_ms: 0,
            keys: None,
        }
    }

    #[test]
    fn a_reload_keeps_the_index_and_reads_only_what_came_after_the_held_head() {
        // Runs of one assignment each: seq n holds slot n - 1 with id "m<n>".
        let log: Vec<Stored> = (1..=8u64)
            .map(|n| (n, vec![(n - 1, format!("m{n}"))], 1000 + n))
            .collect();
        let mut index = DedupeIndex::new(60_000);
        // First load: the whole window, through the head at seq 5.
        let first = head_at(5, 5);
        assert_eq!(window_read(None, &first), WindowRead::Full);
        assert_eq!(take_in(&mut index, &log, 0, first.seq), 5);
        let mut held = Indexed {
            seq: first.seq,
            next_slot: first.next_slot,
        };
        // The actor's own write of slot 5 at seq 6 (the very next message): a fact.
        index.insert("m6".into(), Seen { slot: 5, seq: 6 }, 1006);
        held.advance(5, 6, 6);
        assert_eq!(
            held,
            Indexed {
                seq: 6,
                next_slot: 6
            }
        );
        // A confirmed id, as a duplicate answer left it.
        index.confirm("m2", Some(Seen { slot: 1, seq: 2 }));
        // Another replica wrote seq 7 and 8; the head is dropped (an ambiguous write,
        // a lost race) and loaded again at seq 8: only 7 and 8 are read.
        let reloaded = head_at(8, 8);
        let WindowRead::After(after) = window_read(Some(held), &reloaded) else {
            panic!("a reload past the held head keeps the index");
        };
        assert_eq!(after, 6);
        assert_eq!(take_in(&mut index, &log, after, reloaded.seq), 2);
        // What the index held is still there, facts as facts; the new ids are hints.
        assert_eq!(index.get("m2"), Some(Seen { slot: 1, seq: 2 }));
        assert_eq!(index.get("m6"), Some(Seen { slot: 5, seq: 6 }));
        assert_eq!(index.hints("m1"), &[Seen { slot: 0, seq: 1 }]);
        assert_eq!(index.hints("m8"), &[Seen { slot: 7, seq: 8 }]);
        // A run that was not the next message does not move what the index covers.
        let mut gap = Indexed {
            seq: 8,
            next_slot: 8,
        };
        gap.advance(9, 10, 10);
        assert_eq!(
            gap,
            Indexed {
                seq: 8,
                next_slot: 8
            }
        );
        // A log behind what was taken in (a loss): the index is rebuilt.
        let behind = Indexed {
            seq: 8,
            next_slot: 8,
        };
        assert_eq!(window_read(Some(behind), &head_at(7, 8)), WindowRead::Full);
        assert_eq!(window_read(Some(behind), &head_at(9, 7)), WindowRead::Full);
        // Nothing new: nothing to read.
        assert_eq!(
            window_read(Some(behind), &head_at(8, 8)),
            WindowRead::After(8)
        );
    }

    #[test]
    fn given_consecutive_runs_when_built_and_sealed_then_they_verify_and_never_go_back_in_time() {
        let p = ProcessId::new("p").unwrap();
        let kp = Keypair::from_seed([9; 32]);
        let mut head = Head::genesis(&p);
        let mut t = TrustedKeys::default();
        t.insert(kp.public_key());
        let mut v = LogVerifier::from_genesis(p.clone(), t, vec![]);
        for (round, now) in [(0u64, 500u64), (1, 400), (2, 600)] {
            let (mut run, tree) = build_run(
                &p,
                &head,
                vec![msg(&format!("x{round}")), msg(&format!("y{round}"))],
                now,
            );
            assert_eq!(tree.root(), run.tree().root());
            run.seal = seal::seal(&[seal::run_digest(&run.statement_for(&tree))], &[&kp]).remove(0);
            assert_eq!(run.first_slot, round * 2);
            assert_eq!(run.prev_seq, head.seq);
            assert_eq!(
                v.feed(round + 10, Ok(&run)),
                Verdict::Chain { lost: vec![] }
            );
            assert!(run
                .entries
                .iter()
                .all(|e| e.timestamp_ms >= head.timestamp_ms));
            head = Head::after(&run, round + 10);
        }
        assert_eq!(
            (head.next_slot, head.timestamp_ms, v.checked()),
            (6, 600, 6)
        );
    }

    #[test]
    fn the_next_run_declares_the_settings_and_is_sealed_by_the_keys_it_replaces_too() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // No change: the settings' keys (sorted, once), nothing more.
        let same = KeyPlan::new(&ids(&["k2", "k1", "k2"]), Some(&ids(&["k1", "k2"])));
        assert_eq!(same.declares, ids(&["k1", "k2"]));
        assert_eq!(same.seal_with, ids(&["k1", "k2"]));
        assert!(!same.is_handover());
        // A change: the old keys seal the handover run as well.
        let change = KeyPlan::new(&ids(&["k2"]), Some(&ids(&["k1"])));
        assert_eq!(change.declares, ids(&["k2"]));
        assert_eq!(change.seal_with, ids(&["k1", "k2"]));
        assert!(change.is_handover());
        // To no particular key: the old keys seal it (not the default key alone).
        let to_default = KeyPlan::new(&[], Some(&ids(&["k1"])));
        assert_eq!(
            (to_default.declares, to_default.seal_with),
            (vec![], ids(&["k1"]))
        );
        // Nothing to hand over from: genesis, or a version 2 run.
        let first = KeyPlan::new(&ids(&["k3"]), None);
        assert_eq!(
            (first.declares, first.seal_with),
            (ids(&["k3"]), ids(&["k3"]))
        );
        let p = ProcessId::new("p").unwrap();
        let mut head = Head::genesis(&p);
        head.keys = Some(ids(&["k1"]));
        let (run, _) = build_run(&p, &head, vec![msg("a")], 1);
        assert_eq!(
            run.keys,
            Some(ids(&["k1"])),
            "a run continues its head's set"
        );
    }
}
