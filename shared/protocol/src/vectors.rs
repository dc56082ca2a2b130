//! The golden test vectors of `schemas/vectors.json`: fixed inputs, fixed seed key,
//! and every derived value (encoding, hashes, Merkle roots and paths, run digests,
//! the batch seal and its signature, the MessagePack records), and log scenarios:
//! messages of one log subject in stream order with the verdict of
//! [`crate::verify::LogVerifier`] on each (chain, or foreign and why).
//! `cargo run -p protocol --example vectors` prints them; the tests recompute them,
//! compare with the committed file and replay the committed scenarios.

use serde_json::{json, Value};

use crate::chain::{self, Fields};
use crate::hash::Hash32;
use crate::keys::Keypair;
use crate::merkle;
use crate::seal::{self, Seal};
use crate::wire::{Entry, Run, RECORD_VERSION};
use crate::ProcessId;

/// The fixed secret seed of the vector key.
pub const SEED: [u8; 32] = [0x42; 32];

/// One assignment's inputs: slot, message id, timestamp, headers, body.
type Input<'a> = (u64, &'a str, u64, Vec<(String, String)>, &'a [u8]);

/// Computes the vectors document.
pub fn compute() -> crate::Result<Value> {
    let process = ProcessId::new("proc-A")?;
    let key = Keypair::from_seed(SEED);
    let inputs: Vec<Input<'_>> = vec![
        (
            0,
            "msg-0",
            1_700_000_000_000,
            vec![
                ("content-type".into(), "text/plain".into()),
                ("a".into(), "1".into()),
            ],
            b"hello",
        ),
        (1, "msg-1", 1_700_000_000_000, vec![], b""),
        (
            2,
            "msg-2",
            1_700_000_000_001,
            vec![("k".into(), "v".into())],
            &[0, 1, 2, 255],
        ),
    ];
    let genesis = chain::genesis(&process);
    let mut prev = genesis;
    let mut entries = Vec::new();
    let mut assignments = Vec::new();
    for (slot, id, ts, mut headers, body) in inputs {
        // Stored sorted, as the scheduler stores them; the canonical encoding sorts anyway.
        headers.sort();
        let body_hash = Hash32::digest(body);
        let fields = Fields {
            process: process.as_str(),
            slot,
            message_id: id,
            timestamp_ms: ts,
            headers: &headers,
            body_hash,
        };
        let canonical = chain::canonical_encoding(&fields);
        let chain_hash = chain::chain_hash(&prev, &fields);
        assignments.push(json!({
            "slot": slot,
            "message_id": id,
            "timestamp_ms": ts,
            "headers": headers,
            "body_hex": hex::encode(body),
            "body_hash": body_hash.to_hex(),
            "prev_hash": prev.to_hex(),
            "canonical_hex": hex::encode(&canonical),
            "chain_hash": chain_hash.to_hex(),
        }));
        entries.push(Entry {
            slot,
            message_id: id.into(),
            timestamp_ms: ts,
            headers,
            body: body.to_vec(),
            prev_hash: prev,
            chain_hash,
        });
        prev = chain_hash;
    }
    let run = Run {
        v: RECORD_VERSION,
        process: process.to_string(),
        prev_seq: 0,
        first_slot: 0,
        keys: Some(vec![key.id().to_string()]),
        entries,
        seal: Seal::default(),
    };

    // A second run, of another process, sealed in the same batch.
    let other = ProcessId::new("proc-B")?;
    let (headers, body): (Vec<(String, String)>, &[u8]) = (
        vec![("x-note".into(), "grüße".into())],
        "héllo wörld".as_bytes(),
    );
    let b_id = "b-0-ü";
    let b_fields = Fields {
        process: other.as_str(),
        slot: 0,
        message_id: b_id,
        timestamp_ms: 1_700_000_000_002,
        headers: &headers,
        body_hash: Hash32::digest(body),
    };
    let b_prev = chain::genesis(&other);
    let b_entry = Entry {
        slot: 0,
        message_id: b_id.into(),
        timestamp_ms: 1_700_000_000_002,
        headers: headers.clone(),
        body: body.to_vec(),
        prev_hash: b_prev,
        chain_hash: chain::chain_hash(&b_prev, &b_fields),
    };
    let run_b = Run {
        v: RECORD_VERSION,
        process: other.to_string(),
        prev_seq: 7,
        first_slot: 0,
        keys: Some(vec![]),
        entries: vec![b_entry],
        seal: Seal::default(),
    };

    let mut runs = [run, run_b];
    let statements: Vec<Vec<u8>> = runs.iter().map(Run::statement).collect();
    let digests: Vec<Hash32> = statements.iter().map(|s| seal::run_digest(s)).collect();
    let batch_root = merkle::root(&digests);
    let batch_statement = seal::batch_statement(digests.len() as u64, &batch_root);
    for (run, s) in runs.iter_mut().zip(seal::seal(&digests, &[&key])) {
        run.seal = s;
    }
    let mut run_docs = Vec::new();
    for (run, statement) in runs.iter().zip(&statements) {
        let leaves = run.leaves();
        let paths: Vec<Vec<String>> = (0..leaves.len())
            .map(|i| merkle::proof(&leaves, i).map(|p| p.iter().map(Hash32::to_hex).collect()))
            .collect::<crate::Result<_>>()?;
        run_docs.push(json!({
            "process": run.process,
            "prev_seq": run.prev_seq,
            "first_slot": run.first_slot,
            "keys": run.keys,
            "count": leaves.len(),
            "merkle_root": merkle::root(&leaves).to_hex(),
            "merkle_paths": paths,
            "statement_hex": hex::encode(statement),
            "run_digest": seal::run_digest(statement).to_hex(),
            "batch_index": run.seal.batch_index,
            "batch_path": run.seal.batch_path.iter().map(Hash32::to_hex).collect::<Vec<_>>(),
            "record_msgpack_hex": hex::encode(run.encode()?),
        }));
    }
    Ok(json!({
        "description": "turnstile golden vectors; see schemas/chain.md. All hex is lowercase.",
        "key": {
            "secret_seed": hex::encode(SEED),
            "public_key": hex::encode(key.public_key()),
            "key_id": key.id(),
        },
        "process": process.as_str(),
        "genesis": genesis.to_hex(),
        "assignments": assignments,
        "other_process": {
            "process": other.as_str(),
            "genesis": b_prev.to_hex(),
            "assignment": {
                "slot": 0, "message_id": b_id, "timestamp_ms": 1_700_000_000_002u64, "headers": headers,
                "body_hex": hex::encode(body),
                "body_hash": Hash32::digest(body).to_hex(),
                "prev_hash": b_prev.to_hex(),
                "canonical_hex": hex::encode(chain::canonical_encoding(&b_fields)),
                "chain_hash": runs[1].entries[0].chain_hash.to_hex(),
            },
        },
        "runs": run_docs,
        "receipt": {
            "description": "receipt of proc-A slot 1 (durable, not a duplicate) as the scheduler replies it",
            "msgpack_hex": hex::encode(runs[0].receipt(1, true, false)?.encode()?),
        },
        "batch": {
            "size": digests.len(),
            "root": batch_root.to_hex(),
            "statement_hex": hex::encode(&batch_statement),
            "signature": hex::encode(&runs[0].seal.commitments[0].signature),
        },
        "logs": log_scenarios(&key)?,
    }))
}

