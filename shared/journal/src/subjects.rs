//! Every subject, stream, bucket and header name turnstile uses. Nothing else in
//! the workspace formats a subject string.
//!
//! With the default prefix `ts`:
//!
//! | what | subject / name |
//! |---|---|
//! | schedule a message (request) | `ts.schedule.<process>` |
//! | current slot (request) | `ts.slot.<process>` |
//! | one page of a range (request) | `ts.range.<process>` |
//! | published keys (request) | `ts.keys` |
//! | the assignment log, one run a message | `ts.log.<process>` in stream `TS_LOG` |
//! | per-process settings | KV bucket `TS_PROCESSES` |
//! | published public keys | KV bucket `TS_KEYS` |
//! | alarm requests (set, cancel, get, list) | `ts.alarm.<op>` |
//! | an alarm's history, one event a message | `ts.alarms.rec.<id>` in stream `TS_ALARMS` |
//! | an alarm's place in time (the due index) | `ts.alarms.due.<partition>.<bucket>.<id>` in `TS_ALARMS` |
//! | a partition's last bucket known empty | `ts.alarms.swept.<partition>` in `TS_ALARMS` |
//! | alarms that failed for good | `ts.alarms.dead` (stored in `TS_ALARMS`) |
//! | cron-job requests (add, delete, activate, deactivate, get, list) | `ts.cron.<op>` |
//! | a cron job (definition) and its last planned tick | `ts.alarms.cron.<partition>.<job>`, `ts.alarms.crontick.<partition>.<job>` in `TS_ALARMS` |
//! | queue-key holds (a queued job's key) | KV bucket `TS_QUEUE_KEYS`: keys `<process>.<hash of the key>` |
//! | cluster-wide ownership (leases) | KV bucket `TS_OWNERSHIP`: keys `<group>.m.<member>`, `<group>.p.<partition>` |
//! | execution keys (leases on named locks) | KV bucket `TS_EXEC_KEYS`: key `x<hex of BLAKE3(tag ‖ key)>` |

use protocol::ProcessId;

/// Request header: the client's message id (the NATS-wide idempotency header).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Request header: the confirmation mode.
pub const MODE: &str = "Ts-Mode";
/// Request header: the request's queue key (refused `queue_key_held` while a job of
/// the process with that key has not started). Stored in the entry.
pub const QUEUE_KEY: &str = "Ts-Queue-Key";
/// Entry header the scheduler adds beside [`QUEUE_KEY`]: the hold's token (the
/// revision of its create in the queue-keys bucket); a request may not carry it.
pub const QUEUE_HOLD: &str = "Ts-Queue-Hold";
/// Request (and stored message) header: the job's execution key — jobs with the same
/// key never run at the same time anywhere in the cluster (schemas/workers.md). Stored
/// with the message as the request carried it.
pub const EXECUTION_KEY: &str = "Ts-Execution-Key";
/// Longest execution key (bytes).
pub const MAX_EXECUTION_KEY: usize = 256;
/// Reply header: the error code of a refused request.
pub const ERROR: &str = "Ts-Error";
/// Services-API reply header: the error message.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Services-API reply header: the HTTP-like error status.
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// Log header: first slot of the run.
pub const FIRST_SLOT: &str = "Ts-First-Slot";
/// Log header: last slot of the run.
pub const LAST_SLOT: &str = "Ts-Last-Slot";
/// Log header: hex chain hash of the run's last slot.
pub const HEAD: &str = "Ts-Head";
/// Log header: timestamp (ms) of the run's last slot.
pub const TIME: &str = "Ts-Time";
/// Log header: the client-supplied message ids of the run, base64 of MessagePack
/// `[[slot, id], ...]`; absent when the run has none.
pub const IDS: &str = "Ts-Ids";

/// KV header: the operation of a bucket write (`DEL`, `PURGE`; absent: a put).
pub const KV_OPERATION: &str = "KV-Operation";
/// KV operation: a delete marker.
pub const KV_DELETE: &str = "DEL";

