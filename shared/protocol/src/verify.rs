//! Verifying a process's log without any I/O: the caller reads the messages of the
//! process's log subject from wherever they are (JetStream, a file, a test) and feeds
//! them in stream order. Each message is either part of the chain or *foreign*
//! (schemas/chain.md); foreign messages are reported and skipped, never part of the
//! chain, so a forged, replayed or garbage message can neither give a slot twice nor
//! hide the runs after it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::chain;
use crate::hash::Hash32;
use crate::keys::{self, Commitment};
use crate::merkle;
use crate::process::ProcessId;
use crate::wire::Run;

/// The keys a verifier trusts: key id to public key. Clones share a cache of the
/// signatures already verified (see [`SignatureCache`]), so the runs of one signed
/// batch — of one process or of many verified side by side — cost one signature
/// check, not one each.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: HashMap<String, [u8; 32]>,
    verified: Arc<SignatureCache>,
}

impl TrustedKeys {
    /// Trusts `public_key` under its [`crate::keys::key_id`].
    pub fn insert(&mut self, public_key: [u8; 32]) {
        self.keys
            .insert(crate::keys::key_id(&public_key), public_key);
    }
    /// Whether a key with this id is trusted.
    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }
    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// True when no key is trusted (then nothing can verify).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    fn trusts(&self, key_id: &str, public_key: &[u8]) -> bool {
        self.keys
            .get(key_id)
            .is_some_and(|pk| pk.as_slice() == public_key)
    }
    /// Whether `c` verifies over `statement`, from the cache when this very
    /// signature was already verified over this very statement.
    fn check(&self, c: &Commitment, statement: &[u8]) -> bool {
        self.verified.check(c, statement)
    }
}

/// Signatures known to verify: the digest of (public key, signature, signed
/// statement) of each commitment that did. A hit stands for a successful ed25519
/// check of exactly those bytes (~50 µs saved); nothing that failed is remembered,
/// so the cache can only skip work, never change a verdict. Bounded: emptied when
/// full.
#[derive(Default)]
pub struct SignatureCache(Mutex<HashSet<Hash32>>);

/// Entries a [`SignatureCache`] holds before it starts over (32 bytes each).
const SIGNATURE_CACHE_CAP: usize = 1 << 16;

impl SignatureCache {
    fn check(&self, c: &Commitment, statement: &[u8]) -> bool {
        let mut h = blake3::Hasher::new();
        h.update(b"turnstile/verified/v1");
        h.update(&(c.public_key.len() as u32).to_be_bytes());
        h.update(&c.public_key);
        h.update(&(c.signature.len() as u32).to_be_bytes());
        h.update(&c.signature);
        h.update(&(c.key_id.len() as u32).to_be_bytes());
        h.update(c.key_id.as_bytes());
        h.update(statement);
        let id: Hash32 = h.finalize().into();
        if self.0.lock().is_ok_and(|seen| seen.contains(&id)) {
            return true;
        }
        if !c.check(statement) {
            return false;
        }
        if let Ok(mut seen) = self.0.lock() {
            if seen.len() >= SIGNATURE_CACHE_CAP {
                seen.clear();
            }
            seen.insert(id);
        }
        true
    }
}

impl fmt::Debug for SignatureCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().map(|s| s.len()).unwrap_or(0);
        write!(f, "SignatureCache({n} verified)")
    }
}

/// Why a message on a process's log subject is not (or not cleanly) part of its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The message is not a run record (or not of this record version).
    Undecodable(String),
    /// The run names another process.
    WrongProcess(String),
    /// The entry at this slot does not match its chain hash: it was altered.
    BadChainHash(u64),
    /// The entry at this slot does not link to the entry before it in the run.
    BrokenLink(u64),
    /// The run has no commitment at all.
    Unsigned,
    /// A commitment's signature does not verify over the run's place in its batch.
    BadSignature(String),
    /// A commitment is by a key the verifier does not trust.
    UntrustedKey(String),
    /// A key the run must carry did not commit: one of the keys the run itself
    /// declares, or one the verifier requires on top (`turnstile verify --require`).
    MissingKey(String),
    /// The run declares another required key set than the run before it in the chain,
    /// and is not sealed by every key of that run's set: the keys that were required
    /// did not consent to the change (schemas/chain.md "Which keys a run must carry").
    UnauthorizedKeyChange {
        /// The set the chain's previous run declares.
        from: Vec<String>,
        /// The set this run declares (`None`: a version 2 run, which declares none).
        to: Option<Vec<String>>,
        /// A key of `from` that did not seal this run.
        missing: String,
    },
    /// A genuine run in the wrong place: it was written right after stream sequence
    /// `written_after` but sits after `found_after` (a replay or a copy).
    Replayed {
        /// The run's signed `prev_seq`.
        written_after: u64,
        /// The stream sequence of the message before it on the subject.
        found_after: u64,
    },
    /// A signed run that gives again slots the chain already holds, or links to
    /// another history (a fork: only a leaked key or a bug can make one).
    Fork {
        /// The slot the chain expected next.
        expected: u64,
        /// The run's first slot.
        found: u64,
    },
    /// Messages the chain had are gone from the log: the run was written after stream
    /// sequence `written_after`, which is no longer on the subject (data loss). The run
    /// itself is genuine and continues the chain.
    Lost {
        /// The run's signed `prev_seq`.
        written_after: u64,
        /// The stream sequence of the message now before it on the subject (0: none).
        found_after: u64,
    },
    /// Slots are missing: the chain expected `expected`, its next genuine run starts at
    /// `found` (the slots between are lost; they are never given again).
    Gap {
        /// The slot that should have come next.
        expected: u64,
        /// The slot the log has instead.
        found: u64,
    },
}