/// The process of the log scenarios.
const LOG_PROCESS: &str = "proc-L";
/// Seed of a key no scenario trusts.
const STRANGER_SEED: [u8; 32] = [0x07; 32];
/// Seed of a second trusted key (the required-keys scenario).
const SECOND_SEED: [u8; 32] = [0x43; 32];

/// `n` assignments of `process` from slot `first` on `prev`, written after stream
/// sequence `prev_seq`, not yet sealed. The contents are fixed by `tag` and the slot.
fn log_run(process: &str, prev_seq: u64, first: u64, prev: Hash32, n: u64, tag: &str) -> Run {
    let mut prev = prev;
    let entries = (first..first + n)
        .map(|slot| {
            let mut e = Entry {
                slot,
                message_id: format!("{tag}-{slot}"),
                timestamp_ms: 1_700_000_100_000 + slot,
                headers: vec![("tag".into(), tag.into())],
                body: format!("{tag} assignment {slot}").into_bytes(),
                prev_hash: prev,
                chain_hash: Hash32::ZERO,
            };
            e.chain_hash = e.recompute_chain_hash(process);
            prev = e.chain_hash;
            e
        })
        .collect();
    Run {
        v: RECORD_VERSION,
        process: process.into(),
        prev_seq,
        first_slot: first,
        keys: Some(vec![]),
        entries,
        seal: Seal::default(),
    }
}

