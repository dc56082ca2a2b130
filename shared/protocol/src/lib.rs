//! turnstile's protocol: the records that cross the wire, their canonical
//! encoding, the hash chain, the per-run Merkle tree and the signatures.
//!
//! This crate is pure: it knows nothing of NATS, tokio or clocks. Everything
//! a verifier in another language needs is specified in `schemas/` and pinned
//! by the golden vectors in `schemas/vectors.json`, which the tests here check.
//!
//! # Layout
//! - [`hash`]: the 32-byte hash type used everywhere.
//! - [`process`]: validated process ids (they become NATS subject tokens).
//! - [`queue`]: queue keys: validation, the hold record and the rule that releases it.
//! - [`chain`]: canonical assignment encoding, genesis hash and chain step.
//! - [`merkle`]: the RFC 6962-shaped Merkle tree over one run's chain hashes.
//! - [`keys`]: key files, key ids, signing and checking commitments.
//! - [`seal`]: one signature over a batch of runs, and each run's proof in it.
//! - [`wire`]: every record on the wire (MessagePack, named fields).
//! - [`vectors`]: the golden vectors of `schemas/vectors.json`.
//! - [`verify`]: a streaming verifier of a process's log, fed run by run.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod chain;
pub mod hash;
pub mod keys;
pub mod merkle;
pub mod process;
pub mod queue;
pub mod seal;
pub mod vectors;
pub mod verify;
pub mod wire;

pub use hash::Hash32;
pub use process::ProcessId;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A process id is empty, too long or has characters a subject token cannot hold.
    #[error("invalid process id {0:?}: use 1-200 characters of A-Z a-z 0-9 - _")]
    InvalidProcess(String),
    /// A record could not be decoded from MessagePack.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// Which record was being decoded.
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// A record could not be encoded (only possible for values outside the schema).
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// Which record was being encoded.
        what: &'static str,
        /// The encoder's complaint.
        reason: String,
    },
    /// A key file or key string is not what it claims to be.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A mode name that is not one of the four modes.
    #[error(
        "unknown mode {0:?}: use aggressive, local_confirmation, remote_confirmation or disabled"
    )]
    UnknownMode(String),
    /// A Merkle proof or tree request that does not fit the tree.
    #[error("invalid merkle proof: {0}")]
    InvalidProof(&'static str),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
