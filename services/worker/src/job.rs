//! Jobs and their results (pure): what a feeder hands out, what an instance records.
//! Layout and meaning: schemas/workers.md.

use serde::{Deserialize, Serialize};

use protocol::wire::Entry;
use protocol::ProcessId;

use crate::{Error, Result};

/// Version of the [`Job`] record.
pub const JOB_VERSION: u8 = 1;

/// Version of the [`ResultEvent`] record.
pub const RESULT_VERSION: u8 = 1;

/// Partitions of a group's work (part of the work subjects: fixed).
pub const PARTITIONS: u32 = 16;

/// One assignment of the log as a worker group's job: it names its place in the log
/// (process, slot, the run's stream sequence and the entry's chain hash), and carries
/// the message (id, headers, body) the scheduler assigned there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// [`JOB_VERSION`].
    pub v: u8,
    /// The worker group.
    pub group: String,
    /// The process.
    pub process: String,
    /// The slot.
    pub slot: u64,
    /// The message id the scheduler recorded.
    pub message_id: String,
    /// The scheduler's timestamp of the assignment (ms since the epoch).
    pub timestamp_ms: u64,
    /// The message's own headers.
    pub headers: Vec<(String, String)>,
    /// The message body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Stream sequence of the run in the log.
    pub log_seq: u64,
    /// The assignment's chain hash (hex).
    pub chain_hash: String,
}

impl Job {
    /// The job of `entry` of `process`'s run at `log_seq`, for `group`.
    pub fn of_entry(group: &str, process: &ProcessId, log_seq: u64, entry: &Entry) -> Job {
        Job {
            v: JOB_VERSION,
            group: group.to_string(),
            process: process.to_string(),
            slot: entry.slot,
            message_id: entry.message_id.clone(),
            timestamp_ms: entry.timestamp_ms,
            headers: entry.headers.clone(),
            body: entry.body.clone(),
            log_seq,
            chain_hash: hex::encode(entry.chain_hash.0),
        }
    }

    /// The job's id within its group: `<process>:<slot>`.
    pub fn id(&self) -> String {
        job_id(&self.process, self.slot)
    }

    /// Its `Nats-Msg-Id` in the work stream: `<group>/<process>:<slot>`. The stream is
    /// shared by every group and drops a message whose id it has seen within its
    /// duplicate window: the group is in the id, or a second group serving the same
    /// process lost the jobs the first was handed (a group name has no `/`).
    pub fn work_id(&self) -> String {
        format!("{}/{}", self.group, self.id())
    }

    /// The first value of header `name` (names compared ASCII-case-blind).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The record as stored.
    pub fn encode(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::MalformedJob(e.to_string()))
    }

    /// A stored record; refuses other versions and a process id that is not one.
    pub fn decode(bytes: &[u8]) -> Result<Job> {
        let job: Job =
            rmp_serde::from_slice(bytes).map_err(|e| Error::MalformedJob(e.to_string()))?;
        if job.v != JOB_VERSION {
            return Err(Error::MalformedJob(format!("version {}", job.v)));
        }
        ProcessId::new(job.process.clone()).map_err(|e| Error::MalformedJob(e.to_string()))?;
        Ok(job)
    }
}

/// Work-message header a feeder sets on a job it may be handing out again (it resumed
/// from a checkpoint and the job's log message was there when it started): the
/// instance reads the job's history before it runs it, as for a redelivery.
pub const REFED: &str = "Ts-Refed";

/// `<process>:<slot>`.
pub fn job_id(process: &str, slot: u64) -> String {
    format!("{process}:{slot}")
}

/// The partition of a group's work that `process`'s jobs go to: the first four bytes
/// of blake3("turnstile/work/v1" ‖ process), big-endian, modulo `partitions`.
pub fn partition_of(process: &str, partitions: u32) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(b"turnstile/work/v1");
    h.update(process.as_bytes());
    let d = h.finalize();
    let b = d.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % partitions.max(1)
}

/// What became of a job (one event of its history in the results stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The handler finished it.
    Done,
    /// An attempt failed; it will be tried again (`attempt` says which failed).
    Failed,
    /// It failed for good (attempts used up, or a failure that is not retried).
    Dead,
    /// Cancelled before or while it ran.
    Cancelled,
    /// Merged into a newer job with the same merge key (dropbox buffer).
    Merged,
}

impl State {
    /// Whether nothing more happens to the job after this.
    pub fn is_final(self) -> bool {
        !matches!(self, State::Failed)
    }
}

/// One event of a job's history, JSON on `<prefix>.result.<group>.<process>.<slot>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultEvent {
    /// [`RESULT_VERSION`].
    pub v: u8,
    /// The worker group.
    pub group: String,
    /// The process.
    pub process: String,
    /// The slot.
    pub slot: u64,
    /// The message id.
    pub message_id: String,
    /// What became of it.
    pub state: State,
    /// Which attempt this was (1 = the first).
    pub attempt: u32,
    /// When (ms since the epoch, the instance's clock).
    pub at_ms: u64,
    /// When the scheduler assigned the job (its timestamp in the log).
    pub scheduled_ms: u64,
    /// When this attempt started (ms, the instance's clock); none if it did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// The instance that recorded it.
    pub instance: String,
    /// How long the attempt ran (ms); none if it did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why (a failure's reason, a cancellation's origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The slot of the job this one was merged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<u64>,
}

