//! Every record that crosses the wire. All are MessagePack maps with the field
//! names shown (rmp-serde "named" encoding), so any MessagePack library can read
//! them; `schemas/records.md` lists them field by field.
//!
//! Only the types in this module derive `Serialize`: they are the IPC boundary.

use serde::{Deserialize, Serialize};

use crate::chain::{self, Fields};
use crate::hash::Hash32;
use crate::keys;
use crate::merkle;
use crate::process::ProcessId;
use crate::seal::Seal;
use crate::{Error, Result};

/// Version of the records in this module; a reader refuses a newer one.
pub const RECORD_VERSION: u8 = 3;

/// The oldest run record version still read: version 2 runs (before runs declared
/// their required keys) verify as they did, declaring no key set (schemas/chain.md).
pub const OLDEST_RUN_VERSION: u8 = 2;

/// How a scheduling request is confirmed (the seed's `maybe_inform_recipient` stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Reply once the assignment is signed, before it is durable (`durable: false`).
    Aggressive,
    /// Reply after JetStream acknowledged the write (the default).
    LocalConfirmation,
    /// Reply after the write is also present in the configured second stream.
    RemoteConfirmation,
    /// Refuse to schedule.
    Disabled,
}

impl Mode {
    /// The mode's name as used in headers, configs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Aggressive => "aggressive",
            Mode::LocalConfirmation => "local_confirmation",
            Mode::RemoteConfirmation => "remote_confirmation",
            Mode::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s.trim() {
            "aggressive" => Ok(Mode::Aggressive),
            "local_confirmation" | "local" => Ok(Mode::LocalConfirmation),
            "remote_confirmation" | "remote" => Ok(Mode::RemoteConfirmation),
            "disabled" => Ok(Mode::Disabled),
            other => Err(Error::UnknownMode(other.to_string())),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One assignment as stored inside a [`Run`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The slot given to the message.
    pub slot: u64,
    /// The message id: the client's `Nats-Msg-Id`, or a UUID the scheduler made.
    pub message_id: String,
    /// Milliseconds since the Unix epoch, scheduler clock.
    pub timestamp_ms: u64,
    /// The message's own headers (control headers removed), as `[name, value]` pairs.
    pub headers: Vec<(String, String)>,
    /// The message body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Chain hash of the previous slot (genesis for slot 0).
    #[serde(deserialize_with = "hash_in_place")]
    pub prev_hash: Hash32,
    /// This assignment's chain hash.
    #[serde(deserialize_with = "hash_in_place")]
    pub chain_hash: Hash32,
}

/// Reads a [`Hash32`] straight from the decoder's bytes, without the intermediate
/// buffer of `Hash32`'s own `Deserialize` (two allocations per entry otherwise). It
/// accepts exactly what that one does: bytes, a string's bytes, or a sequence of
/// bytes, of length 32.
fn hash_in_place<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Hash32, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Hash32;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("32 bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Hash32, E> {
            <[u8; 32]>::try_from(v)
                .map(Hash32)
                .map_err(|_| E::invalid_length(v.len(), &"32 bytes"))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Hash32, E> {
            self.visit_bytes(v.as_bytes())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Hash32, A::Error> {
            let mut out = [0u8; 32];
            let mut n = 0;
            while let Some(b) = seq.next_element::<u8>()? {
                if n < 32 {
                    out[n] = b;
                }
                n += 1;
            }
            if n == 32 {
                Ok(Hash32(out))
            } else {
                Err(serde::de::Error::invalid_length(n, &"32 bytes"))
            }
        }
    }
    d.deserialize_byte_buf(Visitor)
}

impl Entry {
    /// The chain fields of this entry for `process`.
    pub fn fields<'a>(&'a self, process: &'a str, body_hash: Hash32) -> Fields<'a> {
        Fields {
            process,
            slot: self.slot,
            message_id: &self.message_id,
            timestamp_ms: self.timestamp_ms,
            headers: &self.headers,
            body_hash,
        }
    }

    /// Recomputes the chain hash from `prev_hash` and the fields.
    pub fn recompute_chain_hash(&self, process: &str) -> Hash32 {
        chain::chain_hash(
            &self.prev_hash,
            &self.fields(process, Hash32::digest(&self.body)),
        )
    }
}

/// One write to the assignment log: a run of consecutive assignments of one process,
/// signed once. The JetStream message on `<prefix>.log.<process>` holds exactly one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// [`RECORD_VERSION`].
    pub v: u8,
    /// The process.
    pub process: String,
    /// Stream sequence of the message this run was written after on its subject
    /// (the write's expected last subject sequence; 0 when it was the first). Signed:
    /// a run anywhere but right after that message is foreign (schemas/chain.md).
    pub prev_seq: u64,
    /// Slot of the first entry; entries are consecutive from here.
    pub first_slot: u64,
    /// The required key set the run was written under: the key ids (sorted, distinct)
    /// that must all seal it, and that must all seal the run that changes the set
    /// next (schemas/chain.md "Which keys a run must carry"). Signed. `None` only in a
    /// version 2 run, which declares nothing (the field is absent there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// The assignments, in slot order (never empty).
    pub entries: Vec<Entry>,
    /// The run's place in its signed batch and the batch's signatures.
    pub seal: Seal,
}

impl Run {
    /// The required key set this run declares; `None` for a version 2 run.
    pub fn declared(&self) -> Option<&[String]> {
        self.keys.as_deref()
    }

