//! Queue keys (Roger's "queue keys"): a scheduling request may carry a
//! `Ts-Queue-Key`; while a job of the same process with that key has not started, a
//! second request with it is refused (`queue_key_held`).
//!
//! The scheduler takes a *hold* — one key of the queue-keys bucket,
//! [`hold_key`] = `<process>.<hash of the queue key>` — by an atomic create before the
//! request is assigned, and stores the create's revision (the hold's *token*) in the
//! entry it writes (`Ts-Queue-Hold`), beside the queue key itself. The worker that
//! takes the job out of its not-yet-started state deletes the hold, expecting the
//! revision it read, and only if [`may_release`] says the hold is this job's: a job
//! delivered again long after never frees a newer request's hold.
//!
//! Pure: no NATS, no clock (times are passed in).

use serde::{Deserialize, Serialize};

/// The longest queue key accepted, in bytes.
pub const MAX_QUEUE_KEY: usize = 256;

/// Why a `Ts-Queue-Key` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header is present with an empty (or all-blank) value.
    #[error("Ts-Queue-Key is empty")]
    Empty,
    /// Longer than [`MAX_QUEUE_KEY`] bytes.
    #[error("Ts-Queue-Key is {0} bytes; the maximum is {MAX_QUEUE_KEY}")]
    TooLong(usize),
    /// Carries a control character.
    #[error("Ts-Queue-Key must not contain control characters")]
    Control,
}

/// Checks a queue key: 1 to [`MAX_QUEUE_KEY`] bytes, not only blanks, no control
/// characters. The key is taken as it is (case and inner spaces matter).
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.trim().is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_QUEUE_KEY {
        return Err(KeyError::TooLong(key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err(KeyError::Control);
    }
    Ok(())
}

/// The bucket key of the hold of `key` in `process`: `<process>.<hex>` where hex is
/// the first 32 hex digits (128 bits) of the key's BLAKE3 hash under a domain tag. A
/// queue key is scoped to its process: the same key in another process is another
/// hold. The hash keeps any key text (dots, spaces, wildcards) out of the subject.
pub fn hold_key(process: &crate::ProcessId, key: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"turnstile queue key v1\0");
    h.update(key.as_bytes());
    let digest = h.finalize();
    let hex = hex::encode(&digest.as_bytes()[..16]);
    format!("{}.{hex}", process.as_str())
}

/// The value of a hold (JSON in the queue-keys bucket).
///
/// *Pending* (`slot` absent): created by the scheduler before the request was
/// assigned; its token is the revision the create returned, which is the entry's
/// own revision as long as it was never updated. *Assigned* (`slot` present): the run
/// carrying the request was written at `slot`; `token` keeps the create's revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The queue key, as the client gave it (for operators; the bucket key is a hash).
    pub key: String,
    /// When the scheduler created the hold (its clock, ms since the epoch).
    pub created_ms: u64,
    /// The request's message id, if it had one: a retry of that very request is let
    /// through to the scheduler's deduplication instead of being refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The slot the request was assigned, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// The create's revision, once the hold was updated (absent: the entry's revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

impl Hold {
    /// A pending hold.
    pub fn pending(key: &str, created_ms: u64, message_id: Option<String>) -> Hold {
        Hold {
            key: key.to_string(),
            created_ms,
            message_id,
            slot: None,
            token: None,
        }
    }

    /// The hold's token, given the revision its entry was read at.
    pub fn token(&self, revision: u64) -> u64 {
        self.token.unwrap_or(revision)
    }

    /// The same hold, assigned `slot`; `revision` is the revision it was read at
    /// (its token, if it was still pending).
    pub fn assigned(&self, revision: u64, slot: u64) -> Hold {
        Hold {
            slot: Some(slot),
            token: Some(self.token(revision)),
            ..self.clone()
        }
    }

    /// Whether a pending hold is older than `bound_ms` at `now_ms`: its request was
    /// neither answered as written nor refused in time (its scheduler died between the
    /// create and the answer, or the write's fate stayed unknown), so the next
    /// scheduler that meets it resolves it from the log.
    pub fn is_stale(&self, now_ms: u64, bound_ms: u64) -> bool {
        self.slot.is_none() && now_ms.saturating_sub(self.created_ms) > bound_ms
    }