impl ResultEvent {
    /// An event of `job`.
    pub fn of(job: &Job, state: State, attempt: u32, at_ms: u64, instance: &str) -> ResultEvent {
        ResultEvent {
            v: RESULT_VERSION,
            group: job.group.clone(),
            process: job.process.clone(),
            slot: job.slot,
            message_id: job.message_id.clone(),
            state,
            attempt,
            at_ms,
            scheduled_ms: job.timestamp_ms,
            started_ms: None,
            instance: instance.to_string(),
            duration_ms: None,
            reason: None,
            merged_into: None,
        }
    }

    /// Its `Nats-Msg-Id` in the results stream:
    /// `<group>/<process>:<slot>:<attempt>:<state>` (one event per attempt and state;
    /// the results stream is shared by every group, so the group is in the id).
    pub fn msg_id(&self) -> String {
        format!(
            "{}/{}:{}:{}:{:?}",
            self.group, self.process, self.slot, self.attempt, self.state
        )
    }
}

/// A run of the log the feeder refused to hand out (JSON on
/// `<prefix>.result.<group>.<process>.fault`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// The worker group.
    pub group: String,
    /// The process.
    pub process: String,
    /// Stream sequence of the message in the log.
    pub log_seq: u64,
    /// The fault's code (schemas/chain.md).
    pub code: String,
    /// What is wrong.
    pub detail: String,
    /// Whether the run is genuine but the log lost something before it (its jobs are
    /// handed out) rather than foreign (never a job).
    pub handed_out: bool,
}

impl FaultEvent {
    /// Its `Nats-Msg-Id` in the results stream:
    /// `<group>/fault:<process>:<log seq>:<code>` (one log message may have two faults:
    /// a run after a loss is `lost` and `gap`).
    pub fn msg_id(&self) -> String {
        format!(
            "{}/fault:{}:{}:{}",
            self.group, self.process, self.log_seq, self.code
        )
    }
}

/// The delay before attempt `attempt + 1` after attempt `attempt` failed: `initial`
/// doubled per attempt, at most `max`.
pub fn backoff(attempt: u32, initial_ms: u64, max_ms: u64) -> u64 {
    let shift = attempt.saturating_sub(1).min(30);
    initial_ms.saturating_mul(1u64 << shift).min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Hash32;

    fn entry(slot: u64) -> Entry {
        Entry {
            slot,
            message_id: format!("m{slot}"),
            timestamp_ms: 1_700_000_000_000,
            headers: vec![("Merge-Key".into(), "k".into())],
            body: b"hello".to_vec(),
            prev_hash: Hash32::ZERO,
            chain_hash: Hash32([7; 32]),
        }
    }

    #[test]
    fn a_job_round_trips_and_names_its_place() {
        let p = ProcessId::new("p-1").unwrap();
        let job = Job::of_entry("g", &p, 42, &entry(3));
        assert_eq!(job.id(), "p-1:3");
        assert_eq!(job.work_id(), "g/p-1:3");
        let ev = ResultEvent::of(&job, State::Done, 2, 0, "i");
        assert_eq!(ev.msg_id(), "g/p-1:3:2:Done");
        let fault = |code: &str| FaultEvent {
            group: "g".into(),
            process: "p-1".into(),
            log_seq: 9,
            code: code.into(),
            detail: String::new(),
            handed_out: true,
        };
        assert_eq!(fault("lost").msg_id(), "g/fault:p-1:9:lost");
        assert_ne!(fault("lost").msg_id(), fault("gap").msg_id());
        assert_eq!(job.header("merge-key"), Some("k"));
        let back = Job::decode(&job.encode().unwrap()).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.chain_hash, hex::encode([7u8; 32]));
    }

    #[test]
    fn a_job_of_another_version_or_a_bad_process_is_refused() {
        let p = ProcessId::new("p").unwrap();
        let mut job = Job::of_entry("g", &p, 1, &entry(0));
        job.v = 9;
        assert!(Job::decode(&job.encode().unwrap()).is_err());
        job.v = JOB_VERSION;
        job.process = "a.b".into();
        assert!(Job::decode(&job.encode().unwrap()).is_err());
        assert!(Job::decode(b"\xc1garbage").is_err());
        assert!(Job::decode(b"").is_err());
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for i in 0..1000 {
            let p = format!("proc-{i}");
            let n = partition_of(&p, PARTITIONS);
            assert!(n < PARTITIONS);
            assert_eq!(n, partition_of(&p, PARTITIONS));
        }
        // Spread: every partition gets some of 1000 processes.
        let used: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("proc-{i}"), PARTITIONS))
            .collect();
        assert_eq!(used.len(), PARTITIONS as usize);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1, 100, 10_000), 100);
        assert_eq!(backoff(2, 100, 10_000), 200);
        assert_eq!(backoff(5, 100, 10_000), 1_600);
        assert_eq!(backoff(40, 100, 10_000), 10_000);
    }

    #[test]
    fn only_failed_is_not_final() {
        assert!(!State::Failed.is_final());
        for s in [State::Done, State::Dead, State::Cancelled, State::Merged] {
            assert!(s.is_final());
        }
    }
}