impl FaultKind {
    /// A stable snake_case name (fault events, `--json`).
    pub fn code(&self) -> &'static str {
        match self {
            FaultKind::Undecodable(_) => "undecodable",
            FaultKind::WrongProcess(_) => "wrong_process",
            FaultKind::BadChainHash(_) => "bad_chain_hash",
            FaultKind::BrokenLink(_) => "broken_link",
            FaultKind::Unsigned => "unsigned",
            FaultKind::BadSignature(_) => "bad_signature",
            FaultKind::UntrustedKey(_) => "untrusted_key",
            FaultKind::MissingKey(_) => "missing_key",
            FaultKind::UnauthorizedKeyChange { .. } => "unauthorized_key_change",
            FaultKind::Replayed { .. } => "replayed",
            FaultKind::Fork { .. } => "fork",
            FaultKind::Lost { .. } => "lost",
            FaultKind::Gap { .. } => "gap",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::Undecodable(why) => write!(f, "not a run record: {why}"),
            FaultKind::WrongProcess(p) => write!(f, "run belongs to process {p:?}"),
            FaultKind::BadChainHash(s) => {
                write!(f, "slot {s}: content does not match its chain hash (altered)")
            }
            FaultKind::BrokenLink(s) => {
                write!(f, "slot {s}: prev_hash does not link to the slot before it")
            }
            FaultKind::Unsigned => write!(f, "run has no commitment"),
            FaultKind::BadSignature(k) => write!(f, "signature by key {k} does not verify"),
            FaultKind::UntrustedKey(k) => write!(f, "signed by untrusted key {k}"),
            FaultKind::MissingKey(k) => write!(f, "required key {k} did not commit"),
            FaultKind::UnauthorizedKeyChange { from, to, missing } => {
                let to = match to {
                    Some(to) => format!("{to:?}"),
                    None => "none declared (a version 2 run)".into(),
                };
                write!(
                    f,
                    "the required keys change from {from:?} to {to} without a seal by {missing}, a key of the set it replaces"
                )
            }
            FaultKind::Replayed {
                written_after,
                found_after,
            } => write!(
                f,
                "replayed: written after stream sequence {written_after}, found after {found_after}"
            ),
            FaultKind::Fork { expected, found } => write!(
                f,
                "fork: the chain expected slot {expected}, this signed run starts at {found} or links elsewhere"
            ),
            FaultKind::Lost {
                written_after,
                found_after,
            } => write!(
                f,
                "the message at stream sequence {written_after} is gone from the log (now after {found_after})"
            ),
            FaultKind::Gap { expected, found } => {
                write!(f, "slots {expected}..{found} are missing from the log")
            }
        }
    }
}

/// One fault, where it was found: the message's stream sequence and the slot the
/// chain expected next there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Stream sequence of the message.
    pub seq: u64,
    /// The slot the chain expected next when the message was read.
    pub slot: u64,
    /// What is wrong.
    pub kind: FaultKind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream sequence {} (next slot {}): {}",
            self.seq, self.slot, self.kind
        )
    }
}

