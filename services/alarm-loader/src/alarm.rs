//! Alarms as records: what a client sets, the events of its life, and the state those
//! events leave. Pure: no NATS, no clock (every function takes the time it reasons
//! about). schemas/alarms.md is the contract; this is its Rust form.
//!
//! An alarm's history is the subject `<prefix>.alarms.rec.<id>`: one [`Record`] per
//! event, each carrying the alarm's whole state after it, so the last record alone is
//! the state and the subject's messages are the history. Every change is a
//! compare-and-set on that subject (JetStream's expected last subject sequence):
//! two loaders, or a loader and a client's cancel, cannot both move one alarm.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Width of a due-index bucket. Fixed: it is part of the stored subjects
/// (`…alarms.due.<partition>.<due_ms / BUCKET_MS>.<id>`).
pub const BUCKET_MS: u64 = 10_000;
/// Partitions of the due index (the unit of ownership among loader replicas). Fixed:
/// it is part of the stored subjects.
pub const PARTITIONS: u32 = 32;
/// Longest alarm id (a cron tick's, `cron-<job>-<ms>`, included).
pub const MAX_ID: usize = 160;
/// Longest alarm id a client may choose.
pub const MAX_CLIENT_ID: usize = 128;
/// Alarm ids starting so are the loader's own (cron ticks).
pub const RESERVED_ID_PREFIX: &str = "cron-";

/// The alarm-loaders' shared secret for firing ids (journal::setup::ensure_firing_key:
/// 32 bytes in the alarm stream, which no client reads). A firing id ends in a tag
/// only a holder of the key can make: a client that may schedule into an alarm's
/// process cannot write under its firing's id first, which would make the firing a
/// duplicate of the client's entry and the alarm dead.
#[derive(Clone, PartialEq, Eq)]
pub struct FiringKey([u8; 32]);

impl FiringKey {
    /// The key of these bytes.
    pub fn new(bytes: [u8; 32]) -> FiringKey {
        FiringKey(bytes)
    }

    /// The tag of the firing of alarm `id`, set at `set_seq`, due at `due_ms`: the first
    /// 8 bytes, in hex, of BLAKE3 keyed with the key over
    /// `"turnstile/alarm-firing/v1" 0 id 0 set_seq 0 due_ms 0` (the numbers in decimal).
    pub fn tag(&self, id: &str, set_seq: u64, due_ms: u64) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for part in [
            b"turnstile/alarm-firing/v1".as_slice(),
            id.as_bytes(),
            set_seq.to_string().as_bytes(),
            due_ms.to_string().as_bytes(),
        ] {
            h.update(part);
            h.update(&[0]);
        }
        hex::encode(&h.finalize().as_bytes()[..8])
    }
}

impl std::fmt::Debug for FiringKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FiringKey(secret)")
    }
}
/// Largest alarm body (it travels in every record of its history, as base64).
pub const MAX_BODY: usize = 256 * 1024;
/// Default dispatch timeout (X3m's).
pub const DEFAULT_DISPATCH_TIMEOUT_MS: u64 = 5_000;
/// Longest dispatch timeout.
pub const MAX_DISPATCH_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Where a due alarm goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Scheduled into this process's log through `<prefix>.schedule.<process>`; the
    /// receipt is the answer.
    Process(String),
    /// A NATS request to this subject; the responder answers `ok`, `retry` or an error.
    Subject(String),
}

/// How failed dispatches are retried. A member left out takes its default; an unknown
/// one (a misspelt member would otherwise pass as its default) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Dispatch attempts in all (1: no retry).
    pub attempts: u32,
    /// Delay before the second attempt; doubled each time after.
    pub backoff_ms: u64,
    /// Longest delay between attempts.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(40);
        self.backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms)
    }
}

/// An alarm as a client sets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    /// 1–128 characters of `A-Z a-z 0-9 - _` (one subject token).
    pub id: String,
    /// When it is due: UTC, milliseconds since the Unix epoch.
    pub due_ms: u64,
    /// Where it goes.
    pub target: Target,
    /// The message body, base64 in JSON.
    #[serde(default, with = "b64")]
    pub body: Vec<u8>,
    /// Headers sent with it (names not starting `Nats-` or `Ts-`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// How long a dispatch may wait for its answer.
    #[serde(default = "default_timeout")]
    pub dispatch_timeout_ms: u64,
    /// How failures are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Set by the loader on the alarm of a cron job's tick; never by a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<CronTick>,
}