    /// Slot of the last entry.
    pub fn last_slot(&self) -> u64 {
        self.first_slot + self.entries.len().saturating_sub(1) as u64
    }

    /// The chain hash of the last entry (the process's head after this run).
    pub fn head(&self) -> Hash32 {
        self.entries
            .last()
            .map(|e| e.chain_hash)
            .unwrap_or(Hash32::ZERO)
    }

    /// The chain hashes of the entries, i.e. the Merkle leaves.
    pub fn leaves(&self) -> Vec<Hash32> {
        self.entries.iter().map(|e| e.chain_hash).collect()
    }

    /// The statement every commitment of this run signs.
    pub fn statement(&self) -> Vec<u8> {
        keys::run_statement(
            &self.process,
            self.prev_seq,
            self.first_slot,
            self.entries.len() as u64,
            &merkle::root_in_place(&mut self.leaves()),
            self.declared(),
        )
    }

    /// The statement, given this run's already built Merkle tree.
    pub fn statement_for(&self, tree: &merkle::Tree) -> Vec<u8> {
        keys::run_statement(
            &self.process,
            self.prev_seq,
            self.first_slot,
            self.entries.len() as u64,
            &tree.root(),
            self.declared(),
        )
    }

    /// This run's Merkle tree (build it once to make many receipts).
    pub fn tree(&self) -> merkle::Tree {
        merkle::Tree::new(&self.leaves())
    }

    /// MessagePack bytes of the run.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("run", self)
    }

    /// Decodes a run and checks its shape (version, non-empty, consecutive slots).
    /// It does not check hashes or signatures; [`crate::verify`] does.
    pub fn decode(bytes: &[u8]) -> Result<Run> {
        // The layout this crate writes, read directly; anything else (another field
        // order, other integer or string forms, extra fields, errors) goes through
        // the general decoder, which then decides alone.
        let mut run: Run = match fast::run(bytes) {
            Some(run) => run,
            None => decode("run", bytes)?,
        };
        let refuse = |reason: String| Error::Decode {
            what: "run",
            reason,
        };
        match run.v {
            // A version 2 run declares no key set; a `keys` field there is not signed.
            2 => run.keys = None,
            RECORD_VERSION => match &run.keys {
                None => return Err(refuse("a version 3 run without keys".into())),
                Some(keys) if !keys.windows(2).all(|w| w[0] < w[1]) => {
                    return Err(refuse("keys are not sorted and distinct".into()))
                }
                Some(_) => {}
            },
            v => {
                return Err(refuse(format!(
                    "version {v} is not {OLDEST_RUN_VERSION} to {RECORD_VERSION}"
                )))
            }
        }
        if run.entries.is_empty() {
            return Err(Error::Decode {
                what: "run",
                reason: "no entries".into(),
            });
        }
        for (i, e) in run.entries.iter().enumerate() {
            if e.slot != run.first_slot + i as u64 {
                return Err(Error::Decode {
                    what: "run",
                    reason: format!(
                        "entry {i} has slot {} not {}",
                        e.slot,
                        run.first_slot + i as u64
                    ),
                });
            }
        }
        Ok(run)
    }

    /// The receipt of entry `index` (a client's reply), with its Merkle audit path.
    /// Builds the tree: for many receipts of one run use [`Run::receipt_in`].
    pub fn receipt(&self, index: usize, durable: bool, duplicate: bool) -> Result<Receipt> {
        self.receipt_in(&self.tree(), index, durable, duplicate)
    }