    /// JSON bytes.
    pub fn encode(&self) -> crate::Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| crate::Error::Encode {
            what: "queue hold",
            reason: e.to_string(),
        })
    }

    /// From JSON bytes.
    pub fn decode(bytes: &[u8]) -> crate::Result<Hold> {
        serde_json::from_slice(bytes).map_err(|e| crate::Error::Decode {
            what: "queue hold",
            reason: e.to_string(),
        })
    }
}

/// Whether the job at `slot`, whose entry carries hold token `token`, may release
/// the hold read as `hold` at `revision`: only if the hold is this job's — its token
/// is the job's, and once assigned, its slot is the job's too. A job delivered again
/// after its hold was released and the key taken by a newer request carries an older
/// token and frees nothing.
pub fn may_release(hold: &Hold, revision: u64, slot: u64, token: u64) -> bool {
    hold.token(revision) == token && hold.slot.is_none_or(|s| s == slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProcessId;

    #[test]
    fn keys_are_checked() {
        assert_eq!(check_key(""), Err(KeyError::Empty));
        assert_eq!(check_key("  "), Err(KeyError::Empty));
        assert_eq!(check_key("a\u{0}b"), Err(KeyError::Control));
        assert_eq!(check_key("a\nb"), Err(KeyError::Control));
        assert_eq!(
            check_key(&"k".repeat(MAX_QUEUE_KEY + 1)),
            Err(KeyError::TooLong(MAX_QUEUE_KEY + 1))
        );
        assert!(check_key(&"k".repeat(MAX_QUEUE_KEY)).is_ok());
        assert!(check_key("order 42.* > ünïcode").is_ok());
    }

    #[test]
    fn hold_keys_are_per_process_and_subject_safe() {
        let a = ProcessId::new("a").unwrap();
        let b = ProcessId::new("b").unwrap();
        let k = hold_key(&a, "x.*.>");
        assert!(k.starts_with("a."));
        assert_eq!(k.len(), 2 + 32);
        assert!(k[2..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(k, hold_key(&b, "x.*.>"));
        assert_ne!(k, hold_key(&a, "x.*.?"));
        assert_eq!(k, hold_key(&a, "x.*.>"));
    }

    #[test]
    fn a_pending_hold_is_released_by_its_own_job_only() {
        let h = Hold::pending("k", 1_000, None);
        // Created at revision 7: the job whose entry carries token 7 releases it.
        assert!(may_release(&h, 7, 40, 7));
        // Any slot while pending: the slot is not known yet.
        assert!(may_release(&h, 7, 0, 7));
        // A job of an earlier hold of the same key (redelivered) does not.
        assert!(!may_release(&h, 7, 39, 3));
        // A later revision of the entry is not the same hold (re-created).
        assert!(!may_release(&h, 9, 40, 7));
    }

    #[test]
    fn an_assigned_hold_is_released_by_its_slot_and_token_only() {
        let h = Hold::pending("k", 1_000, Some("m".into())).assigned(7, 40);
        assert_eq!(h.slot, Some(40));
        assert_eq!(h.token, Some(7));
        // The update moved the entry to revision 8; the token stays 7.
        assert!(may_release(&h, 8, 40, 7));
        assert!(!may_release(&h, 8, 41, 7));
        assert!(!may_release(&h, 8, 40, 8));
        assert!(!may_release(&h, 8, 12, 2));
        // Assigning again keeps the first token.
        assert_eq!(h.assigned(8, 40).token, Some(7));
    }

    #[test]
    fn only_old_pending_holds_are_stale() {
        let h = Hold::pending("k", 1_000, None);
        assert!(!h.is_stale(1_000, 60_000));
        assert!(!h.is_stale(61_000, 60_000));
        assert!(h.is_stale(61_001, 60_000));
        // A clock behind the creator's never makes it stale.
        assert!(!h.is_stale(0, 60_000));
        assert!(!h.assigned(5, 3).is_stale(u64::MAX, 60_000));
    }

    #[test]
    fn holds_round_trip_and_garbage_is_an_error() {
        let h = Hold::pending("k", 5, Some("id".into())).assigned(3, 9);
        assert_eq!(Hold::decode(&h.encode().unwrap()).unwrap(), h);
        assert!(Hold::decode(b"\xff\x00").is_err());
        assert!(Hold::decode(b"{}").is_err());
    }
}