/// What makes an alarm one tick of a cron job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronTick {
    /// The job.
    pub job: String,
    /// The tick (UTC ms).
    pub tick_ms: u64,
    /// The previous tick's alarm when the job skips a tick while the previous
    /// execution is not finished (`overlap: skip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// The worker group whose every live instance gets the tick (`strategy: all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<String>,
}

fn default_timeout() -> u64 {
    DEFAULT_DISPATCH_TIMEOUT_MS
}

/// Whether `s` is a valid id token (alarm id, process, subject token).
pub fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Alarm {
    /// Checks an alarm a client sets: its fields, an id of its own (not a cron tick's)
    /// and no cron tick.
    pub fn validate_client(&self, subjects: &journal::subjects::Subjects) -> Result<()> {
        if !is_token(&self.id, MAX_CLIENT_ID) || self.id.starts_with(RESERVED_ID_PREFIX) {
            return Err(Error::Invalid(format!(
                "id: 1-{MAX_CLIENT_ID} characters of A-Z a-z 0-9 - _, not starting {RESERVED_ID_PREFIX}"
            )));
        }
        if self.cron.is_some() {
            return Err(Error::Invalid(
                "cron: set by the loader for a cron job's ticks".into(),
            ));
        }
        self.validate(subjects)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self, subjects: &journal::subjects::Subjects) -> Result<()> {
        if !is_token(&self.id, MAX_ID) {
            return Err(Error::Invalid(format!(
                "id: 1-{MAX_ID} characters of A-Z a-z 0-9 - _"
            )));
        }
        match &self.target {
            Target::Process(p) => {
                protocol::ProcessId::new(p)
                    .map_err(|e| Error::Invalid(format!("target process: {e}")))?;
            }
            Target::Subject(s) => {
                let ok = !s.is_empty()
                    && s.len() <= 256
                    && s.split('.').all(|t| {
                        !t.is_empty()
                            && t != "*"
                            && t != ">"
                            && t.bytes().all(|b| b > b' ' && b != 0x7f)
                    });
                if !ok {
                    return Err(Error::Invalid(
                        "target subject: dot-separated tokens, no wildcards or spaces".into(),
                    ));
                }
                // The loader would publish there with its own rights.
                if subjects.is_reserved_reply(s) || s.starts_with("_INBOX.") {
                    return Err(Error::Invalid(format!(
                        "target subject {s}: inside the deployment's or the server's space"
                    )));
                }
            }
        }
        if self.body.len() > MAX_BODY {
            return Err(Error::Invalid(format!("body: over {MAX_BODY} bytes")));
        }
        for (k, v) in &self.headers {
            let name_ok = !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if !name_ok || journal::subjects::is_control_header(k) {
                return Err(Error::Invalid(format!(
                    "header {k:?}: a printable name without ':' that does not start with Nats- or Ts-"
                )));
            }
            if v.contains(['\r', '\n']) {
                return Err(Error::Invalid(format!(
                    "header {k}: value has a line break"
                )));
            }
        }
        if self.dispatch_timeout_ms == 0 || self.dispatch_timeout_ms > MAX_DISPATCH_TIMEOUT_MS {
            return Err(Error::Invalid(format!(
                "dispatch_timeout_ms: 1..={MAX_DISPATCH_TIMEOUT_MS}"
            )));
        }
        let r = self.retry;
        if r.attempts == 0 || r.attempts > 1000 || r.max_backoff_ms < r.backoff_ms {
            return Err(Error::Invalid(
                "retry: attempts 1..=1000, max_backoff_ms >= backoff_ms".into(),
            ));
        }
        Ok(())
    }
}