/// Seals `run` as run `index` of a batch of `size` (the other digests stand for runs of
/// other processes), signed by `keys`.
fn seal_in_batch(run: &mut Run, keys: &[&Keypair], size: usize, index: usize) {
    let digests: Vec<Hash32> = (0..size)
        .map(|i| {
            if i == index {
                seal::run_digest(&run.statement())
            } else {
                Hash32::digest(format!("another run {i}").as_bytes())
            }
        })
        .collect();
    run.seal = seal::seal(&digests, keys).swap_remove(index);
}

/// Recomputes the chain hashes of `run` from entry `from` on, relinking each entry to
/// the one before it (what a forger does after changing an entry).
fn rechain(run: &mut Run, from: usize) {
    for i in from..run.entries.len() {
        if i > 0 {
            run.entries[i].prev_hash = run.entries[i - 1].chain_hash;
        }
        run.entries[i].chain_hash = run.entries[i].recompute_chain_hash(&run.process);
    }
}

/// The messages of one log subject as a scenario writes them, and where the
/// scheduler's chain stands.
struct Subject<'k> {
    key: &'k Keypair,
    /// The key set the scheduler's runs declare (the vector key's id by default).
    declares: Vec<String>,
    next_slot: u64,
    prev: Hash32,
    last_seq: u64,
    messages: Vec<(u64, Vec<u8>)>,
}