/// Checks one run on its own, wherever it sits: its process, every entry's slot,
/// link and chain hash, and its seal (at least one commitment; each by a trusted key
/// and valid over the run's place in its batch; every key id the run declares
/// present, then every `required` key id — the verifier's own extra demand).
pub fn check_run(
    run: &Run,
    process: &ProcessId,
    trusted: &TrustedKeys,
    required: &[String],
) -> Result<(), FaultKind> {
    if run.process != process.as_str() {
        return Err(FaultKind::WrongProcess(run.process.clone()));
    }
    if run.entries.is_empty() {
        return Err(FaultKind::Undecodable("run has no entries".into()));
    }
    // One pass over the entries; the chain hashes become the Merkle leaves, and the
    // tree is reduced in place to its root: two allocations per run, none per entry.
    let mut leaves = Vec::with_capacity(run.entries.len());
    let mut buf = Vec::with_capacity(256);
    let mut prev: Option<Hash32> = None;
    for (i, e) in run.entries.iter().enumerate() {
        let slot = run.first_slot + i as u64;
        if e.slot != slot {
            return Err(FaultKind::BrokenLink(slot));
        }
        if prev.is_some_and(|p| p != e.prev_hash) {
            return Err(FaultKind::BrokenLink(slot));
        }
        if slot == 0 && e.prev_hash != chain::genesis(process) {
            return Err(FaultKind::BrokenLink(0));
        }
        let fields = e.fields(process.as_str(), Hash32::digest(&e.body));
        if chain::chain_hash_in(&mut buf, &e.prev_hash, &fields) != e.chain_hash {
            return Err(FaultKind::BadChainHash(slot));
        }
        prev = Some(e.chain_hash);
        leaves.push(e.chain_hash);
    }
    let commitments = &run.seal.commitments;
    if commitments.is_empty() {
        return Err(FaultKind::Unsigned);
    }
    let statement = keys::run_statement(
        &run.process,
        run.prev_seq,
        run.first_slot,
        run.entries.len() as u64,
        &merkle::root_in_place(&mut leaves),
        run.declared(),
    );
    let Some(statement) = run.seal.signed_statement(&statement) else {
        return Err(FaultKind::BadSignature("(batch path)".into()));
    };
    for c in commitments {
        if !trusted.trusts(&c.key_id, &c.public_key) {
            return Err(FaultKind::UntrustedKey(c.key_id.clone()));
        }
        if !trusted.check(c, &statement) {
            return Err(FaultKind::BadSignature(c.key_id.clone()));
        }
    }
    if let Some(k) = run
        .declared()
        .unwrap_or_default()
        .iter()
        .chain(required)
        .find(|k| !sealed_by(run, k))
    {
        return Err(FaultKind::MissingKey(k.clone()));
    }
    Ok(())
}

/// Whether a commitment of `run`'s seal is by `key_id` (its validity is
/// [`check_run`]'s question).
fn sealed_by(run: &Run, key_id: &str) -> bool {
    run.seal.commitments.iter().any(|c| c.key_id == key_id)
}

/// The key-continuity part of the rule (schemas/chain.md "Which keys a run must
/// carry"): a run that links to the chain's previous run and declares another key
/// set than that run must also be sealed by every key of that run's set. Nothing to
/// check when the previous run declares none (genesis, a version 2 run, a start
/// mid-log).
pub fn check_key_change(previous: Option<&[String]>, run: &Run) -> Result<(), FaultKind> {
    let Some(from) = previous else {
        return Ok(());
    };
    if run.declared() == Some(from) {
        return Ok(());
    }
    match from.iter().find(|k| !sealed_by(run, k)) {
        None => Ok(()),
        Some(missing) => Err(FaultKind::UnauthorizedKeyChange {
            from: from.to_vec(),
            to: run.keys.clone(),
            missing: missing.clone(),
        }),
    }
}

/// Where a process's chain stands after the runs read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPoint {
    /// The slot the next run must start at.
    pub next_slot: u64,
    /// The chain hash the next run's first entry must link to.
    pub prev: Hash32,
    /// Stream sequence of the last run of the chain (0: none yet).
    pub seq: u64,
    /// The key set the last run of the chain declares: a next run declaring another
    /// set must be sealed by all of these too. `None`: no set to hand over from (no
    /// run yet, a version 2 run, or the set is not known).
    pub keys: Option<Vec<String>>,
}

/// What the verifier made of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The run continues the chain. `lost` says what the log lost before it (empty
    /// on an intact log): the run is genuine and in its place, but messages or slots
    /// before it are gone.
    Chain {
        /// Data-loss faults found on the way to this run.
        lost: Vec<FaultKind>,
    },
    /// The message is not part of the chain and is skipped.
    Foreign(FaultKind),
}

/// The rule of schemas/chain.md, one message at a time: feed every message of one
/// process's log subject in stream order; each is either part of the chain or
/// foreign. The scheduler, `turnstile verify`, `turnstile log` and the workers all
/// decide with this one type.
#[derive(Debug, Clone)]
pub struct LogVerifier {
    process: ProcessId,
    trusted: TrustedKeys,
    required: Vec<String>,
    /// None until the first chain run when verification starts mid-log.
    point: Option<ChainPoint>,
    /// Stream sequence of the last message fed (any kind); none: unknown.
    last_seq: Option<u64>,
    checked: u64,
}