/// Where an alarm stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Waiting to fire at `next_ms`, `attempts` dispatches of this firing done.
    Pending {
        /// When the next dispatch is due.
        next_ms: u64,
        /// Failed dispatches of this firing so far.
        attempts: u32,
    },
    /// A loader claimed the firing and dispatched (or is dispatching) it.
    Dispatching {
        /// Which attempt (1-based).
        attempt: u32,
        /// When it was claimed.
        since_ms: u64,
        /// The loader replica that claimed it.
        by: String,
    },
    /// Delivered: the target answered ok.
    Done {
        /// When.
        at_ms: u64,
        /// The slot, for a process target.
        slot: Option<u64>,
    },
    /// Every attempt failed; announced on the dead-letter subject.
    Dead {
        /// When.
        at_ms: u64,
        /// Why the last attempt failed.
        reason: String,
    },
    /// Cancelled by a client before it was done.
    Cancelled {
        /// When.
        at_ms: u64,
    },
    /// Not fired, by the rules of its cron job (deleted or inactive job, overlap,
    /// missed-run policy).
    Skipped {
        /// When.
        at_ms: u64,
        /// Which rule.
        reason: String,
    },
}

impl Status {
    /// Whether nothing more will happen to the alarm.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Status::Done { .. }
                | Status::Dead { .. }
                | Status::Cancelled { .. }
                | Status::Skipped { .. }
        )
    }
}

/// What happened, one per record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Set or replaced by a client.
    Set {
        /// When (loader clock).
        at_ms: u64,
    },
    /// Claimed for dispatch.
    Attempt {
        /// Which attempt (1-based).
        attempt: u32,
        /// When.
        at_ms: u64,
        /// By which loader replica.
        by: String,
    },
    /// The target answered ok.
    Delivered {
        /// Which attempt.
        attempt: u32,
        /// When the answer came.
        at_ms: u64,
        /// Fire time − due time of this attempt, in ms.
        lateness_ms: i64,
        /// The slot, for a process target.
        slot: Option<u64>,
        /// Whether the scheduler answered that the firing was already in the log.
        duplicate: bool,
    },
    /// The attempt failed; retried at `next_ms`, or dead when none is left.
    Failed {
        /// Which attempt.
        attempt: u32,
        /// When.
        at_ms: u64,
        /// Why (a typed refusal code and message, a timeout, no responders).
        reason: String,
    },
    /// The target asked to be called again in `in_ms` (optionally with a new body).
    RetryAsked {
        /// Which attempt.
        attempt: u32,
        /// When.
        at_ms: u64,
        /// The delay asked for.
        in_ms: u64,
    },
    /// No attempt left: dead-lettered.
    DeadLettered {
        /// When.
        at_ms: u64,
        /// Why the last attempt failed.
        reason: String,
    },
    /// Cancelled by a client.
    Cancelled {
        /// When.
        at_ms: u64,
    },
    /// Skipped by its cron job's rules.
    Skipped {
        /// When.
        at_ms: u64,
        /// Which rule.
        reason: String,
    },
}

/// One message of an alarm's history: the event and the state after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Format version (1).
    pub v: u32,
    /// The alarm as it now stands (body and due time included).
    pub alarm: Alarm,
    /// Stream sequence of the `Set` record that made this version of the alarm: part of
    /// the firing's message id, so a replaced alarm is a new firing.
    pub set_seq: u64,
    /// Where it stands.
    pub status: Status,
    /// What happened.
    pub event: Event,
}