    /// The receipt of entry `index`, with `tree` = [`Run::tree`].
    pub fn receipt_in(
        &self,
        tree: &merkle::Tree,
        index: usize,
        durable: bool,
        duplicate: bool,
    ) -> Result<Receipt> {
        let e = self
            .entries
            .get(index)
            .ok_or(Error::InvalidProof("index outside the run"))?;
        Ok(Receipt {
            v: self.v,
            process: self.process.clone(),
            slot: e.slot,
            message_id: e.message_id.clone(),
            timestamp_ms: e.timestamp_ms,
            headers: e.headers.clone(),
            body_hash: Hash32::digest(&e.body),
            prev_hash: e.prev_hash,
            chain_hash: e.chain_hash,
            durable,
            duplicate,
            run_prev_seq: self.prev_seq,
            run_first_slot: self.first_slot,
            run_count: self.entries.len() as u64,
            run_keys: self.keys.clone(),
            merkle_path: tree.proof(index)?,
            seal: self.seal.clone(),
        })
    }
}

/// The reply to a successful scheduling request: the assignment (the body replaced by
/// its BLAKE3 digest) with what a client needs to check it alone: the chain step, the
/// Merkle path to the run's root and the run's seal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The record version of the run the assignment was written in.
    pub v: u8,
    /// The process.
    pub process: String,
    /// The slot given to the message.
    pub slot: u64,
    /// The message id.
    pub message_id: String,
    /// Milliseconds since the Unix epoch, scheduler clock.
    pub timestamp_ms: u64,
    /// The message's headers as stored.
    pub headers: Vec<(String, String)>,
    /// BLAKE3 of the body.
    pub body_hash: Hash32,
    /// Chain hash of the previous slot.
    pub prev_hash: Hash32,
    /// This assignment's chain hash.
    pub chain_hash: Hash32,
    /// False only in `aggressive` mode: signed, but not yet acknowledged by JetStream.
    pub durable: bool,
    /// True when this message id was already scheduled and this is the original assignment.
    pub duplicate: bool,
    /// `prev_seq` of the run the assignment was written in (its place in the log).
    pub run_prev_seq: u64,
    /// First slot of the run the assignment was written in.
    pub run_first_slot: u64,
    /// Number of assignments in that run.
    pub run_count: u64,
    /// The key set that run declares (signed; absent for a version 2 run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_keys: Option<Vec<String>>,
    /// Merkle audit path of this assignment within its run, leaf first.
    pub merkle_path: Vec<Hash32>,
    /// The run's seal: its place in the signed batch and the signatures.
    pub seal: Seal,
}

impl Receipt {
    /// Checks the receipt on its own: the chain step from `prev_hash`, the Merkle path
    /// to the run root, the seal's path to the batch root and its commitments. Pass
    /// the body to check it too. Returns the key ids whose commitments verified.
    pub fn check(&self, body: Option<&[u8]>) -> Result<Vec<String>, &'static str> {
        if let Some(b) = body {
            if Hash32::digest(b) != self.body_hash {
                return Err("body does not match body_hash");
            }
        }
        let fields = Fields {
            process: &self.process,
            slot: self.slot,
            message_id: &self.message_id,
            timestamp_ms: self.timestamp_ms,
            headers: &self.headers,
            body_hash: self.body_hash,
        };
        if chain::chain_hash(&self.prev_hash, &fields) != self.chain_hash {
            return Err("chain_hash does not follow from prev_hash and the fields");
        }
        if self.slot == 0 {
            let p = ProcessId::new(self.process.clone()).map_err(|_| "invalid process id")?;
            if self.prev_hash != chain::genesis(&p) {
                return Err("slot 0 does not start from the process's genesis hash");
            }
        }
        if self.slot < self.run_first_slot || self.slot - self.run_first_slot >= self.run_count {
            return Err("slot outside its run");
        }
        let index = (self.slot - self.run_first_slot) as usize;
        let root = merkle::root_from_proof(
            &self.chain_hash,
            index,
            self.run_count as usize,
            &self.merkle_path,
        )
        .map_err(|_| "merkle path does not fit the run")?;
        let statement = keys::run_statement(
            &self.process,
            self.run_prev_seq,
            self.run_first_slot,
            self.run_count,
            &root,
            self.run_keys.as_deref(),
        );
        self.seal.check(&statement)
    }

    /// MessagePack bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("receipt", self)
    }

    /// Decodes a receipt.
    pub fn decode(bytes: &[u8]) -> Result<Receipt> {
        decode("receipt", bytes)
    }
}