impl LogVerifier {
    /// A verifier of the whole log of `process`, from genesis and the subject's first
    /// message.
    pub fn from_genesis(
        process: ProcessId,
        trusted: TrustedKeys,
        required: Vec<String>,
    ) -> LogVerifier {
        let point = ChainPoint {
            next_slot: 0,
            prev: chain::genesis(&process),
            seq: 0,
            keys: None,
        };
        LogVerifier {
            process,
            trusted,
            required,
            point: Some(point),
            last_seq: Some(0),
            checked: 0,
        }
    }

    /// A verifier that continues from a known chain point and subject position (the
    /// scheduler's head), or — with `point` none — from somewhere mid-log, taking the
    /// first run's place and first `prev_hash` as given.
    pub fn resume(
        process: ProcessId,
        trusted: TrustedKeys,
        required: Vec<String>,
        point: Option<ChainPoint>,
        last_seq: Option<u64>,
    ) -> LogVerifier {
        LogVerifier {
            process,
            trusted,
            required,
            point,
            last_seq,
            checked: 0,
        }
    }

    /// The chain's position after what was fed (none before the first chain run of a
    /// mid-log start).
    pub fn point(&self) -> Option<&ChainPoint> {
        self.point.as_ref()
    }

    /// Stream sequence of the last message fed, chain or foreign: what the next write
    /// to the subject must expect.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// How many assignments of the chain have been checked.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The process.
    pub fn process(&self) -> &ProcessId {
        &self.process
    }

    /// The keys this verifier trusts.
    pub fn trusted(&self) -> &TrustedKeys {
        &self.trusted
    }

    /// Trusts `keys` from now on (the published keys read again); where the chain
    /// stands does not change.
    pub fn set_trusted(&mut self, keys: TrustedKeys) {
        self.trusted = keys;
    }

    /// The key ids every run must carry a commitment of on top of those it declares
    /// (a verifier's own demand; empty for the scheduler).
    pub fn required(&self) -> &[String] {
        &self.required
    }

    /// Judges the message at stream sequence `seq` (the next message on the subject);
    /// `record` is its decoded run or why it does not decode.
    pub fn feed(&mut self, seq: u64, record: Result<&Run, String>) -> Verdict {
        let checked = match &record {
            Ok(run) => check_run(run, &self.process, &self.trusted, &self.required),
            Err(_) => Ok(()),
        };
        self.feed_checked(seq, record, checked)
    }

