//! The golden test vectors of `schemas/vectors.json`: fixed inputs, fixed seed key,
//! and every derived value (encoding, hashes, Merkle roots and paths, run digests,
//! the batch seal and its signature, the MessagePack records). `cargo run -p protocol --example vectors` prints them; the
//! tests recompute them and compare with the committed file.

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
        first_slot: 0,
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
        first_slot: 0,
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
            "first_slot": run.first_slot,
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
    }))
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
            let mut v = crate::verify::ChainVerifier::new(
                ProcessId::new(process).unwrap(),
                trusted,
                vec![],
            );
            v.feed(&run).unwrap();
            assert_eq!(v.checked(), count);
        }
    }
}