/// Machine-readable reason of a refused request. On the wire: the `Ts-Error` header
/// (snake_case name) beside the services-API headers `Nats-Service-Error-Code`
/// ([`ErrorCode::status`]) and `Nats-Service-Error` (the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The subject does not name a valid process.
    InvalidProcess,
    /// A header or payload could not be understood.
    Malformed,
    /// The request itself could not be parsed (its header block or subject is not
    /// valid NATS/UTF-8): it never reached the checks of its endpoint.
    MalformedRequest,
    /// The body is larger than the configured maximum.
    TooLarge,
    /// `Ts-Mode` names no mode.
    UnknownMode,
    /// Scheduling is disabled for this process (or `disabled` was asked for).
    Disabled,
    /// `remote_confirmation` was asked for but no remote stream is configured.
    RemoteNotConfigured,
    /// The write is durable locally but did not reach the remote stream in time.
    RemoteTimeout,
    /// The process requires a key this scheduler does not hold.
    MissingKey,
    /// The log could not be written or read now; retry (with the same message id).
    Unavailable,
    /// The log's store or stream is full: nothing was written; retry once an operator
    /// made room (the scheduler resumes by itself).
    LogFull,
    /// Too much is queued (in count or bytes, for the process or in all): refused at
    /// once, nothing written; retry after the hint in the message.
    Busy,
    /// The range asked for is empty or reversed.
    InvalidRange,
    /// An alarm or cron job that cannot be stored as given (bad id, time, target,
    /// policy); the message says which field.
    InvalidAlarm,
    /// The alarm or cron job named does not exist.
    NotFound,
    /// A bug: the scheduler could not do what it should have been able to.
    Internal,
    /// The request's `Ts-Queue-Key` is held by a job of the same process that has not
    /// started yet (or by a request not yet written): refused at once, nothing written.
    QueueKeyHeld,
}

impl ErrorCode {
    /// The snake_case name (the `Ts-Error` header value).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidProcess => "invalid_process",
            ErrorCode::Malformed => "malformed",
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownMode => "unknown_mode",
            ErrorCode::Disabled => "disabled",
            ErrorCode::RemoteNotConfigured => "remote_not_configured",
            ErrorCode::RemoteTimeout => "remote_timeout",
            ErrorCode::MissingKey => "missing_key",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::LogFull => "log_full",
            ErrorCode::Busy => "busy",
            ErrorCode::InvalidRange => "invalid_range",
            ErrorCode::InvalidAlarm => "invalid_alarm",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::QueueKeyHeld => "queue_key_held",
        }
    }

    /// Parses a `Ts-Error` header value.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ALL_ERROR_CODES.iter().copied().find(|c| c.as_str() == s)
    }

    /// The HTTP-like status sent as `Nats-Service-Error-Code`.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidProcess
            | ErrorCode::Malformed
            | ErrorCode::MalformedRequest
            | ErrorCode::UnknownMode
            | ErrorCode::RemoteNotConfigured
            | ErrorCode::InvalidRange
            | ErrorCode::InvalidAlarm => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Disabled | ErrorCode::MissingKey => 403,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unavailable => 503,
            ErrorCode::LogFull => 507,
            ErrorCode::Busy => 429,
            ErrorCode::RemoteTimeout => 504,
            ErrorCode::Internal => 500,
            ErrorCode::QueueKeyHeld => 409,
        }
    }
}

/// Every error code, for parsing and documentation.
pub const ALL_ERROR_CODES: [ErrorCode; 17] = [
    ErrorCode::InvalidProcess,
    ErrorCode::Malformed,
    ErrorCode::MalformedRequest,
    ErrorCode::TooLarge,
    ErrorCode::UnknownMode,
    ErrorCode::Disabled,
    ErrorCode::RemoteNotConfigured,
    ErrorCode::RemoteTimeout,
    ErrorCode::MissingKey,
    ErrorCode::Unavailable,
    ErrorCode::LogFull,
    ErrorCode::Busy,
    ErrorCode::InvalidRange,
    ErrorCode::InvalidAlarm,
    ErrorCode::NotFound,
    ErrorCode::Internal,
    ErrorCode::QueueKeyHeld,
];

/// Per-process settings, stored in the `<PREFIX>_PROCESSES` key-value bucket under the
/// process id. A process without an entry uses the service defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    /// The process's default mode; `disabled` refuses every request.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Key ids that must all commit to every run of this process (the seed's
    /// "commitment wallets"). Empty: the scheduler's default key.
    #[serde(default)]
    pub keys: Vec<String>,
}

impl ProcessConfig {
    /// MessagePack bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("process config", self)
    }
    /// Decodes a process config.
    pub fn decode(bytes: &[u8]) -> Result<ProcessConfig> {
        decode("process config", bytes)
    }
}