impl Record {
    /// Encodes as JSON.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8], subject: &str, seq: u64) -> Result<Record> {
        let r: Record = serde_json::from_slice(bytes).map_err(|e| Error::BadRecord {
            subject: subject.to_string(),
            seq,
            reason: e.to_string(),
        })?;
        if r.v != 1 {
            return Err(Error::BadRecord {
                subject: subject.to_string(),
                seq,
                reason: format!("version {} (this loader reads 1)", r.v),
            });
        }
        Ok(r)
    }

    /// When the alarm next needs a loader: its due time while pending; the end of the
    /// claim's dispatch timeout (plus `grace`) while dispatching, when a loader that
    /// died mid-dispatch is taken over; none once final.
    pub fn next_action_ms(&self, grace_ms: u64) -> Option<u64> {
        match &self.status {
            Status::Pending { next_ms, .. } => Some(*next_ms),
            Status::Dispatching { since_ms, .. } => Some(
                since_ms
                    .saturating_add(self.alarm.dispatch_timeout_ms)
                    .saturating_add(grace_ms),
            ),
            _ => None,
        }
    }

    /// Whether a log entry (the BLAKE3 of its body, and its stored headers) carrying
    /// this firing's message id is this firing. The id alone does not say: a message
    /// id is any client's to choose, and a client allowed to schedule into the process
    /// could write one first, so that the firing looks done while its body never
    /// reaches the log. The entry is the firing if it carries the alarm's body and
    /// each of its headers (values compared without surrounding blanks, which NATS
    /// header parsing may drop).
    pub fn is_fired_as(&self, body_hash: &protocol::Hash32, headers: &[(String, String)]) -> bool {
        *body_hash == protocol::Hash32::digest(&self.alarm.body)
            && self.alarm.headers.iter().all(|(name, value)| {
                headers
                    .iter()
                    .any(|(n, v)| n == name && v.trim() == value.trim())
            })
    }

    /// The firing's message id on the log: `alarm-<id>-<set_seq>-<due_ms>-<tag>`, the
    /// tag made with the deployment's firing key. The same for every attempt of one
    /// firing, so an attempt that did land is not written twice; and no client can
    /// make it, so none can write under it first.
    pub fn firing_id(&self, key: &FiringKey) -> String {
        let (id, seq, due) = (&self.alarm.id, self.set_seq, self.alarm.due_ms);
        format!("alarm-{id}-{seq}-{due}-{}", key.tag(id, seq, due))
    }

    /// The firing's message id before firing ids were tagged (`alarm-<id>-<set_seq>-
    /// <due_ms>`): what a loader of an earlier version sent. Looking for an earlier
    /// attempt in the log, an entry under it counts too, if it carries the alarm's
    /// content ([`Record::is_fired_as`]), so a firing under way when the loaders were
    /// upgraded is not sent twice. Never sent.
    pub fn untagged_firing_id(&self) -> String {
        let (id, seq, due) = (&self.alarm.id, self.set_seq, self.alarm.due_ms);
        format!("alarm-{id}-{seq}-{due}")
    }

    /// The record after a claim of the next attempt at `now` by `by`.
    pub fn claim(&self, now: u64, by: &str) -> Option<Record> {
        let attempt = match &self.status {
            Status::Pending { attempts, .. } => attempts + 1,
            // A claim that outlived its dispatch timeout: the claimer is gone; the same
            // attempt again (its fate is unknown; the firing id keeps it single).
            Status::Dispatching { attempt, .. } => *attempt,
            _ => return None,
        };
        Some(self.next(
            Status::Dispatching {
                attempt,
                since_ms: now,
                by: by.to_string(),
            },
            Event::Attempt {
                attempt,
                at_ms: now,
                by: by.to_string(),
            },
        ))
    }

    /// The record after the target answered ok at `now`.
    pub fn delivered(&self, now: u64, slot: Option<u64>, duplicate: bool) -> Record {
        let attempt = self.attempt();
        self.next(
            Status::Done { at_ms: now, slot },
            Event::Delivered {
                attempt,
                at_ms: now,
                lateness_ms: self.lateness(now),
                slot,
                duplicate,
            },
        )
    }

    /// The record after a failed attempt at `now`: pending again after the backoff, or
    /// dead when no attempt is left (then `dead` is true).
    pub fn failed(&self, now: u64, reason: &str) -> (Record, bool) {
        let attempt = self.attempt();
        if attempt >= self.alarm.retry.attempts {
            let r = self.next(
                Status::Dead {
                    at_ms: now,
                    reason: reason.to_string(),
                },
                Event::DeadLettered {
                    at_ms: now,
                    reason: format!(
                        "attempt {attempt} of {}: {reason}",
                        self.alarm.retry.attempts
                    ),
                },
            );
            return (r, true);
        }
        let next_ms = now.saturating_add(self.alarm.retry.delay_after(attempt));
        let r = self.next(
            Status::Pending {
                next_ms,
                attempts: attempt,
            },
            Event::Failed {
                attempt,
                at_ms: now,
                reason: reason.to_string(),
            },
        );
        (r, false)
    }

    /// The record after the target asked to be called again in `in_ms`, perhaps with
    /// a new body: a new firing (due at `now + in_ms`, attempts start over).
    pub fn retry_asked(&self, now: u64, in_ms: u64, body: Option<Vec<u8>>) -> Record {
        let attempt = self.attempt();
        let mut r = self.next(
            Status::Pending {
                next_ms: now.saturating_add(in_ms),
                attempts: 0,
            },
            Event::RetryAsked {
                attempt,
                at_ms: now,
                in_ms,
            },
        );
        r.alarm.due_ms = now.saturating_add(in_ms);
        if let Some(b) = body {
            r.alarm.body = b;
        }
        r
    }

    /// The record after a client's cancel at `now`; none when already final.
    pub fn cancelled(&self, now: u64) -> Option<Record> {
        if self.status.is_final() {
            return None;
        }
        Some(self.next(
            Status::Cancelled { at_ms: now },
            Event::Cancelled { at_ms: now },
        ))
    }

    /// The record after a cron rule skipped the firing at `now`; none when final.
    pub fn skipped(&self, now: u64, reason: &str) -> Option<Record> {
        if self.status.is_final() {
            return None;
        }
        Some(self.next(
            Status::Skipped {
                at_ms: now,
                reason: reason.to_string(),
            },
            Event::Skipped {
                at_ms: now,
                reason: reason.to_string(),
            },
        ))
    }

    /// The first record of a newly set alarm at `now`: pending from its due time, or
    /// from `now` if that is later (never indexed behind the present: the sweep may
    /// have passed that bucket). Its `set_seq` is 0 as stored: a reader takes the
    /// record's own stream sequence (the store's `decode`).
    pub fn set(alarm: Alarm, now: u64) -> Record {
        Record {
            v: 1,
            status: Status::Pending {
                next_ms: alarm.due_ms.max(now),
                attempts: 0,
            },
            alarm,
            set_seq: 0,
            event: Event::Set { at_ms: now },
        }
    }

    fn attempt(&self) -> u32 {
        match &self.status {
            Status::Dispatching { attempt, .. } => *attempt,
            Status::Pending { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    fn lateness(&self, now: u64) -> i64 {
        let fired = match &self.status {
            Status::Dispatching { since_ms, .. } => *since_ms,
            _ => now,
        };
        i64::try_from(fired).unwrap_or(i64::MAX)
            - i64::try_from(self.alarm.due_ms).unwrap_or(i64::MAX)
    }

    fn next(&self, status: Status, event: Event) -> Record {
        Record {
            v: 1,
            alarm: self.alarm.clone(),
            set_seq: self.set_seq,
            status,
            event,
        }
    }
}

/// The partition of alarm `id`: blake3 of the id, first four bytes, modulo
/// [`PARTITIONS`].
pub fn partition_of(id: &str) -> u32 {
    let h = blake3::hash(id.as_bytes());
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) % PARTITIONS
}

/// The due-index bucket of a time.
pub fn bucket_of(ms: u64) -> u64 {
    ms / BUCKET_MS
}

pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarm(id: &str) -> Alarm {
        Alarm {
            id: id.into(),
            due_ms: 1_000_000,
            target: Target::Process("p1".into()),
            body: b"hello".to_vec(),
            headers: vec![("content-type".into(), "text/plain".into())],
            dispatch_timeout_ms: 5_000,
            retry: RetryPolicy {
                attempts: 3,
                backoff_ms: 100,
                max_backoff_ms: 250,
            },
            cron: None,
        }
    }

    fn key() -> FiringKey {
        FiringKey::new([7; 32])
    }

    #[test]
    fn a_firing_id_is_tagged_by_the_key_and_every_part() {
        let k = key();
        let tag = k.tag("a1", 7, 1_000_000);
        assert_eq!(tag, k.tag("a1", 7, 1_000_000), "stable");
        for other in [
            FiringKey::new([8; 32]).tag("a1", 7, 1_000_000),
            k.tag("a2", 7, 1_000_000),
            k.tag("a1", 8, 1_000_000),
            k.tag("a1", 7, 1_000_001),
        ] {
            assert_ne!(tag, other);
        }
        // The parts are delimited: a digit moved from one to the next is another firing.
        assert_ne!(k.tag("a1", 7, 11_000_000), k.tag("a1", 71, 1_000_000));
        assert_eq!(
            format!("{k:?}"),
            "FiringKey(secret)",
            "the key is never printed"
        );
    }

    #[test]
    fn a_firing_goes_pending_dispatching_done_and_keeps_its_id() {
        let mut r = Record::set(alarm("a1"), 10);
        r.set_seq = 7;
        assert_eq!(r.next_action_ms(0), Some(1_000_000));
        let c = r.claim(1_000_020, "L1").unwrap();
        let id = c.firing_id(&key());
        let tag = id.strip_prefix("alarm-a1-7-1000000-").unwrap();
        assert!(
            tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        // What a loader of an earlier version sent for it: the id without the tag.
        assert_eq!(c.untagged_firing_id(), "alarm-a1-7-1000000");
        assert_eq!(c.next_action_ms(500), Some(1_000_020 + 5_000 + 500));
        let d = c.delivered(1_000_050, Some(4), false);
        assert!(d.status.is_final());
        assert_eq!(
            d.event,
            Event::Delivered {
                attempt: 1,
                at_ms: 1_000_050,
                lateness_ms: 20,
                slot: Some(4),
                duplicate: false
            }
        );
        assert_eq!(d.claim(2_000_000, "L2"), None);
        assert_eq!(d.cancelled(2_000_000), None);
        assert_eq!(d.firing_id(&key()), c.firing_id(&key()));
    }

    #[test]
    fn a_retry_policy_member_left_out_takes_its_default() {
        let r: RetryPolicy = serde_json::from_str(r#"{"attempts": 2, "backoff_ms": 200}"#).unwrap();
        assert_eq!(
            r,
            RetryPolicy {
                attempts: 2,
                backoff_ms: 200,
                ..RetryPolicy::default()
            }
        );
        let r: RetryPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(r, RetryPolicy::default());
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"attempt": 2}"#).is_err());
    }

    #[test]
    fn an_entry_is_the_firing_only_with_its_body_and_headers() {
        let r = Record::set(alarm("a1"), 0);
        let stored = |h: &[(&str, &str)]| -> Vec<(String, String)> {
            h.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let ours = stored(&[("content-type", "text/plain")]);
        let hello = protocol::Hash32::digest(b"hello");
        assert!(r.is_fired_as(&hello, &ours));
        // The scheduler adds nothing an alarm may carry, but stores more than it
        // sent when asked (an execution key); values without surrounding blanks.
        let more = stored(&[("Ts-Execution-Key", "k"), ("content-type", " text/plain")]);
        assert!(r.is_fired_as(&hello, &more));
        assert!(!r.is_fired_as(&protocol::Hash32::digest(b"forged"), &ours));
        assert!(!r.is_fired_as(&hello, &[]));
        assert!(!r.is_fired_as(&hello, &stored(&[("content-type", "text/html")])));
    }

    #[test]
    fn failures_back_off_then_dead_letter() {
        let r = Record::set(alarm("a1"), 0);
        let c1 = r.claim(1_000_000, "L").unwrap();
        let (f1, dead) = c1.failed(1_000_010, "timeout");
        assert!(!dead);
        assert_eq!(
            f1.status,
            Status::Pending {
                next_ms: 1_000_110,
                attempts: 1
            }
        );
        let c2 = f1.claim(1_000_110, "L").unwrap();
        let (f2, _) = c2.failed(1_000_120, "timeout");
        assert_eq!(
            f2.status,
            Status::Pending {
                next_ms: 1_000_320,
                attempts: 2
            }
        );
        let c3 = f2.claim(1_000_320, "L").unwrap();
        assert_eq!(
            c3.firing_id(&key()),
            c1.firing_id(&key()),
            "one firing, one id"
        );
        let (f3, dead) = c3.failed(1_000_330, "no responders");
        assert!(dead);
        assert!(matches!(f3.status, Status::Dead { .. }));
    }

    #[test]
    fn a_claim_that_outlived_its_timeout_is_taken_over_as_the_same_attempt() {
        let r = Record::set(alarm("a1"), 0);
        let c = r.claim(1_000_000, "L1").unwrap();
        let again = c.claim(1_010_000, "L2").unwrap();
        assert!(matches!(
            again.status,
            Status::Dispatching { attempt: 1, .. }
        ));
    }

    #[test]
    fn a_retry_asked_is_a_new_firing_with_a_new_body() {
        let mut r = Record::set(alarm("a1"), 0);
        r.set_seq = 3;
        let c = r.claim(1_000_000, "L").unwrap();
        let again = c.retry_asked(1_000_005, 2_000, Some(b"v2".to_vec()));
        assert_eq!(
            again.status,
            Status::Pending {
                next_ms: 1_002_005,
                attempts: 0
            }
        );
        assert_eq!(again.alarm.body, b"v2");
        assert_ne!(again.firing_id(&key()), c.firing_id(&key()));
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let p = RetryPolicy {
            attempts: 10,
            backoff_ms: 100,
            max_backoff_ms: 1_000,
        };
        let d: Vec<u64> = (1..=6).map(|a| p.delay_after(a)).collect();
        assert_eq!(d, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(p.delay_after(u32::MAX), 1_000);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let s = journal::subjects::Subjects::default();
        assert!(alarm("ok-1").validate(&s).is_ok());
        let cases: Vec<(Alarm, &str)> = vec![
            (
                Alarm {
                    id: "a.b".into(),
                    ..alarm("x")
                },
                "id",
            ),
            (
                Alarm {
                    id: String::new(),
                    ..alarm("x")
                },
                "id",
            ),
            (
                Alarm {
                    target: Target::Process("a b".into()),
                    ..alarm("x")
                },
                "target process",
            ),
            (
                Alarm {
                    target: Target::Subject("ts.log.p".into()),
                    ..alarm("x")
                },
                "target subject",
            ),
            (
                Alarm {
                    target: Target::Subject("$KV.X.y".into()),
                    ..alarm("x")
                },
                "target subject",
            ),
            (
                Alarm {
                    target: Target::Subject("a.*".into()),
                    ..alarm("x")
                },
                "target subject",
            ),
            (
                Alarm {
                    body: vec![0; MAX_BODY + 1],
                    ..alarm("x")
                },
                "body",
            ),
            (
                Alarm {
                    headers: vec![("Nats-Msg-Id".into(), "x".into())],
                    ..alarm("x")
                },
                "header",
            ),
            (
                Alarm {
                    headers: vec![("ts-mode".into(), "x".into())],
                    ..alarm("x")
                },
                "header",
            ),
            (
                Alarm {
                    dispatch_timeout_ms: 0,
                    ..alarm("x")
                },
                "dispatch_timeout_ms",
            ),
            (
                Alarm {
                    retry: RetryPolicy {
                        attempts: 0,
                        ..RetryPolicy::default()
                    },
                    ..alarm("x")
                },
                "retry",
            ),
        ];
        for (a, field) in cases {
            let e = a.validate(&s).unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn records_round_trip_as_json_and_refuse_other_versions() {
        let r = Record::set(alarm("a1"), 5);
        let bytes = r.encode().unwrap();
        assert_eq!(Record::decode(&bytes, "s", 1).unwrap(), r);
        let mut v2: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v2["v"] = 2.into();
        let e = Record::decode(&serde_json::to_vec(&v2).unwrap(), "s", 9).unwrap_err();
        assert!(e.to_string().contains("version 2"));
        assert!(Record::decode(b"\xff", "s", 1).is_err());
    }

    #[test]
    fn partitions_and_buckets_are_stable() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(BUCKET_MS - 1), 0);
        assert_eq!(bucket_of(BUCKET_MS), 1);
        let p = partition_of("alarm-1");
        assert!(p < PARTITIONS);
        assert_eq!(p, partition_of("alarm-1"));
        let spread: std::collections::BTreeSet<u32> =
            (0..1000).map(|i| partition_of(&format!("a{i}"))).collect();
        assert_eq!(spread.len(), PARTITIONS as usize);
    }
}
