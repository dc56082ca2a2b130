//! Verifying a process's log, run by run, without any I/O: the caller reads runs
//! from wherever they are (JetStream, a file, a test) and feeds them in slot order.
//! The first fault names the first slot that cannot be trusted.

use std::collections::HashMap;
use std::fmt;

use crate::chain;
use crate::hash::Hash32;
use crate::process::ProcessId;
use crate::wire::Run;

/// The keys a verifier trusts: key id to public key.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(HashMap<String, [u8; 32]>);

impl TrustedKeys {
    /// Trusts `public_key` under its [`crate::keys::key_id`].
    pub fn insert(&mut self, public_key: [u8; 32]) {
        self.0.insert(crate::keys::key_id(&public_key), public_key);
    }
    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when no key is trusted (then nothing can verify).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn trusts(&self, key_id: &str, public_key: &[u8]) -> bool {
        self.0
            .get(key_id)
            .is_some_and(|pk| pk.as_slice() == public_key)
    }
}

/// What is wrong at the slot a [`Fault`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The run belongs to another process.
    WrongProcess(String),
    /// Slots do not continue: `expected` was next, the log has `found`.
    Gap {
        /// The slot that should have come next.
        expected: u64,
        /// The slot the log has instead.
        found: u64,
    },
    /// The entry's `prev_hash` is not the previous chain hash (or the genesis hash).
    BrokenLink,
    /// The stored chain hash does not match the recomputed one: the entry was altered.
    BadChainHash,
    /// The run has no commitment at all.
    Unsigned,
    /// A commitment's signature does not verify over the run's Merkle root.
    BadSignature(String),
    /// A commitment is by a key the verifier does not trust.
    UntrustedKey(String),
    /// A key the process requires did not commit.
    MissingKey(String),
}

/// The first slot that cannot be trusted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The slot.
    pub slot: u64,
    /// Why.
    pub kind: FaultKind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.slot;
        match &self.kind {
            FaultKind::WrongProcess(p) => write!(f, "slot {s}: run belongs to process {p:?}"),
            FaultKind::Gap { expected, found } => write!(
                f,
                "slot {expected}: missing (the log continues at slot {found})"
            ),
            FaultKind::BrokenLink => {
                write!(f, "slot {s}: prev_hash does not link to the previous slot")
            }
            FaultKind::BadChainHash => write!(
                f,
                "slot {s}: content does not match its chain hash (altered)"
            ),
            FaultKind::Unsigned => write!(f, "slot {s}: run has no commitment"),
            FaultKind::BadSignature(k) => {
                write!(f, "slot {s}: signature by key {k} does not verify")
            }
            FaultKind::UntrustedKey(k) => write!(f, "slot {s}: signed by untrusted key {k}"),
            FaultKind::MissingKey(k) => write!(f, "slot {s}: required key {k} did not commit"),
        }
    }
}

/// A streaming verifier of one process's log.
#[derive(Debug)]
pub struct ChainVerifier {
    process: ProcessId,
    trusted: TrustedKeys,
    required: Vec<String>,
    next_slot: Option<u64>,
    prev: Option<Hash32>,
    checked: u64,
}

impl ChainVerifier {
    /// A verifier for `process` trusting `trusted`, requiring every key id in
    /// `required` to commit to each run. The first run fed fixes where checking
    /// starts; if it starts at slot 0 its link to the genesis hash is checked too.
    pub fn new(process: ProcessId, trusted: TrustedKeys, required: Vec<String>) -> ChainVerifier {
        ChainVerifier {
            process,
            trusted,
            required,
            next_slot: None,
            prev: None,
            checked: 0,
        }
    }

    /// How many assignments have been checked.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The next slot expected, if any run was fed.
    pub fn next_slot(&self) -> Option<u64> {
        self.next_slot
    }

