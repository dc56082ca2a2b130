//! Scheduler keys and commitments.
//!
//! A key id is the first 16 hex characters of BLAKE3(public key), so an id can
//! never name two keys by accident. A commitment is an ed25519 signature over a
//! batch statement (see [`crate::seal`]), with the signer's id and public key.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::hash::Hash32;
use crate::{Error, Result};

/// Domain separator of the run statement (record version 3: with the declared keys).
pub const RUN_DOMAIN: &[u8] = b"turnstile/run/v3";

/// Domain separator of a record version 2 run's statement (no declared keys). Runs of
/// version 2 are still read and verified; nothing writes them any more.
pub const RUN_DOMAIN_V2: &[u8] = b"turnstile/run/v2";

/// The statement of one run, whose digest is sealed in a batch (see [`crate::seal`]):
///
/// ```text
/// "turnstile/run/v3" || u32be(len(process)) || process || u64be(prev_seq)
///   || u64be(first_slot) || u64be(count) || merkle_root (32 bytes)
///   || u32be(number of keys) || for each declared key id: u32be(len(id)) || id
/// ```
///
/// `prev_seq` is the stream sequence of the message the run was written after on its
/// subject (the write's expectation; 0 for the first): signing it fixes the run's place
/// in the log, so a copy of the run published anywhere else is recognisably foreign.
/// `keys` is the required key set the run was written under (sorted, distinct key
/// ids; schemas/chain.md "Which keys a run must carry"); `None` gives the statement of
/// a version 2 run, which declares none: `"turnstile/run/v2"` and no key list.
pub fn run_statement(
    process: &str,
    prev_seq: u64,
    first_slot: u64,
    count: u64,
    merkle_root: &Hash32,
    keys: Option<&[String]>,
) -> Vec<u8> {
    let keys_len = keys.map_or(0, |ks| 4 + ks.iter().map(|k| 4 + k.len()).sum::<usize>());
    let mut out = Vec::with_capacity(RUN_DOMAIN.len() + 4 + process.len() + 24 + 32 + keys_len);
    out.extend_from_slice(if keys.is_some() {
        RUN_DOMAIN
    } else {
        RUN_DOMAIN_V2
    });
    out.extend_from_slice(&(process.len() as u32).to_be_bytes());
    out.extend_from_slice(process.as_bytes());
    out.extend_from_slice(&prev_seq.to_be_bytes());
    out.extend_from_slice(&first_slot.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&merkle_root.0);
    if let Some(keys) = keys {
        out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
        for k in keys {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
        }
    }
    out
}

/// A required key set as a run declares it: sorted by bytes, each id once.
pub fn key_set<S: AsRef<str>>(ids: &[S]) -> Vec<String> {
    let mut out: Vec<String> = ids.iter().map(|s| s.as_ref().to_string()).collect();
    out.sort();
    out.dedup();
    out
}

/// The id of a public key: hex of the first 8 bytes of BLAKE3(public key).
pub fn key_id(public_key: &[u8; 32]) -> String {
    hex::encode(&blake3::hash(public_key).as_bytes()[..8])
}

/// One signature over a batch statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// The ed25519 public key (32 bytes).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// The ed25519 signature (64 bytes).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Commitment {
    /// Checks the signature over `statement` with the commitment's own public key,
    /// and that `key_id` belongs to that key. Whether the key is *trusted* is the
    /// caller's question (see [`crate::verify::TrustedKeys`]).
    pub fn check(&self, statement: &[u8]) -> bool {
        let Ok(pk): std::result::Result<[u8; 32], _> = self.public_key.as_slice().try_into() else {
            return false;
        };
        let Ok(sig): std::result::Result<[u8; 64], _> = self.signature.as_slice().try_into() else {
            return false;
        };
        if key_id(&pk) != self.key_id {
            return false;
        }
        let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
            return false;
        };
        vk.verify(statement, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }
}

/// A scheduler's signing key.
pub struct Keypair {
    signing: SigningKey,
    id: String,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Keypair").field("id", &self.id).finish()
    }
}

impl Keypair {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Keypair {
        Keypair::from_seed(SigningKey::generate(&mut rand_core::OsRng).to_bytes())
    }