/// Headers a scheduler never stores as part of a message (they steer the request).
pub fn is_control_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower.starts_with("ts-")
}

/// The names derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects {
            prefix: "ts".into(),
        }
    }
}

impl Subjects {
    /// Names under `prefix`: one or more tokens of `a-z 0-9 -` joined by dots. Streams
    /// and buckets are named by the prefix upper-cased, dots turned into `_`: with
    /// neither capitals nor `_` in a prefix, two prefixes never name the same stream
    /// (`acme.prod`, `acme_prod`, `ACME.PROD` once all named `ACME_PROD_LOG`, and a
    /// second deployment opened the first's streams and buckets as its own).
    pub fn new(prefix: &str) -> Result<Subjects, protocol::Error> {
        // Two names end in two tokens (`_QUEUE_KEYS`, `_EXEC_KEYS`): a prefix ending in
        // `queue` or `exec` would name another prefix's `_KEYS` bucket as its own.
        let ok = !prefix.is_empty()
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
            && !prefix
                .rsplit('.')
                .next()
                .is_some_and(|last| last == "queue" || last == "exec");
        if ok {
            Ok(Subjects {
                prefix: prefix.to_string(),
            })
        } else {
            Err(protocol::Error::InvalidProcess(format!(
                "prefix {prefix:?}: tokens of a-z 0-9 - joined by dots, the last not queue or exec"
            )))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.schedule.<process>`.
    pub fn schedule(&self, p: &ProcessId) -> String {
        format!("{}.schedule.{p}", self.prefix)
    }
    /// `<prefix>.slot.<process>`.
    pub fn slot(&self, p: &ProcessId) -> String {
        format!("{}.slot.{p}", self.prefix)
    }
    /// `<prefix>.range.<process>`.
    pub fn range(&self, p: &ProcessId) -> String {
        format!("{}.range.{p}", self.prefix)
    }
    /// `<prefix>.keys`.
    pub fn keys(&self) -> String {
        format!("{}.keys", self.prefix)
    }
    /// The services-API group: `<prefix>`; endpoints are `schedule.>`, `slot.>`, ...
    /// so the catch-all subjects below are what the scheduler listens on.
    pub fn schedule_all(&self) -> String {
        format!("{}.schedule.>", self.prefix)
    }
    /// `<prefix>.slot.>`.
    pub fn slot_all(&self) -> String {
        format!("{}.slot.>", self.prefix)
    }
    /// `<prefix>.range.>`.
    pub fn range_all(&self) -> String {
        format!("{}.range.>", self.prefix)
    }
    /// `<prefix>.log.<process>`: the subject of a process's runs.
    pub fn log(&self, p: &ProcessId) -> String {
        format!("{}.log.{p}", self.prefix)
    }
    /// `<prefix>.log.*`: every process's runs (the stream's subject).
    pub fn log_all(&self) -> String {
        format!("{}.log.*", self.prefix)
    }
    /// `<prefix>.events.fault`: a fault found in the log (JSON, schemas/subjects.md).
    pub fn fault_events(&self) -> String {
        format!("{}.events.fault", self.prefix)
    }
    /// The process of a log subject `<prefix>.log.<process>`.
    pub fn process_of_log(&self, subject: &str) -> Option<ProcessId> {
        self.process_of("log", subject).ok()
    }

    /// Whether a reply subject lies inside the deployment's own space or the server's
    /// (`<prefix>.>` and every subject starting with `$`: `$JS`, `$KV`, `$O`, `$SRV`,
    /// `$SYS`, ...). A service never answers there: the answer would be published
    /// with the service's rights, not the requester's (a confused deputy).
    pub fn is_reserved_reply(&self, reply: &str) -> bool {
        reply.starts_with('$')
            || reply == self.prefix
            || reply
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    }

    /// The process token of a request subject `<prefix>.<kind>.<rest>`; the rest must
    /// be exactly one valid process token.
    pub fn process_of(&self, kind: &str, subject: &str) -> Result<ProcessId, protocol::Error> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.strip_prefix(kind))
            .and_then(|s| s.strip_prefix('.'))
            .ok_or_else(|| protocol::Error::InvalidProcess(subject.to_string()))?;
        ProcessId::new(rest)
    }

    /// `<prefix>.alarm.<op>`: an alarm request (`set`, `cancel`, `get`, `list`).
    pub fn alarm_request(&self, op: &str) -> String {
        format!("{}.alarm.{op}", self.prefix)
    }
    /// `<prefix>.alarm.*`: every alarm request (the alarm-loader's endpoint).
    pub fn alarm_requests(&self) -> String {
        format!("{}.alarm.*", self.prefix)
    }
    /// `<prefix>.alarms.rec.<id>`: an alarm's history (its last event is its state).
    pub fn alarm_record(&self, id: &str) -> String {
        format!("{}.alarms.rec.{id}", self.prefix)
    }
    /// `<prefix>.alarms.due.<partition>.<bucket>.<id>`: an alarm's entry in the due
    /// index (one subject per alarm and bucket; a window reads only its buckets).
    pub fn alarm_due(&self, partition: u32, bucket: u64, id: &str) -> String {
        format!("{}.alarms.due.{partition}.{bucket}.{id}", self.prefix)
    }
    /// The partition token of due-index subject `subject`, if it is one.
    pub fn due_partition(&self, subject: &str) -> Option<u32> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".alarms.due.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }
    /// `<prefix>.alarms.due.<partition>.<bucket>.*`: one bucket of one partition.
    pub fn alarm_due_bucket(&self, partition: u32, bucket: u64) -> String {
        format!("{}.alarms.due.{partition}.{bucket}.*", self.prefix)
    }
    /// `<prefix>.cron.<op>`: a cron-job request (`add`, `delete`, `activate`,
    /// `deactivate`, `get`, `list`).
    pub fn cron_request(&self, op: &str) -> String {
        format!("{}.cron.{op}", self.prefix)
    }
    /// `<prefix>.cron.*`: every cron-job request (the alarm-loader's endpoint).
    pub fn cron_requests(&self) -> String {
        format!("{}.cron.*", self.prefix)
    }
    /// `<prefix>.alarms.cron.<partition>.<job>`: a cron job's definition (the last
    /// message is the job; a deleted job's is a tombstone).
    pub fn cron_job(&self, partition: u32, job: &str) -> String {
        format!("{}.alarms.cron.{partition}.{job}", self.prefix)
    }
    /// `<prefix>.alarms.cron.<partition>.*`: the jobs of one partition.
    pub fn cron_jobs(&self, partition: u32) -> String {
        format!("{}.alarms.cron.{partition}.*", self.prefix)
    }
    /// `<prefix>.alarms.crontick.<partition>.<job>`: the last tick of a job made into
    /// an alarm.
    pub fn cron_tick(&self, partition: u32, job: &str) -> String {
        format!("{}.alarms.crontick.{partition}.{job}", self.prefix)
    }
    /// `<prefix>.alarms.swept.<partition>`: the last bucket of a partition known empty.
    pub fn alarm_swept(&self, partition: u32) -> String {
        format!("{}.alarms.swept.{partition}", self.prefix)
    }
    /// `<prefix>.alarms.firing-key`: the alarm-loaders' shared secret for firing ids.
    pub fn alarm_firing_key(&self) -> String {
        format!("{}.alarms.firing-key", self.prefix)
    }
    /// `<prefix>.alarms.>`: the alarm stream's subjects.
    pub fn alarms_all(&self) -> String {
        format!("{}.alarms.>", self.prefix)
    }
    /// `<prefix>.alarms.dead`: where an alarm that failed for good is announced.
    pub fn alarm_dead(&self) -> String {
        format!("{}.alarms.dead", self.prefix)
    }
    /// The id token of an alarm record subject `<prefix>.alarms.rec.<id>`.
    pub fn alarm_of_record<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".alarms.rec.")
            .filter(|id| !id.is_empty() && !id.contains('.'))
    }

    /// `<prefix>.work.<group>.<partition>`: the jobs a group's feeder hands out (one
    /// message per assignment; the job names its process), in the work stream. Not a
    /// subject per process: a consumer's next message is found by matching its filter
    /// against the subjects of a message block, so a subject per process made every
    /// delivery cost a walk over every process of the block (ARCHITECTURE.md "Workers").
    pub fn work(&self, group: &str, partition: u32) -> String {
        format!("{}.work.{group}.{partition}", self.prefix)
    }
    /// `<prefix>.work.<group>.>`: every job of a group.
    pub fn work_group(&self, group: &str) -> String {
        format!("{}.work.{group}.>", self.prefix)
    }
    /// `<prefix>.work.>`: the work stream's subjects.
    pub fn work_all(&self) -> String {
        format!("{}.work.>", self.prefix)
    }
    /// `<prefix>.result.<group>.<process>.<slot>`: the history of one job in a group
    /// (every outcome an event).
    pub fn result(&self, group: &str, p: &ProcessId, slot: u64) -> String {
        format!("{}.result.{group}.{p}.{slot}", self.prefix)
    }
    /// `<prefix>.result.<group>.<process>.*`: every job history of a process in a group.
    pub fn results_of(&self, group: &str, p: &ProcessId) -> String {
        format!("{}.result.{group}.{p}.*", self.prefix)
    }
    /// `<prefix>.result.<group>.<process>.fault`: a run of the process's log that did
    /// not verify (never a job), as the group's feeder met it.
    pub fn result_fault(&self, group: &str, p: &ProcessId) -> String {
        format!("{}.result.{group}.{p}.fault", self.prefix)
    }
    /// `<prefix>.result.>`: the results stream's subjects.
    pub fn results_all(&self) -> String {
        format!("{}.result.>", self.prefix)
    }
    /// `<prefix>.worker.dead.<group>`: where a job that failed for good is announced.
    pub fn worker_dead(&self, group: &str) -> String {
        format!("{}.worker.dead.{group}", self.prefix)
    }
    /// `<prefix>.worker.inspect.<instance>`: one worker instance's introspection.
    pub fn worker_inspect(&self, instance: &str) -> String {
        format!("{}.worker.inspect.{instance}", self.prefix)
    }
    /// The work stream: `<PREFIX>_WORK`.
    pub fn work_stream(&self) -> String {
        format!("{}_WORK", self.upper())
    }
    /// The results stream: `<PREFIX>_RESULTS`.
    pub fn results_stream(&self) -> String {
        format!("{}_RESULTS", self.upper())
    }
    /// The workers' bucket (feeder checkpoints, job control): `<PREFIX>_WORKERS`.
    pub fn workers_bucket(&self) -> String {
        format!("{}_WORKERS", self.upper())
    }

    fn upper(&self) -> String {
        self.prefix.to_ascii_uppercase().replace('.', "_")
    }
    /// The log stream: `<PREFIX>_LOG`.
    pub fn log_stream(&self) -> String {
        format!("{}_LOG", self.upper())
    }
    /// The per-process settings bucket: `<PREFIX>_PROCESSES`.
    pub fn processes_bucket(&self) -> String {
        format!("{}_PROCESSES", self.upper())
    }
    /// The public-keys bucket: `<PREFIX>_KEYS`.
    pub fn keys_bucket(&self) -> String {
        format!("{}_KEYS", self.upper())
    }
    /// The alarm stream: `<PREFIX>_ALARMS`.
    pub fn alarms_stream(&self) -> String {
        format!("{}_ALARMS", self.upper())
    }
    /// `$JS.API.DIRECT.GET.<stream>`: a stream's direct-get API (several messages at
    /// once with `multi_last`, ADR-31).
    pub fn direct_get(&self, stream: &str) -> String {
        format!("$JS.API.DIRECT.GET.{stream}")
    }
    /// The queue-keys bucket (holds of queued jobs' keys): `<PREFIX>_QUEUE_KEYS`.
    pub fn queue_keys_bucket(&self) -> String {
        format!("{}_QUEUE_KEYS", self.upper())
    }
    /// The ownership bucket (leases of every group): `<PREFIX>_OWNERSHIP`.
    pub fn ownership_bucket(&self) -> String {
        format!("{}_OWNERSHIP", self.upper())
    }
    /// The execution keys' bucket (a lease per key held): `<PREFIX>_EXEC_KEYS`.
    pub fn exec_keys_bucket(&self) -> String {
        format!("{}_EXEC_KEYS", self.upper())
    }
}

/// Whether `key` is a valid execution key: 1–[`MAX_EXECUTION_KEY`] bytes, no control
/// characters (it travels in a NATS header and in a bucket record).
pub fn is_execution_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_EXECUTION_KEY && !key.chars().any(char::is_control)
}

/// The bucket key of execution key `key`: `x` and the hex of the first 16 bytes of
/// BLAKE3(`"turnstile/exec-key/v1"` ‖ key) (any bytes of a key become one valid KV token).
pub fn exec_key_name(key: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"turnstile/exec-key/v1");
    h.update(key.as_bytes());
    let d = h.finalize();
    format!("x{}", hex::encode(&d.as_bytes()[..16]))
}

/// Whether `name` may be an ownership group or member id: one token of
/// `A-Z a-z 0-9 - _`, at most 64 bytes (it becomes part of a KV key).
pub fn is_ownership_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The ownership bucket's key of `member` in `group`: `<group>.m.<member>`.
pub fn ownership_member_key(group: &str, member: &str) -> String {
    format!("{group}.m.{member}")
}

/// The ownership bucket's key of `partition` of `group`: `<group>.p.<partition>`.
pub fn ownership_partition_key(group: &str, partition: u32) -> String {
    format!("{group}.p.{partition}")
}

/// Every key of `group` in the ownership bucket: `<group>.>`.
pub fn ownership_group_keys(group: &str) -> String {
    format!("{group}.>")
}

/// A key of the ownership bucket, parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnershipKey {
    /// `<group>.m.<member>`.
    Member(String),
    /// `<group>.p.<partition>`.
    Partition(u32),
}

/// Parses a key of `group` (`None`: another group's, or not ours at all).
pub fn parse_ownership_key(group: &str, key: &str) -> Option<OwnershipKey> {
    let rest = key.strip_prefix(group)?.strip_prefix('.')?;
    if let Some(m) = rest.strip_prefix("m.") {
        return is_ownership_token(m).then(|| OwnershipKey::Member(m.to_string()));
    }
    let p = rest.strip_prefix("p.")?;
    if p.starts_with('+') || (p.len() > 1 && p.starts_with('0')) {
        return None;
    }
    p.parse().ok().map(OwnershipKey::Partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix_and_requests_parse_back() {
        let s = Subjects::default();
        let p = ProcessId::new("p-1").unwrap();
        assert_eq!(s.schedule(&p), "ts.schedule.p-1");
        assert_eq!(s.log(&p), "ts.log.p-1");
        assert_eq!(s.log_stream(), "TS_LOG");
        assert_eq!(s.process_of("schedule", "ts.schedule.p-1").unwrap(), p);
        for bad in [
            "ts.schedule.a.b",
            "ts.schedule.",
            "ts.slot.p",
            "xx.schedule.p",
            "ts.schedule",
        ] {
            assert!(s.process_of("schedule", bad).is_err(), "{bad}");
        }
        let t = Subjects::new("acme.prod").unwrap();
        assert_eq!(t.log_stream(), "ACME_PROD_LOG");
        assert_eq!(t.slot(&p), "acme.prod.slot.p-1");
        assert!(Subjects::new("a..b").is_err() && Subjects::new("a.*").is_err());
        // Two prefixes never name the same streams and buckets.
        assert_eq!(
            Subjects::new("acme-prod").unwrap().log_stream(),
            "ACME-PROD_LOG"
        );
        assert_eq!(
            Subjects::new("acme").unwrap().queue_keys_bucket(),
            "ACME_QUEUE_KEYS"
        );
        for taken in [
            "acme_prod",
            "ACME.PROD",
            "Acme.prod",
            "acme.queue",
            "acme.exec",
        ] {
            assert!(Subjects::new(taken).is_err(), "{taken}");
        }
    }

    #[test]
    fn replies_into_our_own_space_are_reserved() {
        let s = Subjects::new("ts").unwrap();
        for r in [
            "ts.log.V",
            "ts",
            "ts.schedule.x",
            "$KV.TS_PROCESSES.C",
            "$JS.API.STREAM.DELETE.TS_LOG",
            "$SRV.PING",
            "$SYS.REQ.SERVER.PING",
            "$O.b.c",
        ] {
            assert!(s.is_reserved_reply(r), "{r}");
        }
        for r in ["_INBOX.abc.1", "tsx.log.V", "my.reply", "ts_reply"] {
            assert!(!s.is_reserved_reply(r), "{r}");
        }
    }

    #[test]
    fn execution_keys_are_checked_and_named_by_their_hash() {
        assert!(is_execution_key("invoice-42") && is_execution_key(&"k".repeat(256)));
        assert!(!is_execution_key("") && !is_execution_key(&"k".repeat(257)));
        assert!(!is_execution_key("a\nb") && !is_execution_key("a\u{7f}"));
        let a = exec_key_name("invoice-42");
        assert_eq!(a.len(), 33);
        assert!(a.starts_with('x') && a[1..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, exec_key_name("invoice-42"));
        assert_ne!(a, exec_key_name("Invoice-42"));
        assert_ne!(exec_key_name("a.b"), exec_key_name("a.c"));
        assert_eq!(Subjects::default().exec_keys_bucket(), "TS_EXEC_KEYS");
    }

    #[test]
    fn ownership_keys_round_trip() {
        assert_eq!(Subjects::default().ownership_bucket(), "TS_OWNERSHIP");
        let m = ownership_member_key("alarm-loader", "host-1_a");
        assert_eq!(m, "alarm-loader.m.host-1_a");
        assert_eq!(
            parse_ownership_key("alarm-loader", &m),
            Some(OwnershipKey::Member("host-1_a".into()))
        );
        let p = ownership_partition_key("alarm-loader", 31);
        assert_eq!(p, "alarm-loader.p.31");
        assert_eq!(
            parse_ownership_key("alarm-loader", &p),
            Some(OwnershipKey::Partition(31))
        );
        for other in [
            "alarm.m.x",
            "alarm-loader-2.p.1",
            "alarm-loader.p.01",
            "alarm-loader.p.+1",
            "alarm-loader.p.x",
            "alarm-loader.q.1",
            "alarm-loader.m.a.b",
        ] {
            assert_eq!(parse_ownership_key("alarm-loader", other), None, "{other}");
        }
        assert!(is_ownership_token("scheduler") && !is_ownership_token("a.b"));
        assert!(!is_ownership_token("") && !is_ownership_token(&"x".repeat(65)));
    }

    #[test]
    fn control_headers_are_recognised_case_blind() {
        assert!(is_control_header("Nats-Msg-Id") && is_control_header("ts-mode"));
        assert!(!is_control_header("content-type"));
    }
}