    /// [`LogVerifier::feed`], with the run already checked on its own elsewhere:
    /// `checked` must be what [`check_run`] says of it with this verifier's
    /// [`process`](Self::process), [`trusted`](Self::trusted) keys and
    /// [`required`](Self::required) key ids (anything for an undecodable message).
    /// `check_run` depends on nothing but the run, so it is the part of the rule that
    /// can run in parallel over many runs while they are fed here in stream order.
    pub fn feed_checked(
        &mut self,
        seq: u64,
        record: Result<&Run, String>,
        checked: Result<(), FaultKind>,
    ) -> Verdict {
        let before = self.last_seq.replace(seq);
        let run = match record {
            Ok(run) => run,
            Err(why) => return Verdict::Foreign(FaultKind::Undecodable(why)),
        };
        if let Err(kind) = checked {
            return Verdict::Foreign(kind);
        }
        let mut lost = Vec::new();
        if let Some(found_after) = before {
            if run.prev_seq < found_after {
                return Verdict::Foreign(FaultKind::Replayed {
                    written_after: run.prev_seq,
                    found_after,
                });
            }
            if run.prev_seq > found_after {
                lost.push(FaultKind::Lost {
                    written_after: run.prev_seq,
                    found_after,
                });
            }
        }
        let first_prev = run.entries.first().map(|e| e.prev_hash);
        if let Some(p) = &self.point {
            let links = run.first_slot == p.next_slot && first_prev == Some(p.prev);
            if links {
                // The run before it is known: a change of the key set needs its keys.
                if let Err(kind) = check_key_change(p.keys.as_deref(), run) {
                    return Verdict::Foreign(kind);
                }
            } else {
                if run.first_slot > p.next_slot {
                    // Genuine and in its place, but slots before it are gone; so is
                    // the run before it, whose key set cannot be compared: the
                    // declared set is taken as given (the gap is reported).
                    lost.push(FaultKind::Gap {
                        expected: p.next_slot,
                        found: run.first_slot,
                    });
                } else {
                    return Verdict::Foreign(FaultKind::Fork {
                        expected: p.next_slot,
                        found: run.first_slot,
                    });
                }
            }
        }
        // The declared set rarely changes: keep the one held rather than copy it.
        let keys = match self.point.take() {
            Some(p) if p.keys == run.keys => p.keys,
            _ => run.keys.clone(),
        };
        self.point = Some(ChainPoint {
            next_slot: run.last_slot() + 1,
            prev: run.head(),
            seq,
            keys,
        });
        self.checked += run.entries.len() as u64;
        Verdict::Chain { lost }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::seal::Seal;
    use crate::wire::{Entry, RECORD_VERSION};

    /// A run of `per` entries of `process` from `first` on `prev`, written after
    /// stream sequence `prev_seq`, signed alone by `kp`.
    fn run_on(
        process: &str,
        first: u64,
        prev: Hash32,
        per: usize,
        prev_seq: u64,
        kp: &Keypair,
    ) -> Run {
        let mut prev = prev;
        let entries = (first..first + per as u64)
            .map(|slot| {
                let mut e = Entry {
                    slot,
                    message_id: format!("m{slot}"),
                    timestamp_ms: 5 + slot,
                    headers: vec![("k".into(), format!("v{slot}"))],
                    body: format!("body {slot}").into_bytes(),
                    prev_hash: prev,
                    chain_hash: Hash32::ZERO,
                };
                e.chain_hash = e.recompute_chain_hash(process);
                prev = e.chain_hash;
                e
            })
            .collect();
        let mut run = Run {
            v: RECORD_VERSION,
            process: process.into(),
            prev_seq,
            first_slot: first,
            keys: Some(vec![kp.id().to_string()]),
            entries,
            seal: Seal::default(),
        };
        reseal(&mut run, kp);
        run
    }

    fn reseal(run: &mut Run, kp: &Keypair) {
        seal_by(run, &[kp]);
    }

    fn seal_by(run: &mut Run, keys: &[&Keypair]) {
        run.seal = crate::seal::seal(&[crate::seal::run_digest(&run.statement())], keys).remove(0);
    }

    /// The next run of 2 entries after `before` (at stream sequence `seq - 1`),
    /// declaring `declares` (none: a version 2 run), sealed by `signers`.
    fn next(before: &Run, seq: u64, declares: Option<&[&Keypair]>, signers: &[&Keypair]) -> Run {
        let mut r = run_on(
            "p",
            before.last_slot() + 1,
            before.head(),
            2,
            seq - 1,
            signers[0],
        );
        match declares {
            Some(ks) => {
                r.keys = Some(crate::keys::key_set(
                    &ks.iter().map(|k| k.id()).collect::<Vec<_>>(),
                ))
            }
            None => {
                r.v = 2;
                r.keys = None;
            }
        }
        seal_by(&mut r, signers);
        r
    }

    /// A verifier of "p" trusting `keys`, requiring nothing on top of what runs declare.
    fn trusting(keys: &[&Keypair]) -> LogVerifier {
        let mut t = TrustedKeys::default();
        for k in keys {
            t.insert(k.public_key());
        }
        LogVerifier::from_genesis(ProcessId::new("p").unwrap(), t, vec![])
    }

    /// `runs` consecutive runs of 3 entries of process "p", at stream sequences 1.., as
    /// the scheduler writes them.
    fn honest(runs: usize, kp: &Keypair) -> Vec<(u64, Run)> {
        let p = ProcessId::new("p").unwrap();
        let mut prev = chain::genesis(&p);
        (0..runs as u64)
            .map(|i| {
                let r = run_on("p", i * 3, prev, 3, i, kp);
                prev = r.head();
                (i + 1, r)
            })
            .collect()
    }

    fn verifier(kp: &Keypair) -> LogVerifier {
        let mut t = TrustedKeys::default();
        t.insert(kp.public_key());
        LogVerifier::from_genesis(ProcessId::new("p").unwrap(), t, vec![kp.id().to_string()])
    }

    /// Feeds `log` and returns each message's verdict.
    fn judge(log: &[(u64, Run)], kp: &Keypair) -> (Vec<Verdict>, LogVerifier) {
        let mut v = verifier(kp);
        let verdicts = log.iter().map(|(seq, r)| v.feed(*seq, Ok(r))).collect();
        (verdicts, v)
    }

    fn chain() -> Verdict {
        Verdict::Chain { lost: vec![] }
    }

    #[test]
    fn given_an_honest_log_then_every_run_is_chain() {
        let kp = Keypair::from_seed([3; 32]);
        let (verdicts, v) = judge(&honest(4, &kp), &kp);
        assert_eq!(verdicts, vec![chain(); 4]);
        assert_eq!(v.checked(), 12);
        assert_eq!(v.point().map(|p| (p.next_slot, p.seq)), Some((12, 4)));
    }

    #[test]
    fn given_foreign_messages_after_the_head_then_each_is_named_and_the_chain_goes_on() {
        let kp = Keypair::from_seed([3; 32]);
        let stranger = Keypair::from_seed([4; 32]);
        let log = honest(4, &kp);
        let head = log[3].1.head();
        let mut forged = log[3].1.clone();
        forged.entries[1].body = b"forged".to_vec();
        for i in 1..3 {
            if i > 1 {
                forged.entries[i].prev_hash = forged.entries[i - 1].chain_hash;
            }
            forged.entries[i].chain_hash = forged.entries[i].recompute_chain_hash("p");
        }
        forged.prev_seq = 4;
        let mut unsigned = run_on("p", 12, head, 1, 4, &kp);
        unsigned.seal.commitments.clear();
        type Case = (&'static str, Result<Run, String>, fn(&FaultKind) -> bool);
        let cases: Vec<Case> = vec![
            (
                "replay of an earlier genuine run",
                Ok(log[1].1.clone()),
                |k| {
                    *k == FaultKind::Replayed {
                        written_after: 1,
                        found_after: 4,
                    }
                },
            ),
            ("replay of the head itself", Ok(log[3].1.clone()), |k| {
                *k == FaultKind::Replayed {
                    written_after: 3,
                    found_after: 4,
                }
            }),
            ("forged run with recomputed hashes", Ok(forged), |k| {
                matches!(k, FaultKind::BadSignature(_))
            }),
            ("garbage", Err("not msgpack".into()), |k| {
                matches!(k, FaultKind::Undecodable(_))
            }),
            (
                "a genuine run of another process",
                Ok(run_on(
                    "q",
                    0,
                    chain::genesis(&ProcessId::new("q").unwrap()),
                    2,
                    4,
                    &kp,
                )),
                |k| *k == FaultKind::WrongProcess("q".into()),
            ),
            (
                "a run signed by a stranger",
                Ok(run_on("p", 12, head, 2, 4, &stranger)),
                |k| matches!(k, FaultKind::UntrustedKey(_)),
            ),
            ("an unsigned run", Ok(unsigned), |k| {
                *k == FaultKind::Unsigned
            }),
            (
                "a signed fork that gives slots again",
                Ok(run_on("p", 9, log[2].1.head(), 3, 4, &kp)),
                |k| {
                    *k == FaultKind::Fork {
                        expected: 12,
                        found: 9,
                    }
                },
            ),
        ];
        for (name, foreign, kind) in cases {
            let mut v = verifier(&kp);
            for (seq, r) in &log {
                assert_eq!(v.feed(*seq, Ok(r)), chain(), "{name}");
            }
            match v.feed(5, foreign.as_ref().map_err(Clone::clone)) {
                Verdict::Foreign(k) => assert!(kind(&k), "{name}: {k}"),
                other => panic!("{name}: {other:?}"),
            }
            // The scheduler's next run is written after the foreign message and continues the chain.
            let next = run_on("p", 12, head, 2, 5, &kp);
            assert_eq!(v.feed(6, Ok(&next)), chain(), "{name}");
            assert_eq!(v.point().map(|p| p.next_slot), Some(14), "{name}");
        }
    }

    #[test]
    fn given_a_run_lost_from_the_store_then_the_next_run_continues_and_names_the_loss() {
        let kp = Keypair::from_seed([3; 32]);
        let mut log = honest(4, &kp);
        log.remove(2); // the message at stream sequence 3 (slots 6..=8) is gone
        let (verdicts, v) = judge(&log, &kp);
        assert_eq!(verdicts[..2], [chain(), chain()]);
        assert_eq!(
            verdicts[2],
            Verdict::Chain {
                lost: vec![
                    FaultKind::Lost {
                        written_after: 3,
                        found_after: 2
                    },
                    FaultKind::Gap {
                        expected: 6,
                        found: 9
                    },
                ]
            }
        );
        assert_eq!(v.point().map(|p| p.next_slot), Some(12));
    }

    #[test]
    fn given_a_mid_log_start_then_the_first_run_is_taken_as_given() {
        let kp = Keypair::from_seed([3; 32]);
        let log = honest(4, &kp);
        let mut t = TrustedKeys::default();
        t.insert(kp.public_key());
        let mut v = LogVerifier::resume(ProcessId::new("p").unwrap(), t, vec![], None, None);
        for (seq, r) in &log[2..] {
            assert_eq!(v.feed(*seq, Ok(r)), chain());
        }
        assert_eq!(v.checked(), 6);
    }

    #[test]
    fn a_run_is_checked_alone_entry_by_entry_and_by_its_seal() {
        let kp = Keypair::from_seed([3; 32]);
        let p = ProcessId::new("p").unwrap();
        let mut t = TrustedKeys::default();
        t.insert(kp.public_key());
        let good = run_on("p", 0, chain::genesis(&p), 3, 0, &kp);
        assert_eq!(check_run(&good, &p, &t, &[kp.id().to_string()]), Ok(()));
        type Tamper = fn(&mut Run);
        let cases: &[(&str, Tamper, FaultKind)] = &[
            (
                "body",
                |r| r.entries[1].body.push(b'!'),
                FaultKind::BadChainHash(1),
            ),
            (
                "timestamp",
                |r| r.entries[0].timestamp_ms += 1,
                FaultKind::BadChainHash(0),
            ),
            (
                "header",
                |r| r.entries[2].headers.clear(),
                FaultKind::BadChainHash(2),
            ),
            (
                "relinked",
                |r| r.entries[2].prev_hash = Hash32::ZERO,
                FaultKind::BrokenLink(2),
            ),
            (
                "not from genesis",
                |r| r.entries[0].prev_hash = Hash32::ZERO,
                FaultKind::BrokenLink(0),
            ),
            (
                "moved in the log",
                |r| r.prev_seq += 1,
                FaultKind::BadSignature(String::new()),
            ),
            (
                "moved in its batch",
                |r| r.seal.batch_index = 1,
                FaultKind::BadSignature(String::new()),
            ),
            (
                "bad signature",
                |r| r.seal.commitments[0].signature[0] ^= 1,
                FaultKind::BadSignature(String::new()),
            ),
        ];
        for (name, tamper, want) in cases {
            let mut r = good.clone();
            tamper(&mut r);
            let got = check_run(&r, &p, &t, &[]).expect_err(name);
            assert_eq!(got.code(), want.code(), "{name}: {got}");
            if !matches!(want, FaultKind::BadSignature(_)) {
                assert_eq!(&got, want, "{name}");
            }
        }
        assert_eq!(
            check_run(&good, &p, &t, &["k2".into()]),
            Err(FaultKind::MissingKey("k2".into()))
        );
    }

    #[test]
    fn a_change_of_keys_sealed_by_the_old_keys_verifies_and_one_without_them_is_foreign() {
        let k1 = Keypair::from_seed([11; 32]);
        let k2 = Keypair::from_seed([12; 32]);
        let p = ProcessId::new("p").unwrap();
        let r1 = run_on("p", 0, chain::genesis(&p), 2, 0, &k1);
        // The handover: declares {k2}, sealed by k2 and by k1, the key it replaces.
        let handover = next(&r1, 2, Some(&[&k2]), &[&k2, &k1]);
        let after = next(&handover, 3, Some(&[&k2]), &[&k2]);
        let mut v = trusting(&[&k1, &k2]);
        for (seq, r) in [(1, &r1), (2, &handover), (3, &after)] {
            assert_eq!(v.feed(seq, Ok(r)), chain(), "run at {seq}");
        }
        assert_eq!(
            v.point().and_then(|p| p.keys.clone()),
            Some(vec![k2.id().to_string()])
        );

        // Without the old key's seal the change is not the chain's: foreign, and the
        // honest handover written after it continues the chain.
        let usurper = next(&r1, 2, Some(&[&k2]), &[&k2]);
        let mut v = trusting(&[&k1, &k2]);
        assert_eq!(v.feed(1, Ok(&r1)), chain());
        assert_eq!(
            v.feed(2, Ok(&usurper)),
            Verdict::Foreign(FaultKind::UnauthorizedKeyChange {
                from: vec![k1.id().to_string()],
                to: Some(vec![k2.id().to_string()]),
                missing: k1.id().to_string(),
            })
        );
        let honest = next(&r1, 3, Some(&[&k2]), &[&k1, &k2]);
        assert_eq!(v.feed(3, Ok(&honest)), chain());
        assert_eq!(v.point().map(|p| p.next_slot), Some(4));
        assert_eq!(
            FaultKind::UnauthorizedKeyChange {
                from: vec![],
                to: None,
                missing: String::new()
            }
            .code(),
            "unauthorized_key_change"
        );
    }

    #[test]
    fn a_run_must_carry_every_key_it_declares_whatever_the_verifier_requires() {
        let k1 = Keypair::from_seed([11; 32]);
        let k2 = Keypair::from_seed([12; 32]);
        let p = ProcessId::new("p").unwrap();
        let mut t = TrustedKeys::default();
        t.insert(k1.public_key());
        t.insert(k2.public_key());
        let mut r = run_on("p", 0, chain::genesis(&p), 2, 0, &k1);
        r.keys = Some(crate::keys::key_set(&[k1.id(), k2.id()]));
        seal_by(&mut r, &[&k1]);
        assert_eq!(
            check_run(&r, &p, &t, &[]),
            Err(FaultKind::MissingKey(k2.id().to_string()))
        );
        seal_by(&mut r, &[&k1, &k2]);
        assert_eq!(check_run(&r, &p, &t, &[]), Ok(()));
        // The verifier's own demand comes on top of the declared keys.
        r.keys = Some(vec![]);
        seal_by(&mut r, &[&k1]);
        assert_eq!(check_run(&r, &p, &t, &[]), Ok(()));
        assert_eq!(
            check_run(&r, &p, &t, &[k2.id().to_string()]),
            Err(FaultKind::MissingKey(k2.id().to_string()))
        );
        // A run cannot claim another set than it was sealed with: the set is signed.
        let mut claimed = r.clone();
        claimed.keys = Some(vec![k1.id().to_string()]);
        assert!(matches!(
            check_run(&claimed, &p, &t, &[]),
            Err(FaultKind::BadSignature(_))
        ));
    }

    #[test]
    fn where_there_is_no_set_to_hand_over_from_any_set_may_be_declared() {
        let k1 = Keypair::from_seed([11; 32]);
        let k2 = Keypair::from_seed([12; 32]);
        let p = ProcessId::new("p").unwrap();
        // Genesis: the first run declares what it likes (here {k1, k2}).
        let mut first = run_on("p", 0, chain::genesis(&p), 2, 0, &k1);
        first.keys = Some(crate::keys::key_set(&[k1.id(), k2.id()]));
        seal_by(&mut first, &[&k1, &k2]);
        let mut v = trusting(&[&k1, &k2]);
        assert_eq!(v.feed(1, Ok(&first)), chain());
        // Dropping a key needs both old keys; dropping to the empty set too.
        let to_k2 = next(&first, 2, Some(&[&k2]), &[&k2]);
        assert_eq!(
            v.clone().feed(2, Ok(&to_k2)),
            Verdict::Foreign(FaultKind::UnauthorizedKeyChange {
                from: crate::keys::key_set(&[k1.id(), k2.id()]),
                to: Some(vec![k2.id().to_string()]),
                missing: k1.id().to_string(),
            })
        );
        let to_none = next(&first, 2, Some(&[]), &[&k1, &k2]);
        assert_eq!(v.feed(2, Ok(&to_none)), chain());
        // From the empty set there is nothing to consent: any trusted key may add one.
        let to_k1 = next(&to_none, 3, Some(&[&k1]), &[&k1]);
        assert_eq!(v.feed(3, Ok(&to_k1)), chain());

        // After a gap the run before is gone: the set is taken as given, the gap reported.
        let mut gapped = run_on("p", 10, Hash32::digest(b"lost"), 1, 3, &k2);
        gapped.keys = Some(vec![k2.id().to_string()]);
        seal_by(&mut gapped, &[&k2]);
        match v.feed(4, Ok(&gapped)) {
            Verdict::Chain { lost } => assert_eq!(
                lost,
                vec![FaultKind::Gap {
                    expected: 6,
                    found: 10
                }]
            ),
            other => panic!("{other:?}"),
        }
        // Mid-log: the first run is taken as given, its set too.
        let mut t = TrustedKeys::default();
        t.insert(k2.public_key());
        let mut mid = LogVerifier::resume(p, t, vec![], None, None);
        assert_eq!(mid.feed(4, Ok(&gapped)), chain());
        assert_eq!(
            mid.point().and_then(|p| p.keys.clone()),
            Some(vec![k2.id().to_string()])
        );
    }

    #[test]
    fn version_2_history_hands_over_to_any_set_and_never_back_without_the_keys() {
        let k1 = Keypair::from_seed([11; 32]);
        let k2 = Keypair::from_seed([12; 32]);
        let p = ProcessId::new("p").unwrap();
        let mut old = run_on("p", 0, chain::genesis(&p), 2, 0, &k1);
        old.v = 2;
        old.keys = None;
        seal_by(&mut old, &[&k1]);
        let old2 = next(&old, 2, None, &[&k2]);
        let first_v3 = next(&old2, 3, Some(&[&k1]), &[&k1]);
        let mut v = trusting(&[&k1, &k2]);
        for (seq, r) in [(1, &old), (2, &old2), (3, &first_v3)] {
            assert_eq!(v.feed(seq, Ok(r)), chain(), "run at {seq}");
        }
        // A version 2 run after a version 3 one declares nothing: a change that needs
        // the keys of the set it replaces.
        let downgrade = next(&first_v3, 4, None, &[&k2]);
        assert!(matches!(
            v.clone().feed(4, Ok(&downgrade)),
            Verdict::Foreign(FaultKind::UnauthorizedKeyChange { to: None, .. })
        ));
        let consented = next(&first_v3, 4, None, &[&k2, &k1]);
        assert_eq!(v.feed(4, Ok(&consented)), chain());
    }
}