    /// The key whose ed25519 secret seed is `seed` (test vectors use a fixed seed).
    pub fn from_seed(seed: [u8; 32]) -> Keypair {
        let signing = SigningKey::from_bytes(&seed);
        let id = key_id(signing.verifying_key().as_bytes());
        Keypair { signing, id }
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Signs `statement` and wraps the signature as a [`Commitment`].
    pub fn commit(&self, statement: &[u8]) -> Commitment {
        Commitment {
            key_id: self.id.clone(),
            public_key: self.public_key().to_vec(),
            signature: self.signing.sign(statement).to_bytes().to_vec(),
        }
    }

    /// The key file text: JSON with the id, the public key and the secret seed in hex.
    pub fn to_key_file(&self) -> String {
        let file = KeyFile {
            key_id: self.id.clone(),
            public_key: hex::encode(self.public_key()),
            secret_seed: Some(hex::encode(self.signing.to_bytes())),
        };
        // Serialising three strings to JSON cannot fail.
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Reads a key file made by [`Keypair::to_key_file`]; checks that id and public key
    /// match the secret.
    pub fn from_key_file(text: &str) -> Result<Keypair> {
        let file = KeyFile::parse(text)?;
        let seed_hex = file.secret_seed.ok_or_else(|| {
            Error::InvalidKey("key file has no secret_seed (is it a public key file?)".into())
        })?;
        let seed: [u8; 32] = hex::decode(seed_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::InvalidKey("secret_seed is not 64 hex characters".into()))?;
        let kp = Keypair::from_seed(seed);
        if kp.id != file.key_id || hex::encode(kp.public_key()) != file.public_key {
            return Err(Error::InvalidKey(
                "key_id or public_key does not match secret_seed".into(),
            ));
        }
        Ok(kp)
    }
}

/// The on-disk key file (JSON). A public key file is the same without `secret_seed`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    /// [`key_id`] of the key.
    pub key_id: String,
    /// Hex of the 32-byte public key.
    pub public_key: String,
    /// Hex of the 32-byte ed25519 secret seed; absent in a public key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_seed: Option<String>,
}

impl KeyFile {
    /// Parses a key file (secret or public).
    pub fn parse(text: &str) -> Result<KeyFile> {
        serde_json::from_str(text).map_err(|e| Error::InvalidKey(format!("not a key file: {e}")))
    }

    /// The public key, checked against the id.
    pub fn public_key_bytes(&self) -> Result<[u8; 32]> {
        let pk: [u8; 32] = hex::decode(self.public_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::InvalidKey("public_key is not 64 hex characters".into()))?;
        if key_id(&pk) != self.key_id {
            return Err(Error::InvalidKey("key_id does not match public_key".into()));
        }
        Ok(pk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_is_checked() {
        let kp = Keypair::generate();
        let text = kp.to_key_file();
        let back = Keypair::from_key_file(&text).unwrap();
        assert_eq!(back.public_key(), kp.public_key());
        assert_eq!(back.id(), kp.id());
        // Same file as JSON parsed by a real JSON parser: the format is plain JSON.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["key_id"], kp.id());
        // A tampered public key is refused.
        let other = Keypair::generate();
        let bad = text.replace(
            &hex::encode(kp.public_key()),
            &hex::encode(other.public_key()),
        );
        assert!(matches!(
            Keypair::from_key_file(&bad),
            Err(Error::InvalidKey(_))
        ));
        assert!(matches!(
            Keypair::from_key_file("nonsense"),
            Err(Error::InvalidKey(_))
        ));
    }

    #[test]
    fn commitments_check_statement_key_and_id() {
        let kp = Keypair::from_seed([7; 32]);
        let root = Hash32::digest(b"root");
        let k1 = ["k1".to_string()];
        let st = run_statement("p", 7, 0, 3, &root, Some(&k1));
        let c = kp.commit(&st);
        assert!(c.check(&st));
        assert!(!c.check(&run_statement("p", 7, 1, 3, &root, Some(&k1))));
        assert!(!c.check(&run_statement("p", 8, 0, 3, &root, Some(&k1))));
        // The declared keys are signed, and a version 3 statement is never a version 2 one.
        assert!(!c.check(&run_statement("p", 7, 0, 3, &root, Some(&[]))));
        assert!(!c.check(&run_statement("p", 7, 0, 3, &root, Some(&["k2".into()]))));
        assert!(!c.check(&run_statement("p", 7, 0, 3, &root, None)));
        // Key boundaries are part of the statement: ["k1k2"] is not ["k1", "k2"].
        let split = run_statement("p", 7, 0, 3, &root, Some(&["k1".into(), "k2".into()]));
        let joined = run_statement("p", 7, 0, 3, &root, Some(&["k1k2".into()]));
        assert_ne!(split, joined);
        assert_eq!(
            key_set(&["b", "a", "b"]),
            vec!["a".to_string(), "b".to_string()]
        );
        let mut wrong_id = c.clone();
        wrong_id.key_id = "0000000000000000".into();
        assert!(!wrong_id.check(&st));
        let mut short = c.clone();
        short.signature.pop();
        assert!(!short.check(&st));
    }
}