/// A published scheduler public key, stored in the `<PREFIX>_KEYS` bucket under its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    /// [`keys::key_id`] of the key.
    pub key_id: String,
    /// The ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
}

impl PublishedKey {
    /// MessagePack bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("published key", self)
    }
    /// Decodes a published key.
    pub fn decode(bytes: &[u8]) -> Result<PublishedKey> {
        decode("published key", bytes)
    }
}

/// Answer of `<prefix>.slot.<process>`: the process's head, read from the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The process.
    pub process: String,
    /// The last assigned slot, or none when the process has no assignment yet.
    pub slot: Option<u64>,
    /// The slot the next message will get.
    pub next_slot: u64,
    /// The chain head: the last chain hash, or the genesis hash when empty.
    pub chain_head: Hash32,
    /// Timestamp of the last assignment.
    pub timestamp_ms: Option<u64>,
}

impl SlotInfo {
    /// MessagePack bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("slot info", self)
    }
    /// Decodes a slot info.
    pub fn decode(bytes: &[u8]) -> Result<SlotInfo> {
        decode("slot info", bytes)
    }
}

/// Request of `<prefix>.range.<process>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// First slot wanted.
    pub from: u64,
    /// Last slot wanted (inclusive); none means up to the current head.
    #[serde(default)]
    pub to: Option<u64>,
    /// Most entries in this page; the service also caps it (see `next`).
    #[serde(default)]
    pub limit: Option<u32>,
}

impl RangeRequest {
    /// MessagePack bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("range request", self)
    }
    /// Decodes a range request.
    pub fn decode(bytes: &[u8]) -> Result<RangeRequest> {
        decode("range request", bytes)
    }
}

/// One page of a range read. A page never ends early in silence: when `next` is set,
/// the range goes on from that slot; when it is none, the page reached `to` (or the head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangePage {
    /// The process.
    pub process: String,
    /// Consecutive entries from the requested `from`.
    pub entries: Vec<Entry>,
    /// Where the next page starts, if the range is not exhausted.
    pub next: Option<u64>,
}

impl RangePage {
    /// MessagePack bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode("range page", self)
    }
    /// Decodes a range page.
    pub fn decode(bytes: &[u8]) -> Result<RangePage> {
        decode("range page", bytes)
    }
}

/// A fault found in a process's log, published as JSON on `<prefix>.events.fault`
/// (JSON rather than MessagePack: it is read by operators and their tools, e.g.
/// `nats sub 'ts.events.>'`). `code` is one of the fault codes of schemas/chain.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// Event version: 1.
    pub v: u8,
    /// The process.
    pub process: String,
    /// Stream sequence of the message at fault.
    pub seq: u64,
    /// The slot the chain expected next there.
    pub slot: u64,
    /// The fault code (`replayed`, `bad_signature`, `lost`, ...).
    pub code: String,
    /// What is wrong, for people.
    pub message: String,
    /// Who found it (`scheduler`, `verify`, ...).
    pub detected_by: String,
    /// When it was found (ms since the Unix epoch, the finder's clock).
    pub time_ms: u64,
}

impl FaultEvent {
    /// The event of `fault` in `process`'s log.
    pub fn new(
        process: &ProcessId,
        fault: &crate::verify::Fault,
        detected_by: &str,
        time_ms: u64,
    ) -> FaultEvent {
        FaultEvent {
            v: 1,
            process: process.to_string(),
            seq: fault.seq,
            slot: fault.slot,
            code: fault.kind.code().to_string(),
            message: fault.kind.to_string(),
            detected_by: detected_by.to_string(),
            time_ms,
        }
    }
}