    /// Checks one run. After a fault the verifier's state is unspecified; stop.
    pub fn feed(&mut self, run: &Run) -> Result<(), Fault> {
        let fault = |slot, kind| Err(Fault { slot, kind });
        if run.process != self.process.as_str() {
            return fault(run.first_slot, FaultKind::WrongProcess(run.process.clone()));
        }
        if let Some(expected) = self.next_slot {
            if run.first_slot != expected {
                return fault(
                    expected,
                    FaultKind::Gap {
                        expected,
                        found: run.first_slot,
                    },
                );
            }
        }
        let mut prev = match (self.prev, run.first_slot) {
            (Some(p), _) => Some(p),
            (None, 0) => Some(chain::genesis(&self.process)),
            (None, _) => None, // Starting mid-log: the first prev_hash is taken as given.
        };
        for (i, e) in run.entries.iter().enumerate() {
            let slot = run.first_slot + i as u64;
            if e.slot != slot {
                return fault(
                    slot,
                    FaultKind::Gap {
                        expected: slot,
                        found: e.slot,
                    },
                );
            }
            if prev.is_some_and(|p| p != e.prev_hash) {
                return fault(slot, FaultKind::BrokenLink);
            }
            if e.recompute_chain_hash(self.process.as_str()) != e.chain_hash {
                return fault(slot, FaultKind::BadChainHash);
            }
            prev = Some(e.chain_hash);
        }
        let first = run.first_slot;
        let commitments = &run.seal.commitments;
        if commitments.is_empty() {
            return fault(first, FaultKind::Unsigned);
        }
        let Some(statement) = run.seal.signed_statement(&run.statement()) else {
            return fault(first, FaultKind::BadSignature("(batch path)".into()));
        };
        for c in commitments {
            if !self.trusted.trusts(&c.key_id, &c.public_key) {
                return fault(first, FaultKind::UntrustedKey(c.key_id.clone()));
            }
            if !c.check(&statement) {
                return fault(first, FaultKind::BadSignature(c.key_id.clone()));
            }
        }
        for k in &self.required {
            if !commitments.iter().any(|c| &c.key_id == k) {
                return fault(first, FaultKind::MissingKey(k.clone()));
            }
        }
        self.prev = prev;
        self.next_slot = Some(run.last_slot() + 1);
        self.checked += run.entries.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::seal::Seal;
    use crate::wire::{Entry, RECORD_VERSION};

    /// Builds `runs` consecutive runs of `per` entries each, signed by `kp`.
    fn log(process: &str, runs: usize, per: usize, kp: &Keypair) -> Vec<Run> {
        let p = ProcessId::new(process).unwrap();
        let mut prev = chain::genesis(&p);
        let mut slot = 0u64;
        let mut out = Vec::new();
        for _ in 0..runs {
            let first = slot;
            let mut entries = Vec::new();
            for _ in 0..per {
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
                entries.push(e);
                slot += 1;
            }
            out.push(Run {
                v: RECORD_VERSION,
                process: process.into(),
                first_slot: first,
                entries,
                seal: Seal::default(),
            });
        }
        // Seal all runs as one batch, as the scheduler's signer does under load.
        let digests: Vec<Hash32> = out
            .iter()
            .map(|r| crate::seal::run_digest(&r.statement()))
            .collect();
        for (run, seal) in out.iter_mut().zip(crate::seal::seal(&digests, &[kp])) {
            run.seal = seal;
        }
        out
    }

    fn check(runs: &[Run], kp: &Keypair) -> Result<u64, Fault> {
        let mut t = TrustedKeys::default();
        t.insert(kp.public_key());
        let mut v = ChainVerifier::new(ProcessId::new("p").unwrap(), t, vec![kp.id().to_string()]);
        for r in runs {
            v.feed(r)?;
        }
        Ok(v.checked())
    }

    #[test]
    fn an_honest_log_verifies() {
        let kp = Keypair::from_seed([3; 32]);
        assert_eq!(check(&log("p", 4, 3, &kp), &kp), Ok(12));
    }

    #[test]
    fn each_tampering_names_its_slot() {
        let kp = Keypair::from_seed([3; 32]);
        let honest = log("p", 4, 3, &kp);
        type Tamper = fn(&mut Vec<Run>);
        type Case = (&'static str, Tamper, u64, fn(&FaultKind) -> bool);
        let cases: &[Case] = &[
            (
                "body",
                |l| l[2].entries[1].body.push(b'!'),
                7,
                |k| *k == FaultKind::BadChainHash,
            ),
            (
                "timestamp",
                |l| l[1].entries[0].timestamp_ms += 1,
                3,
                |k| *k == FaultKind::BadChainHash,
            ),
            (
                "header",
                |l| l[3].entries[2].headers.clear(),
                11,
                |k| *k == FaultKind::BadChainHash,
            ),
            (
                "dropped run",
                |l| {
                    l.remove(1);
                },
                3,
                |k| {
                    matches!(
                        k,
                        FaultKind::Gap {
                            expected: 3,
                            found: 6
                        }
                    )
                },
            ),
            (
                "relinked",
                |l| l[2].entries[0].prev_hash = Hash32::ZERO,
                6,
                |k| *k == FaultKind::BrokenLink,
            ),
            (
                "unsigned",
                |l| l[0].seal.commitments.clear(),
                0,
                |k| *k == FaultKind::Unsigned,
            ),
            (
                "bad signature",
                |l| l[1].seal.commitments[0].signature[0] ^= 1,
                3,
                |k| matches!(k, FaultKind::BadSignature(_)),
            ),
            (
                "moved in its batch",
                |l| l[2].seal.batch_index = 0,
                6,
                |k| matches!(k, FaultKind::BadSignature(_)),
            ),
        ];
        for (name, tamper, slot, kind) in cases {
            let mut l = honest.clone();
            tamper(&mut l);
            let f = check(&l, &kp).expect_err(name);
            assert_eq!(f.slot, *slot, "{name}: {f}");
            assert!(kind(&f.kind), "{name}: {f}");
        }
    }

    #[test]
    fn a_rehashed_forgery_fails_the_signature_and_foreign_keys_are_refused() {
        let kp = Keypair::from_seed([3; 32]);
        let mut l = log("p", 2, 3, &kp);
        // Alter slot 4 and recompute the chain from there: the chain holds, the signature does not.
        l[1].entries[1].body = b"forged".to_vec();
        for i in 1..3 {
            if i > 1 {
                l[1].entries[i].prev_hash = l[1].entries[i - 1].chain_hash;
            }
            l[1].entries[i].chain_hash = l[1].entries[i].recompute_chain_hash("p");
        }
        let f = check(&l, &kp).unwrap_err();
        assert_eq!(
            (f.slot, matches!(f.kind, FaultKind::BadSignature(_))),
            (3, true),
            "{f}"
        );
        // A log signed by a stranger is refused even though it is self-consistent.
        let stranger = Keypair::from_seed([4; 32]);
        let f = check(&log("p", 1, 2, &stranger), &kp).unwrap_err();
        assert!(matches!(f.kind, FaultKind::UntrustedKey(_)));
    }
}