impl<'k> Subject<'k> {
    fn new(key: &'k Keypair) -> crate::Result<Subject<'k>> {
        Ok(Subject {
            key,
            declares: vec![key.id().to_string()],
            next_slot: 0,
            prev: chain::genesis(&ProcessId::new(LOG_PROCESS)?),
            last_seq: 0,
            messages: Vec::new(),
        })
    }

    /// The scheduler's next run of `n` entries, written after the subject's last
    /// message, declaring [`Subject::declares`], sealed alone by the vector key (not
    /// yet appended).
    fn next_run(&self, n: u64, tag: &str) -> Run {
        let mut run = log_run(
            LOG_PROCESS,
            self.last_seq,
            self.next_slot,
            self.prev,
            n,
            tag,
        );
        run.keys = Some(self.declares.clone());
        seal_in_batch(&mut run, &[self.key], 1, 0);
        run
    }

    /// The next run of `n` entries declaring `declares` (none: a version 2 run),
    /// sealed alone by `signers`.
    fn run_by(&self, n: u64, declares: Option<&[&Keypair]>, signers: &[&Keypair]) -> Run {
        let mut run = self.next_run(n, "m");
        match declares {
            Some(ks) => {
                let ids: Vec<&str> = ks.iter().map(|k| k.id()).collect();
                run.keys = Some(crate::keys::key_set(&ids));
            }
            None => {
                run.v = 2;
                run.keys = None;
            }
        }
        seal_in_batch(&mut run, signers, 1, 0);
        run
    }

    /// Appends any bytes as the subject's next message, at stream sequence `seq`.
    fn append(&mut self, seq: u64, bytes: Vec<u8>) {
        assert!(seq > self.last_seq, "stream sequences increase");
        self.messages.push((seq, bytes));
        self.last_seq = seq;
    }

    /// Appends a genuine run that continues the chain.
    fn write(&mut self, seq: u64, run: &Run) -> crate::Result<()> {
        self.append(seq, run.encode()?);
        self.next_slot = run.last_slot() + 1;
        self.prev = run.head();
        Ok(())
    }

    /// The scheduler writes its next run of `n` entries at `seq`, sealed by the vector
    /// key as run `index` of a batch of `size`.
    fn write_next(&mut self, seq: u64, n: u64, size: usize, index: usize) -> crate::Result<()> {
        let mut run = self.next_run(n, "m");
        seal_in_batch(&mut run, &[self.key], size, index);
        self.write(seq, &run)
    }

    /// The bytes of the message at stream sequence `seq`.
    fn message(&self, seq: u64) -> Vec<u8> {
        self.messages
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    }

    /// An honest start: the first `runs` of runs of 2, 3, 1 and 2 entries, written at
    /// stream sequences 1, 2, 3 and 4.
    fn honest_start(&mut self, runs: usize) -> crate::Result<()> {
        for (i, n) in [2, 3, 1, 2].into_iter().take(runs).enumerate() {
            self.write_next(i as u64 + 1, n, 1, 0)?;
        }
        Ok(())
    }
}

/// One scenario's document: the messages with the verdict of
/// [`crate::verify::LogVerifier::from_genesis`] on each, and where the chain ends.
fn scenario(
    name: &str,
    description: &str,
    trusted: &[[u8; 32]],
    required: &[String],
    messages: &[(u64, Vec<u8>)],
) -> crate::Result<Value> {
    let process = ProcessId::new(LOG_PROCESS)?;
    let mut keys = crate::verify::TrustedKeys::default();
    for k in trusted {
        keys.insert(*k);
    }
    let mut v = crate::verify::LogVerifier::from_genesis(process, keys, required.to_vec());
    let docs: Vec<Value> = messages
        .iter()
        .map(|(seq, bytes)| {
            let run = Run::decode(bytes).map_err(|e| e.to_string());
            json!({
                "seq": seq,
                "record_hex": hex::encode(bytes),
                "expected": verdict_doc(&v.feed(*seq, run.as_ref().map_err(Clone::clone))),
            })
        })
        .collect();
    let point = v
        .point()
        .ok_or(crate::Error::InvalidProof("no chain point"))?;
    let declared = point.keys.clone();
    Ok(json!({
        "name": name,
        "description": description,
        "process": LOG_PROCESS,
        "trusted_public_keys": trusted.iter().map(hex::encode).collect::<Vec<_>>(),
        "required_key_ids": required,
        "messages": docs,
        "end": {
            "next_slot": point.next_slot,
            "chain_head": point.prev.to_hex(),
            "keys": declared,
            "last_seq": v.last_seq(),
        },
    }))
}

/// A verdict as the vectors write it.
fn verdict_doc(verdict: &crate::verify::Verdict) -> Value {
    match verdict {
        crate::verify::Verdict::Chain { lost } => {
            json!({"verdict": "chain", "lost": lost.iter().map(|k| k.code()).collect::<Vec<_>>()})
        }
        crate::verify::Verdict::Foreign(k) => json!({"verdict": "foreign", "fault": k.code()}),
    }
}

/// The log scenarios of schemas/chain.md "Verifying a log: chain and foreign messages":
/// messages of the subject of [`LOG_PROCESS`] in stream order, each judged chain or
/// foreign by [`crate::verify::LogVerifier`].
fn log_scenarios(key: &Keypair) -> crate::Result<Vec<Value>> {
    let stranger = Keypair::from_seed(STRANGER_SEED);
    let second = Keypair::from_seed(SECOND_SEED);
    let trusted = [key.public_key()];
    let required = [key.id().to_string()];
    let mut out = Vec::new();

    // An honest log; other subjects' messages take stream sequences 2, 4 and 5.
    let mut s = Subject::new(key)?;
    s.write_next(1, 2, 1, 0)?;
    s.write_next(3, 3, 3, 1)?;
    s.write_next(6, 1, 2, 1)?;
    out.push(scenario(
        "honest",
        "three genuine runs, each written after the subject's last message (sequences 2, 4 and 5 are other subjects' messages), sealed alone, as run 1 of a batch of 3 and as run 1 of a batch of 2",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Replays after the head, each followed by the scheduler's next run.
    let mut s = Subject::new(key)?;
    s.honest_start(3)?;
    s.append(5, s.message(2));
    s.write_next(6, 2, 1, 0)?;
    s.append(7, s.message(6));
    s.write_next(9, 1, 1, 0)?;
    out.push(scenario(
        "replay_after_head",
        "three genuine runs; the run at sequence 2 published again at 5 (replayed); the next genuine run, written after 5; the head (6) published again at 7 (replayed); the next genuine run, written after 7",
        &trusted,
        &required,
        &s.messages,
    )?);

    // A forged run: one body byte changed, chain hashes recomputed, old seal kept.
    let mut s = Subject::new(key)?;
    s.honest_start(3)?;
    let mut forged = s.next_run(3, "m");
    forged.entries[1].body[0] ^= 0x01;
    rechain(&mut forged, 1);
    s.append(4, forged.encode()?);
    s.write_next(5, 2, 1, 0)?;
    out.push(scenario(
        "forged_run",
        "three genuine runs; at 4 a run in its place whose entry 1 body has one byte changed, chain hashes recomputed, the original seal kept (bad_signature); the next genuine run, written after 4",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Garbage of several kinds after the head.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    s.append(3, b"\xc1 not MessagePack".to_vec());
    s.append(4, Vec::new());
    s.append(5, b"\x81\xa5hello\xa5world".to_vec());
    let mut v1 = s.next_run(2, "m");
    v1.v = 1;
    s.append(6, v1.encode()?);
    let whole = s.next_run(2, "m").encode()?;
    s.append(7, whole[..whole.len() / 2].to_vec());
    let mut empty = s.next_run(1, "m");
    empty.entries.clear();
    s.append(8, empty.encode()?);
    s.write_next(9, 2, 1, 0)?;
    out.push(scenario(
        "garbage",
        "two genuine runs; then bytes that are not MessagePack (3), an empty message (4), a MessagePack map that is not a Run (5), a Run of record version 1 (6), half of a genuine record (7), a Run with no entries (8); the next genuine run, written after 8",
        &trusted,
        &required,
        &s.messages,
    )?);

    // A genuine run of another process.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    let other = ProcessId::new("proc-M")?;
    let mut theirs = log_run(other.as_str(), 2, 0, chain::genesis(&other), 2, "m");
    seal_in_batch(&mut theirs, &[key], 1, 0);
    s.append(3, theirs.encode()?);
    s.write_next(4, 1, 1, 0)?;
    out.push(scenario(
        "other_process",
        "two genuine runs; at 3 a genuine run of process proc-M signed by the vector key (wrong_process); the next genuine run, written after 3",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Runs signed by a key nobody trusts.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    let mut r = s.next_run(2, "m");
    seal_in_batch(&mut r, &[&stranger], 1, 0);
    s.append(3, r.encode()?);
    let mut r = s.next_run(2, "m");
    seal_in_batch(&mut r, &[key, &stranger], 1, 0);
    s.append(4, r.encode()?);
    s.write_next(5, 1, 1, 0)?;
    out.push(scenario(
        "untrusted_key",
        "two genuine runs; at 3 a run in its place signed only by an untrusted key (seed 32 x 0x07); at 4 one signed by the vector key and the untrusted key; the next genuine run, written after 4",
        &trusted,
        &required,
        &s.messages,
    )?);

    // An unsigned run.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    let mut r = s.next_run(2, "m");
    r.seal.commitments.clear();
    s.append(3, r.encode()?);
    s.write_next(4, 1, 1, 0)?;
    out.push(scenario(
        "unsigned",
        "two genuine runs; at 3 a run in its place whose seal has no commitment; the next genuine run, written after 3",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Signed forks: slots given again, and a run at the next slot on another history.
    let mut s = Subject::new(key)?;
    s.honest_start(3)?;
    let run1_head = Run::decode(&s.message(1))?.head();
    let mut fork = log_run(LOG_PROCESS, 3, 2, run1_head, 2, "fork");
    seal_in_batch(&mut fork, &[key], 1, 0);
    s.append(4, fork.encode()?);
    let elsewhere = Hash32::digest(b"another history");
    let mut fork = log_run(LOG_PROCESS, 4, s.next_slot, elsewhere, 2, "fork");
    seal_in_batch(&mut fork, &[key], 1, 0);
    s.append(5, fork.encode()?);
    s.write_next(6, 2, 1, 0)?;
    out.push(scenario(
        "fork",
        "three genuine runs (slots 0..=5); at 4 a run signed by the vector key, in its place, giving slots 2..=3 again (fork); at 5 one at slot 6, in its place, whose first prev_hash is not the head (fork); the next genuine run, written after 5",
        &trusted,
        &required,
        &s.messages,
    )?);

    // A run lost from the store.
    let mut s = Subject::new(key)?;
    s.honest_start(4)?;
    s.messages.retain(|(seq, _)| *seq != 3);
    out.push(scenario(
        "lost_run",
        "four genuine runs written at 1..=4; the one at 3 (slot 5) is gone: the run at 4 continues the chain with lost and gap",
        &trusted,
        &required,
        &s.messages,
    )?);

    // A foreign message lost from the store: no slot is missing.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    s.append(3, b"\xc1 foreign".to_vec());
    s.write_next(4, 2, 1, 0)?;
    s.messages.retain(|(seq, _)| *seq != 3);
    out.push(scenario(
        "lost_foreign_message",
        "two genuine runs; a foreign message at 3, gone from the store; the genuine run at 4, written after 3, continues the chain with lost only",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Garbage first, then the chain.
    let mut s = Subject::new(key)?;
    s.append(1, b"\xc1 garbage first".to_vec());
    s.write_next(2, 2, 1, 0)?;
    s.write_next(3, 1, 1, 0)?;
    out.push(scenario(
        "garbage_first",
        "garbage as the subject's first message (undecodable); the first genuine run (slot 0), written after 1; the next",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Entries that do not link or do not recompute, re-signed by the vector key.
    let mut s = Subject::new(key)?;
    let mut r = s.next_run(2, "m");
    r.entries[0].prev_hash = Hash32::digest(b"not the genesis hash");
    rechain(&mut r, 0);
    seal_in_batch(&mut r, &[key], 1, 0);
    s.append(1, r.encode()?);
    s.write_next(2, 2, 1, 0)?;
    let mut r = s.next_run(3, "m");
    r.entries[1].body.push(b'!');
    seal_in_batch(&mut r, &[key], 1, 0);
    s.append(3, r.encode()?);
    let mut r = s.next_run(3, "m");
    r.entries[1].prev_hash = Hash32::digest(b"elsewhere");
    r.entries[1].chain_hash = r.entries[1].recompute_chain_hash(LOG_PROCESS);
    rechain(&mut r, 2);
    seal_in_batch(&mut r, &[key], 1, 0);
    s.append(4, r.encode()?);
    s.write_next(5, 1, 1, 0)?;
    out.push(scenario(
        "tampered_entries",
        "runs signed by the vector key after tampering: at 1 slot 0 not linked to the genesis hash (chain hashes recomputed); the first genuine run, written after 1; at 3 an entry body changed without recomputing its chain hash (bad_chain_hash); at 4 entry 1 linked elsewhere, chain hashes recomputed (broken_link); the next genuine run, written after 4",
        &trusted,
        &required,
        &s.messages,
    )?);

    // Two keys trusted and required.
    let mut s = Subject::new(key)?;
    let both = [key, &second];
    let mut r = s.next_run(2, "m");
    seal_in_batch(&mut r, &both, 2, 0);
    s.write(1, &r)?;
    s.append(2, s.next_run(1, "m").encode()?);
    let mut r = s.next_run(2, "m");
    seal_in_batch(&mut r, &both, 3, 2);
    s.write(3, &r)?;
    out.push(scenario(
        "required_keys",
        "two trusted keys (the vector key and seed 32 x 0x43), both required: a run signed by both; at 2 a run in its place signed by the vector key only (missing_key); a run signed by both, written after 2",
        &[key.public_key(), second.public_key()],
        &[key.id().to_string(), second.id().to_string()],
        &s.messages,
    )?);

    // The required keys change from {vector key} to {second}, with a handover.
    let both_trusted = [key.public_key(), second.public_key()];
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    let r = s.run_by(2, Some(&[&second]), &[&second, key]);
    s.write(3, &r)?;
    let r = s.run_by(1, Some(&[&second]), &[&second]);
    s.write(4, &r)?;
    out.push(scenario(
        "key_change_handover",
        "two trusted keys (the vector key and seed 32 x 0x43), none required by the verifier: two runs declaring [vector key] sealed by it; at 3 a run declaring [second key] sealed by both keys (the handover); at 4 a run declaring [second key] sealed by it alone",
        &both_trusted,
        &[],
        &s.messages,
    )?);

    // The same change without the old key's seal.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    s.append(3, s.run_by(2, Some(&[&second]), &[&second]).encode()?);
    let r = s.run_by(2, Some(&[&second]), &[key, &second]);
    s.write(4, &r)?;
    out.push(scenario(
        "key_change_unauthorized",
        "two trusted keys, none required by the verifier: two runs declaring [vector key] sealed by it; at 3 a run in its place declaring [second key] sealed by the second key only (unauthorized_key_change); at 4 the handover, declaring [second key] sealed by both, written after 3",
        &both_trusted,
        &[],
        &s.messages,
    )?);

    // A run lacking a key it declares itself.
    let mut s = Subject::new(key)?;
    s.honest_start(2)?;
    s.append(3, s.run_by(1, Some(&[key, &second]), &[key]).encode()?);
    let r = s.run_by(1, Some(&[key, &second]), &[key, &second]);
    s.write(4, &r)?;
    let r = s.run_by(2, Some(&[key, &second]), &[key, &second]);
    s.write(5, &r)?;
    out.push(scenario(
        "declared_key_missing",
        "two trusted keys, none required by the verifier: two runs declaring [vector key]; at 3 a run declaring both keys sealed by the vector key only (missing_key); at 4 a run declaring both keys sealed by both, written after 3; at 5 another",
        &both_trusted,
        &[],
        &s.messages,
    )?);

    // Version 2 history (no declared keys), then version 3 runs.
    let mut s = Subject::new(key)?;
    let r = s.run_by(2, None, &[key]);
    s.write(1, &r)?;
    let r = s.run_by(1, None, &[&second]);
    s.write(2, &r)?;
    let r = s.run_by(2, Some(&[key]), &[key]);
    s.write(3, &r)?;
    s.append(4, s.run_by(1, None, &[&second]).encode()?);
    let r = s.run_by(1, Some(&[key]), &[key]);
    s.write(5, &r)?;
    out.push(scenario(
        "version_2_history",
        "two trusted keys, none required by the verifier: two record version 2 runs (no declared keys; statement \"turnstile/run/v2\"), sealed by the vector key and by the second key; at 3 a version 3 run declaring [vector key] (after a run that declares nothing, any set); at 4 a version 2 run sealed by the second key only (declares nothing: a change that needs the vector key: unauthorized_key_change); at 5 a version 3 run declaring [vector key], written after 4",
        &both_trusted,
        &[],
        &s.messages,
    )?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_golden_vectors_match_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/vectors.json");
        let text = std::fs::read_to_string(path).expect("schemas/vectors.json exists");
        let committed: Value = serde_json::from_str(&text).expect("valid JSON");
        let computed = compute().unwrap();
        assert_eq!(committed, computed, "regenerate with `cargo run -p protocol --example vectors > schemas/vectors.json` only if the format changed on purpose");
        // And the committed record decodes to a run that verifies with the vector key.
        for (doc, process, count) in [
            (&committed["runs"][0], "proc-A", 3),
            (&committed["runs"][1], "proc-B", 1),
        ] {
            let record = hex::decode(doc["record_msgpack_hex"].as_str().unwrap()).unwrap();
            let run = Run::decode(&record).unwrap();
            let mut trusted = crate::verify::TrustedKeys::default();
            trusted.insert(Keypair::from_seed(SEED).public_key());
            let mut v = crate::verify::LogVerifier::resume(
                ProcessId::new(process).unwrap(),
                trusted,
                vec![],
                None,
                None,
            );
            let seq = run.prev_seq + 1;
            assert_eq!(
                v.feed(seq, Ok(&run)),
                crate::verify::Verdict::Chain { lost: vec![] }
            );
            assert_eq!(v.checked(), count);
        }
    }

    #[test]
    fn every_committed_log_scenario_replays_to_its_verdicts() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/vectors.json");
        let text = std::fs::read_to_string(path).expect("schemas/vectors.json exists");
        let committed: Value = serde_json::from_str(&text).expect("valid JSON");
        let scenarios = committed["logs"].as_array().expect("logs");
        let mut codes = std::collections::BTreeSet::new();
        for sc in scenarios {
            let name = sc["name"].as_str().unwrap();
            let mut trusted = crate::verify::TrustedKeys::default();
            for k in sc["trusted_public_keys"].as_array().unwrap() {
                let pk: [u8; 32] = hex::decode(k.as_str().unwrap())
                    .unwrap()
                    .try_into()
                    .unwrap();
                trusted.insert(pk);
            }
            let required = sc["required_key_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            let process = ProcessId::new(sc["process"].as_str().unwrap()).unwrap();
            let mut v = crate::verify::LogVerifier::from_genesis(process, trusted, required);
            let mut last = 0;
            for m in sc["messages"].as_array().unwrap() {
                let seq = m["seq"].as_u64().unwrap();
                assert!(seq > last, "{name}: sequences increase");
                last = seq;
                let bytes = hex::decode(m["record_hex"].as_str().unwrap()).unwrap();
                let run = Run::decode(&bytes).map_err(|e| e.to_string());
                let got = verdict_doc(&v.feed(seq, run.as_ref().map_err(Clone::clone)));
                assert_eq!(got, m["expected"], "{name}: message at {seq}");
                match got["verdict"].as_str().unwrap() {
                    "chain" => codes.extend(
                        got["lost"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|c| c.as_str().unwrap().to_string()),
                    ),
                    _ => {
                        codes.insert(got["fault"].as_str().unwrap().to_string());
                    }
                }
            }
            let point = v.point().unwrap();
            assert_eq!(sc["end"]["next_slot"], point.next_slot, "{name}");
            assert_eq!(sc["end"]["chain_head"], point.prev.to_hex(), "{name}");
            assert_eq!(sc["end"]["keys"], json!(point.keys), "{name}");
            assert_eq!(sc["end"]["last_seq"], json!(v.last_seq()), "{name}");
        }
        // Together the scenarios name every fault of schemas/chain.md.
        let all = [
            "undecodable",
            "wrong_process",
            "broken_link",
            "bad_chain_hash",
            "unsigned",
            "untrusted_key",
            "bad_signature",
            "missing_key",
            "unauthorized_key_change",
            "replayed",
            "fork",
            "lost",
            "gap",
        ];
        assert_eq!(
            codes,
            all.iter().map(|c| c.to_string()).collect(),
            "fault codes covered"
        );
    }
}
