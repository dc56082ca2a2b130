//! The hash chain. Every assignment of a process is linked to the one before it:
//!
//! ```text
//! genesis(p)   = BLAKE3("turnstile/genesis/v1" || str(p))
//! chain_hash_n = BLAKE3("turnstile/chain/v1" || prev_hash_n || canonical(assignment_n))
//! prev_hash_0  = genesis(p);   prev_hash_n = chain_hash_{n-1}
//! ```
//!
//! `canonical` (see [`canonical_encoding`]) covers every field of the assignment but
//! the commitments: process, slot, message id, timestamp, headers and a BLAKE3 digest
//! of the body. So the chain commits to slot, timestamp and body, not only to the
//! message id. `schemas/chain.md` is the normative text; `schemas/vectors.json` pins it.

use crate::hash::Hash32;
use crate::process::ProcessId;

/// Domain separator of the genesis hash.
pub const GENESIS_DOMAIN: &[u8] = b"turnstile/genesis/v1";
/// Domain separator of a chain step.
pub const CHAIN_DOMAIN: &[u8] = b"turnstile/chain/v1";

/// The fields of one assignment that the chain commits to.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The process the assignment belongs to.
    pub process: &'a str,
    /// The slot given to the message.
    pub slot: u64,
    /// The message id (client-supplied or generated).
    pub message_id: &'a str,
    /// Milliseconds since the Unix epoch, scheduler clock.
    pub timestamp_ms: u64,
    /// The message's headers, in any order (the encoding sorts them).
    pub headers: &'a [(String, String)],
    /// BLAKE3 of the message body.
    pub body_hash: Hash32,
}

/// The previous hash of slot 0 of `process`.
pub fn genesis(process: &ProcessId) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(GENESIS_DOMAIN);
    put_str(&mut h, process.as_str());
    h.finalize().into()
}

/// The canonical encoding of an assignment's fields:
///
/// ```text
/// str(process) || u64be(slot) || str(message_id) || u64be(timestamp_ms)
///   || u32be(header_count) || (str(name) || str(value))*  -- sorted by (name, value) bytes
///   || body_hash (32 bytes)
/// str(x) = u32be(byte length of x) || x (UTF-8)
/// ```
pub fn canonical_encoding(f: &Fields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + f.process.len() + f.message_id.len());
    encode_into(&mut out, f);
    out
}

/// Appends the canonical encoding of `f` to `out`.
fn encode_into(out: &mut Vec<u8>, f: &Fields<'_>) {
    put_str(out, f.process);
    out.extend_from_slice(&f.slot.to_be_bytes());
    put_str(out, f.message_id);
    out.extend_from_slice(&f.timestamp_ms.to_be_bytes());
    out.extend_from_slice(&(f.headers.len() as u32).to_be_bytes());
    fn key(h: &(String, String)) -> (&[u8], &[u8]) {
        (h.0.as_bytes(), h.1.as_bytes())
    }
    if f.headers.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        // Already in order (always so for none or one): no sorted copy needed.
        for (name, value) in f.headers {
            put_str(out, name);
            put_str(out, value);
        }
    } else {
        let mut headers: Vec<&(String, String)> = f.headers.iter().collect();
        headers.sort_by(|a, b| key(a).cmp(&key(b)));
        for (name, value) in headers {
            put_str(out, name);
            put_str(out, value);
        }
    }
    out.extend_from_slice(&f.body_hash.0);
}

/// One chain step: the chain hash of an assignment whose predecessor's chain hash is `prev`.
pub fn chain_hash(prev: &Hash32, f: &Fields<'_>) -> Hash32 {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => chain_hash_in(&mut buf, prev, f),
        Err(_) => chain_hash_in(&mut Vec::new(), prev, f),
    })
}

/// [`chain_hash`], encoding into `buf` (its contents are replaced): the whole
/// input is laid out once and hashed in one call, with no allocation once `buf` is
/// large enough. Verifiers call this once per assignment.
pub fn chain_hash_in(buf: &mut Vec<u8>, prev: &Hash32, f: &Fields<'_>) -> Hash32 {
    buf.clear();
    buf.extend_from_slice(CHAIN_DOMAIN);
    buf.extend_from_slice(&prev.0);
    encode_into(buf, f);
    Hash32::digest(buf)
}

/// Writes `u32be(len) || bytes`; lengths above `u32::MAX` cannot occur because
/// every field is bounded far below that before it gets here.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}
impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}
impl Sink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}
fn put_str(sink: &mut impl Sink, s: &str) {
    sink.put(&(s.len() as u32).to_be_bytes());
    sink.put(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields<'a>(headers: &'a [(String, String)]) -> Fields<'a> {
        Fields {
            process: "p",
            slot: 7,
            message_id: "m",
            timestamp_ms: 1_700_000_000_000,
            headers,
            body_hash: Hash32::digest(b"body"),
        }
    }

    #[test]
    fn header_order_does_not_change_the_encoding() {
        let a = vec![
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ];
        let b = vec![a[1].clone(), a[0].clone()];
        assert_eq!(
            canonical_encoding(&fields(&a)),
            canonical_encoding(&fields(&b))
        );
    }

    #[test]
    fn length_prefixes_keep_field_boundaries_apart() {
        // "ab"+"c" and "a"+"bc" must not collide.
        let h1 = vec![("ab".to_string(), "c".to_string())];
        let h2 = vec![("a".to_string(), "bc".to_string())];
        assert_ne!(
            canonical_encoding(&fields(&h1)),
            canonical_encoding(&fields(&h2))
        );
    }

    proptest! {
        #[test]
        fn every_field_changes_the_chain_hash(slot in 0u64..u64::MAX, ts in 0u64..u64::MAX, id in "[a-z]{0,8}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let prev = Hash32::digest(b"prev");
            let base = Fields { process: "p", slot, message_id: &id, timestamp_ms: ts, headers: &[], body_hash: Hash32::digest(&body) };
            let h = chain_hash(&prev, &base);
            prop_assert_eq!(h, chain_hash(&prev, &base), "deterministic");
            prop_assert_ne!(h, chain_hash(&prev, &Fields { slot: slot.wrapping_add(1), ..base }));
            prop_assert_ne!(h, chain_hash(&prev, &Fields { timestamp_ms: ts.wrapping_add(1), ..base }));
            prop_assert_ne!(h, chain_hash(&prev, &Fields { process: "q", ..base }));
            let mut other = body.clone();
            other.push(0);
            prop_assert_ne!(h, chain_hash(&prev, &Fields { body_hash: Hash32::digest(&other), ..base }));
            prop_assert_ne!(h, chain_hash(&Hash32::digest(b"other"), &base));
        }
    }
}
