//! Sealing: one set of signatures covers a whole batch of runs, possibly of many
//! processes, written at about the same time.
//!
//! ```text
//! run_digest      = BLAKE3(run statement)                 (see keys::run_statement)
//! batch_root      = MTH(run digests of the batch)          (see merkle; RFC 6962 shape)
//! batch statement = "turnstile/batch/v1" || u64be(batch_size) || batch_root
//! commitment      = ed25519 signature of the batch statement
//! ```
//!
//! Each run carries a [`Seal`]: its position in the batch, the audit path of its
//! digest, and the batch's commitments. Signing costs ~20 µs, so signing a batch
//! instead of every run is what lets 1,000 busy processes share one signer.

use serde::{Deserialize, Serialize};

use crate::hash::Hash32;
use crate::keys::{Commitment, Keypair};
use crate::merkle::{self, Tree};

/// Domain separator of the signed batch statement.
pub const BATCH_DOMAIN: &[u8] = b"turnstile/batch/v1";

/// A run's proof of membership in a signed batch, and the batch's signatures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// How many runs the batch sealed.
    pub batch_size: u64,
    /// This run's position in the batch.
    pub batch_index: u64,
    /// Audit path of this run's digest to the batch root, leaf side first.
    pub batch_path: Vec<Hash32>,
    /// Signatures of the batch statement.
    pub commitments: Vec<Commitment>,
}

/// The digest of a run statement: the batch tree's leaf input.
pub fn run_digest(run_statement: &[u8]) -> Hash32 {
    Hash32::digest(run_statement)
}

/// `"turnstile/batch/v1" || u64be(batch_size) || batch_root`.
pub fn batch_statement(batch_size: u64, batch_root: &Hash32) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_DOMAIN.len() + 8 + 32);
    out.extend_from_slice(BATCH_DOMAIN);
    out.extend_from_slice(&batch_size.to_be_bytes());
    out.extend_from_slice(&batch_root.0);
    out
}

/// Seals a batch: one signature per key over the root of `digests`, and each
/// digest's seal (same order as `digests`).
pub fn seal(digests: &[Hash32], keys: &[&Keypair]) -> Vec<Seal> {
    let tree = Tree::new(digests);
    let statement = batch_statement(digests.len() as u64, &tree.root());
    let commitments: Vec<Commitment> = keys.iter().map(|k| k.commit(&statement)).collect();
    (0..digests.len())
        .map(|i| Seal {
            batch_size: digests.len() as u64,
            batch_index: i as u64,
            batch_path: tree.proof(i).unwrap_or_default(),
            commitments: commitments.clone(),
        })
        .collect()
}

impl Seal {
    /// The batch statement this seal's commitments must sign, given the run statement.
    pub fn signed_statement(&self, run_statement: &[u8]) -> Option<Vec<u8>> {
        let size = usize::try_from(self.batch_size).ok()?;
        let index = usize::try_from(self.batch_index).ok()?;
        let root =
            merkle::root_from_proof(&run_digest(run_statement), index, size, &self.batch_path)
                .ok()?;
        Some(batch_statement(self.batch_size, &root))
    }

    /// Checks every commitment (with its own key; trust is the caller's question).
    /// Returns the ids of the keys that committed, or why it fails.
    pub fn check(&self, run_statement: &[u8]) -> Result<Vec<String>, &'static str> {
        if self.commitments.is_empty() {
            return Err("no commitment");
        }
        let statement = self
            .signed_statement(run_statement)
            .ok_or("batch path does not fit the batch")?;
        if self.commitments.iter().all(|c| c.check(&statement)) {
            Ok(self.commitments.iter().map(|c| c.key_id.clone()).collect())
        } else {
            Err("a commitment does not verify")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_of_a_batch_checks_and_nothing_else_does() {
        let k = Keypair::from_seed([5; 32]);
        for n in [1usize, 2, 3, 8, 13] {
            let statements: Vec<Vec<u8>> =
                (0..n).map(|i| format!("run {i}").into_bytes()).collect();
            let digests: Vec<Hash32> = statements.iter().map(|s| run_digest(s)).collect();
            let seals = seal(&digests, &[&k]);
            for (i, s) in seals.iter().enumerate() {
                assert_eq!(
                    s.check(&statements[i]),
                    Ok(vec![k.id().to_string()]),
                    "n={n} i={i}"
                );
                assert!(s.check(b"another run").is_err());
                let mut moved = s.clone();
                moved.batch_index = (moved.batch_index + 1) % n as u64;
                if n > 1 {
                    assert!(moved.check(&statements[i]).is_err());
                }
            }
        }
        assert_eq!(Seal::default().check(b"x"), Err("no commitment"));
    }
}