/// A direct reader of the MessagePack layout [`Run::encode`] writes (named fields in
/// declaration order, the seal read by the general decoder). It accepts nothing the
/// general decoder would not, and reads the same values from what it accepts: every
/// deviation returns `None` and the caller decodes the general way. This is the
/// verifier's hot path: per entry it only compares seven short keys and makes the
/// two allocations the owned `Entry` needs (message id and body).
mod fast {
    use super::{Entry, Run};
    use crate::hash::Hash32;
    use crate::seal::Seal;

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let end = self.at.checked_add(n)?;
            let out = self.bytes.get(self.at..end)?;
            self.at = end;
            Some(out)
        }
        fn byte(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        fn be(&mut self, n: usize) -> Option<u64> {
            Some(
                self.take(n)?
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
            )
        }
        fn map_len(&mut self) -> Option<usize> {
            match self.byte()? {
                m @ 0x80..=0x8f => Some(usize::from(m & 0x0f)),
                0xde => self.be(2).map(|n| n as usize),
                0xdf => self.be(4).map(|n| n as usize),
                _ => None,
            }
        }
        fn array_len(&mut self) -> Option<usize> {
            match self.byte()? {
                m @ 0x90..=0x9f => Some(usize::from(m & 0x0f)),
                0xdc => self.be(2).map(|n| n as usize),
                0xdd => self.be(4).map(|n| n as usize),
                _ => None,
            }
        }
        fn uint(&mut self) -> Option<u64> {
            match self.byte()? {
                m @ 0x00..=0x7f => Some(u64::from(m)),
                0xcc => self.be(1),
                0xcd => self.be(2),
                0xce => self.be(4),
                0xcf => self.be(8),
                _ => None,
            }
        }
        fn str_bytes(&mut self) -> Option<&'a [u8]> {
            let n = match self.byte()? {
                m @ 0xa0..=0xbf => usize::from(m & 0x1f),
                0xd9 => self.be(1)? as usize,
                0xda => self.be(2)? as usize,
                0xdb => self.be(4)? as usize,
                _ => return None,
            };
            self.take(n)
        }
        fn string(&mut self) -> Option<String> {
            std::str::from_utf8(self.str_bytes()?)
                .ok()
                .map(str::to_string)
        }
        fn key(&mut self, name: &str) -> Option<()> {
            (self.str_bytes()? == name.as_bytes()).then_some(())
        }
        fn bin(&mut self) -> Option<&'a [u8]> {
            let n = match self.byte()? {
                0xc4 => self.be(1)? as usize,
                0xc5 => self.be(2)? as usize,
                0xc6 => self.be(4)? as usize,
                _ => return None,
            };
            self.take(n)
        }
        fn hash(&mut self) -> Option<Hash32> {
            self.bin()?.try_into().ok().map(Hash32)
        }
    }

    fn entry(r: &mut Reader<'_>) -> Option<Entry> {
        if r.map_len()? != 7 {
            return None;
        }
        r.key("slot")?;
        let slot = r.uint()?;
        r.key("message_id")?;
        let message_id = r.string()?;
        r.key("timestamp_ms")?;
        let timestamp_ms = r.uint()?;
        r.key("headers")?;
        let n = r.array_len()?;
        let mut headers = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            if r.array_len()? != 2 {
                return None;
            }
            headers.push((r.string()?, r.string()?));
        }
        r.key("body")?;
        let body = r.bin()?.to_vec();
        r.key("prev_hash")?;
        let prev_hash = r.hash()?;
        r.key("chain_hash")?;
        let chain_hash = r.hash()?;
        Some(Entry {
            slot,
            message_id,
            timestamp_ms,
            headers,
            body,
            prev_hash,
            chain_hash,
        })
    }

    /// The run, if `bytes` are laid out as this crate writes it.
    pub(super) fn run(bytes: &[u8]) -> Option<Run> {
        let mut r = Reader { bytes, at: 0 };
        // 7 fields: a run that declares its keys; 6: a version 2 run, which does not.
        let with_keys = match r.map_len()? {
            7 => true,
            6 => false,
            _ => return None,
        };
        r.key("v")?;
        let v = u8::try_from(r.uint()?).ok()?;
        r.key("process")?;
        let process = r.string()?;
        r.key("prev_seq")?;
        let prev_seq = r.uint()?;
        r.key("first_slot")?;
        let first_slot = r.uint()?;
        let keys = if with_keys {
            r.key("keys")?;
            let n = r.array_len()?;
            if n > bytes.len() {
                return None;
            }
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(r.string()?);
            }
            Some(keys)
        } else {
            None
        };
        r.key("entries")?;
        let n = r.array_len()?;
        // Every entry takes more than 64 bytes: a count beyond that is a lie.
        if n > bytes.len() / 64 + 1 {
            return None;
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(entry(&mut r)?);
        }
        r.key("seal")?;
        let seal: Seal = rmp_serde::from_slice(r.bytes.get(r.at..)?).ok()?;
        Some(Run {
            v,
            process,
            prev_seq,
            first_slot,
            keys,
            entries,
            seal,
        })
    }
}

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(v).map_err(|e| Error::Encode {
        what,
        reason: e.to_string(),
    })
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    pub(crate) fn run_of(process: &str, bodies: &[&[u8]], kp: &Keypair) -> Run {
        let p = ProcessId::new(process).unwrap();
        let mut prev = chain::genesis(&p);
        let mut entries = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            let mut e = Entry {
                slot: i as u64,
                message_id: format!("m{i}"),
                timestamp_ms: 1000 + i as u64,
                headers: vec![],
                body: b.to_vec(),
                prev_hash: prev,
                chain_hash: Hash32::ZERO,
            };
            e.chain_hash = e.recompute_chain_hash(process);
            prev = e.chain_hash;
            entries.push(e);
        }
        let mut run = Run {
            v: RECORD_VERSION,
            process: process.into(),
            prev_seq: 0,
            first_slot: 0,
            keys: Some(vec![kp.id().to_string()]),
            entries,
            seal: Seal::default(),
        };
        run.seal = crate::seal::seal(&[crate::seal::run_digest(&run.statement())], &[kp]).remove(0);
        run
    }

    /// `run` as a version 2 record (no declared keys), sealed again by `kp`.
    fn as_v2(mut run: Run, kp: &Keypair) -> Run {
        run.v = 2;
        run.keys = None;
        run.seal = crate::seal::seal(&[crate::seal::run_digest(&run.statement())], &[kp]).remove(0);
        run
    }

    #[test]
    fn run_round_trips_and_every_receipt_checks() {
        let kp = Keypair::from_seed([1; 32]);
        let run = run_of("p", &[b"a", b"bb", b"ccc"], &kp);
        let back = Run::decode(&run.encode().unwrap()).unwrap();
        assert_eq!(back, run);
        for i in 0..3 {
            let r =
                Receipt::decode(&run.receipt(i, true, false).unwrap().encode().unwrap()).unwrap();
            assert_eq!(
                r.check(Some(&run.entries[i].body)).unwrap(),
                vec![kp.id().to_string()]
            );
            assert!(r.check(Some(b"other")).is_err());
            let mut forged = r.clone();
            forged.slot += 1;
            assert!(forged.check(None).is_err());
        }
    }

    /// The general decoder alone (what `Run::decode` falls back to).
    fn general(bytes: &[u8]) -> Option<Run> {
        rmp_serde::from_slice(bytes).ok()
    }

    #[test]
    fn the_direct_reader_reads_what_the_general_decoder_reads() {
        let kp = Keypair::from_seed([1; 32]);
        let mut run = run_of("p-1", &[b"", b"a", &[0xff; 300], &vec![7; 70_000]], &kp);
        run.process = "pé-1".into();
        run.prev_seq = u64::MAX;
        run.first_slot = 1 << 40;
        run.entries[1].headers = vec![("z".into(), "ü".repeat(40)), ("a".into(), String::new())];
        run.entries[2].message_id = "m".repeat(300);
        run.entries[3].timestamp_ms = 0;
        run.keys = Some(vec!["".into(), "a".into(), "ü".repeat(20), "z".repeat(300)]);
        for (i, e) in run.entries.iter_mut().enumerate() {
            e.slot = run.first_slot + i as u64;
        }
        let bytes = run.encode().unwrap();
        assert_eq!(fast::run(&bytes), Some(run.clone()));
        assert_eq!(general(&bytes), Some(run.clone()));
        // Trailing bytes are ignored by both.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"tail");
        assert_eq!(fast::run(&longer), general(&longer));
        // Every truncation and many single-byte changes: whatever the direct reader
        // reads, the general one reads the same.
        for cut in 0..bytes.len().min(2000) {
            if let Some(r) = fast::run(&bytes[..cut]) {
                assert_eq!(Some(r), general(&bytes[..cut]), "cut at {cut}");
            }
        }
        // A version 2 record (6 fields, no keys) is read directly too.
        let old = as_v2(run_of("p", &[b"ab", b"c"], &kp), &kp);
        let old_bytes = old.encode().unwrap();
        assert_eq!(fast::run(&old_bytes), Some(old.clone()));
        assert_eq!(general(&old_bytes), Some(old));
        let small = run_of("p", &[b"ab", b"c"], &kp).encode().unwrap();
        for at in 0..small.len() {
            for b in [
                0x00, 0x01, 0x07, 0x7f, 0x80, 0x87, 0x90, 0xa1, 0xc0, 0xc4, 0xcc, 0xcf, 0xd0, 0xd9,
                0xdc, 0xde, 0xff,
            ] {
                let mut m = small.clone();
                m[at] = b;
                if let Some(r) = fast::run(&m) {
                    assert_eq!(Some(r), general(&m), "byte {at} set to {b:#x}");
                }
            }
        }
    }

    #[test]
    fn another_layout_goes_to_the_general_decoder() {
        let kp = Keypair::from_seed([1; 32]);
        let run = run_of("p", &[b"a", b"b"], &kp);
        // Fields in another order (as a map from another encoder): still the same run.
        let value = serde_json::json!({
            "seal": serde_json::to_value(&run.seal).unwrap(),
            "entries": run.entries.iter().map(|e| serde_json::json!({
                "chain_hash": serde_bytes::Bytes::new(&e.chain_hash.0),
                "prev_hash": serde_bytes::Bytes::new(&e.prev_hash.0),
                "body": serde_bytes::Bytes::new(&e.body),
                "headers": e.headers,
                "timestamp_ms": e.timestamp_ms,
                "message_id": e.message_id,
                "slot": e.slot,
            })).collect::<Vec<_>>(),
            "first_slot": run.first_slot,
            "keys": run.keys,
            "prev_seq": run.prev_seq,
            "process": run.process,
            "v": run.v,
        });
        let bytes = rmp_serde::to_vec(&value).unwrap();
        assert_eq!(fast::run(&bytes), None);
        assert_eq!(Run::decode(&bytes).unwrap(), run);
    }

    #[test]
    fn version_2_runs_still_decode_and_declare_nothing() {
        let kp = Keypair::from_seed([1; 32]);
        let old = as_v2(run_of("p", &[b"a", b"b"], &kp), &kp);
        let bytes = old.encode().unwrap();
        // Encoded as version 2 wrote it: six fields, no `keys`.
        assert_eq!(bytes[0], 0x86);
        let back = Run::decode(&bytes).unwrap();
        assert_eq!(back, old);
        assert_eq!(back.declared(), None);
        assert!(back.statement().starts_with(crate::keys::RUN_DOMAIN_V2));
        // Its receipts verify as before.
        let r = back.receipt(1, true, false).unwrap();
        assert_eq!((r.v, r.run_keys.clone()), (2, None));
        assert_eq!(
            Receipt::decode(&r.encode().unwrap()).unwrap().check(None),
            Ok(vec![kp.id().to_string()])
        );
        // A `keys` field on a version 2 run is not signed: it is ignored.
        let mut claimed = old.clone();
        claimed.keys = Some(vec!["k".into()]);
        assert_eq!(
            Run::decode(&claimed.encode().unwrap()).unwrap().declared(),
            None
        );
    }

    #[test]
    fn the_declared_keys_are_signed_and_travel_in_receipts() {
        let kp = Keypair::from_seed([1; 32]);
        let run = run_of("p", &[b"a", b"b"], &kp);
        assert!(run.statement().starts_with(crate::keys::RUN_DOMAIN));
        let r = run.receipt(0, true, false).unwrap();
        assert_eq!(r.run_keys.as_deref(), Some(&[kp.id().to_string()][..]));
        assert!(r.check(None).is_ok());
        let mut other = r.clone();
        other.run_keys = Some(vec![]);
        assert!(other.check(None).is_err());
        other.run_keys = None;
        assert!(other.check(None).is_err());
    }

    #[test]
    fn decode_refuses_malformed_runs() {
        let kp = Keypair::from_seed([1; 32]);
        let mut run = run_of("p", &[b"a", b"b"], &kp);
        for (keys, ok) in [
            (None, false),
            (Some(vec!["b".to_string(), "a".to_string()]), false),
            (Some(vec!["a".to_string(), "a".to_string()]), false),
            (Some(vec![]), true),
            (Some(vec!["a".to_string(), "b".to_string()]), true),
        ] {
            let mut r = run.clone();
            r.keys = keys.clone();
            assert_eq!(Run::decode(&r.encode().unwrap()).is_ok(), ok, "{keys:?}");
        }
        for v in [1, 4] {
            let mut r = run.clone();
            r.v = v;
            assert!(Run::decode(&r.encode().unwrap()).is_err(), "version {v}");
        }
        assert!(Run::decode(b"\xc1garbage").is_err());
        run.entries[1].slot = 5;
        assert!(Run::decode(&run.encode().unwrap()).is_err());
        run.entries.clear();
        assert!(Run::decode(&run.encode().unwrap()).is_err());
    }

    #[test]
    fn modes_and_error_codes_parse_back() {
        for m in [
            Mode::Aggressive,
            Mode::LocalConfirmation,
            Mode::RemoteConfirmation,
            Mode::Disabled,
        ] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
        }
        assert!(matches!(
            "eventually".parse::<Mode>(),
            Err(Error::UnknownMode(_))
        ));
        for c in ALL_ERROR_CODES {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
        }
    }
}
