//! The stream `<PREFIX>_ALARMS`: what is stored where (schemas/alarms.md).
//!
//! - `<prefix>.alarms.rec.<id>`: the alarm's history, one [`Record`] a message; every
//!   write expects the subject's last sequence (compare-and-set), so one change wins.
//! - `<prefix>.alarms.due.<partition>.<bucket>.<id>`: the due index, a small
//!   [`DueEntry`] per alarm in the bucket of its next action. A window load reads only
//!   its buckets' subjects. An entry is a hint: the record decides. It is written
//!   before the record that needs it and purged after the record that no longer does,
//!   so a crash in between leaves an extra entry (ignored), never a missing one.
//! - `<prefix>.alarms.swept.<partition>`: the last bucket of a partition whose entries
//!   are all gone: a loader that takes a partition over loads from the one after it,
//!   so alarms due while every loader was down fire on recovery.
//!
//! Anyone allowed to publish on an alarm's subject can append anything there, so what
//! an alarm's history *is* is a rule (schemas/alarms.md, "Reading a history"): a
//! message is one of its records when it was written in its place (its
//! `Nats-Expected-Last-Subject-Sequence`, which every genuine write carries and
//! JetStream checked, names the message before it on the subject) and decodes as a
//! record of that very alarm. Anything else (garbage, another alarm's record, a replay)
//! is foreign: reported, skipped, never the state. Due-index entries are hints that
//! must agree with their subject; those that do not are removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use journal::subjects::Subjects;

use crate::alarm::{bucket_of, partition_of, Record};
use crate::jobs::{Planned, StoredJob};
use crate::{Error, Result};

/// Filter subjects one ordered consumer reads at once.
const FILTERS_PER_READ: usize = 256;

/// Records one batch read names: nats-server answers at most 1,024 subjects a
/// multi-last request (and stops at its pending-bytes limit; what it leaves out is read
/// alone when needed).
const RECORDS_PER_BATCH: usize = 512;

/// How many bytes one batch read asks the server for at most (it stops after the
/// message that reaches it; those left out are read alone when they fire).
const BATCH_READ_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Settled due entries removed at once (each a purge by its own subject, through
/// the JetStream API).
const REMOVALS_AT_ONCE: usize = 32;

/// How long one read of the stream may take.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// What a load read: the entries, and each message that is no entry (its subject and
/// stream sequence).
pub type Checked = (Vec<DueEntry>, Vec<(String, u64)>);

/// An entry of the due index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueEntry {
    /// The alarm.
    pub id: String,
    /// When its next action is due (ms).
    pub at_ms: u64,
    /// When the entry was written (ms, the writer's clock): a young entry that its
    /// record does not account for yet may precede that record.
    #[serde(default)]
    pub written_ms: u64,
    /// The entry's stream sequence (known once read; not stored).
    #[serde(skip)]
    pub seq: u64,
}

/// The header of a write's compare-and-set (JetStream checks it and stores it).
const EXPECTED: &str = "Nats-Expected-Last-Subject-Sequence";

/// A message on an alarm's subject that is not one of its records: skipped, reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Foreign {
    /// Its stream sequence.
    pub seq: u64,
    /// Why it is no record of the alarm.
    pub reason: String,
}

/// An alarm's subject as read by the rule.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// The alarm's last record (its state) and that record's stream sequence.
    pub record: Option<(Record, u64)>,
    /// The subject's last stream sequence, whatever is stored there: what the next
    /// write expects (0: nothing).
    pub last_seq: u64,
    /// The foreign messages met on the way.
    pub foreign: Vec<Foreign>,
}

/// One stored message, read raw.
#[derive(Debug)]
struct Raw {
    seq: u64,
    /// The sequence its expectation header names, when its header block is exactly a
    /// genuine write's (that one header); none otherwise.
    exact_claim: Option<u64>,
    payload: bytes::Bytes,
}

/// The alarm stream.
#[derive(Debug, Clone)]
pub struct Store {
    js: jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
    /// Foreign messages met on alarm subjects, each time one is read past.
    foreign: Arc<AtomicU64>,
    /// Due-index entries removed because they contradicted their subject or did not
    /// decode.
    bad_entries: Arc<AtomicU64>,
    /// The deployment's firing key.
    firing_key: crate::alarm::FiringKey,
}

impl Store {
    /// Opens (creating it if missing) the alarm stream, and reads (or makes) the
    /// deployment's firing key in it.
    pub async fn open(
        js: jetstream::Context,
        subjects: Subjects,
        options: &journal::setup::LogOptions,
    ) -> Result<Store> {
        let stream = journal::setup::ensure_alarms(&js, &subjects, options).await?;
        let key = journal::setup::ensure_firing_key(&js, &stream, &subjects, options).await?;
        Ok(Store {
            js,
            stream,
            subjects,
            foreign: Arc::default(),
            bad_entries: Arc::default(),
            firing_key: crate::alarm::FiringKey::new(key),
        })
    }

    /// The deployment's firing key (firing ids are made with it).
    pub fn firing_key(&self) -> &crate::alarm::FiringKey {
        &self.firing_key
    }

    /// Its counters: foreign messages met on alarm subjects (each time a read passes
    /// one), and due-index entries removed because they were not entries.
    pub fn counters(&self) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        (Arc::clone(&self.foreign), Arc::clone(&self.bad_entries))
    }

    /// The subjects in use.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// When the stream's first message was stored (ms), if it holds any.
    pub async fn first_timestamp_ms(&self) -> Result<Option<u64>> {
        let mut s = self.stream.clone();
        let info = s
            .info()
            .await
            .map_err(|e| Error::js("alarm stream info", e))?;
        if info.state.messages == 0 {
            return Ok(None);
        }
        let ns = info.state.first_timestamp.unix_timestamp_nanos();
        Ok(u64::try_from(ns / 1_000_000).ok())
    }

    /// The alarm's state (its last record) and the sequence the next write must
    /// expect (the subject's last, which may be a foreign message after the record);
    /// none if the alarm has no record.
    pub async fn read(&self, id: &str) -> Result<Option<(Record, u64)>> {
        let c = self.current(id).await?;
        Ok(c.record.map(|(r, _)| (r, c.last_seq)))
    }

    /// The current records of `ids` whose subject is intact (its last message a genuine
    /// write of a record of that alarm, the fast path of [`Store::current`]), each with
    /// its sequence, read in batches (one direct get names up to [`RECORDS_PER_BATCH`]
    /// subjects). One the server left out of a batch, or that is not plainly genuine,
    /// is not returned: a caller reads it alone, by the whole rule. What this returns
    /// may be stale by the time it is used: only a compare-and-set against its
    /// sequence may act on it. A record of more than `max_bytes` (stored) is not kept
    /// either, before it is decoded: a batch of the largest records would otherwise
    /// be held whole (2,048 × 256 KiB bodies).
    pub async fn read_many(
        &self,
        ids: &[String],
        max_bytes: usize,
    ) -> Result<HashMap<String, (Record, u64)>> {
        let mut out = HashMap::with_capacity(ids.len());
        let client = self.js.client();
        let api = self.subjects.direct_get(&self.subjects.alarms_stream());
        for chunk in ids.chunks(RECORDS_PER_BATCH) {
            let subjects: Vec<String> = chunk
                .iter()
                .map(|id| self.subjects.alarm_record(id))
                .collect();
            // Bounded in bytes too: unbounded, the server sends up to its max_pending
            // (64 MB) for one request, and a batch of the largest records cut the
            // loader's connection as a slow consumer (every lease lost with it).
            let body = serde_json::to_vec(&serde_json::json!({
                "multi_last": subjects,
                "max_bytes": BATCH_READ_MAX_BYTES,
            }))
            .map_err(|e| Error::Invalid(e.to_string()))?;
            let inbox = client.new_inbox();
            let mut answers = client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| Error::js("batch read alarms", e))?;
            client
                .publish_with_reply(api.clone(), inbox, body.into())
                .await
                .map_err(|e| Error::js("batch read alarms", e))?;
            let read = tokio::time::timeout(READ_DEADLINE, async {
                while let Some(m) = answers.next().await {
                    if let Some(status) = m.status {
                        // 204: the end of the batch; 404: none has a record.
                        return match status.as_u16() {
                            204 | 404 => Ok(()),
                            code => Err(Error::JetStream {
                                op: "batch read alarms",
                                reason: format!(
                                    "{code} {}",
                                    m.description.as_deref().unwrap_or_default()
                                ),
                            }),
                        };
                    }
                    if m.payload.len() > max_bytes {
                        continue;
                    }
                    let Some((subject, seq)) = genuine_direct(&m) else {
                        continue;
                    };
                    let Some(id) = self.subjects.alarm_of_record(&subject) else {
                        continue;
                    };
                    if let Ok(r) = judge_body(&m.payload, id, &subject, seq) {
                        out.insert(id.to_string(), (r, seq));
                    }
                }
                Ok(())
            })
            .await;
            let _ = answers.unsubscribe().await;
            match read {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::JetStream {
                        op: "batch read alarms",
                        reason: format!("no end of batch within {READ_DEADLINE:?}"),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Alarm `id`'s subject read by the rule: on an intact subject one read (the last
    /// message, written by a genuine write, a record of `id`); otherwise the whole
    /// subject is read and judged, and the state is its last record.
    pub async fn current(&self, id: &str) -> Result<Current> {
        let subject = self.subjects.alarm_record(id);
        let request = serde_json::json!({ "last_by_subj": subject });
        let Some(last) = self.msg_get(&request, "read alarm").await? else {
            return Ok(Current::default());
        };
        if last.exact_claim.is_some_and(|e| e < last.seq) {
            if let Ok(record) = judge_body(&last.payload, id, &subject, last.seq) {
                return Ok(Current {
                    record: Some((record, last.seq)),
                    last_seq: last.seq,
                    foreign: Vec::new(),
                });
            }
        }
        // Boxed: the rare path would otherwise size every caller's future (a set's).
        let (records, foreign, last_seq) = Box::pin(self.judge_subject(id, usize::MAX)).await?;
        Ok(Current {
            record: records.into_iter().last(),
            last_seq: last_seq.max(last.seq),
            foreign,
        })
    }

    /// Alarm `id`'s subject read for a write that a compare-and-set on it follows (a
    /// set's replace): the last message by a direct get, which any replica may answer
    /// and which skips the JetStream API's queue. It may be stale; a stale read only
    /// makes that write fail its expectation (and a write that succeeds expected the
    /// very message read, so what was read was the state). A last message that is not
    /// plainly a record of `id` written in its place is read by the whole rule, from
    /// the leader ([`Store::current`]). Nothing that answers or decides without a
    /// compare-and-set may use this.
    pub async fn current_for_write(&self, id: &str) -> Result<Current> {
        /// Direct get's "no message".
        const NOT_FOUND: u16 = 404;
        let subject = self.subjects.alarm_record(id);
        let api = self.subjects.direct_get(&self.subjects.alarms_stream());
        let body = serde_json::to_vec(&serde_json::json!({ "last_by_subj": subject }))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let m = self
            .js
            .client()
            .request(api, body.into())
            .await
            .map_err(|e| Error::js("read alarm", e))?;
        match m.status.map(|s| s.as_u16()) {
            None => {}
            Some(NOT_FOUND) => return Ok(Current::default()),
            Some(code) => {
                return Err(Error::JetStream {
                    op: "read alarm",
                    reason: format!("{code} {}", m.description.as_deref().unwrap_or_default()),
                })
            }
        }
        if let Some((stored_on, seq)) = genuine_direct(&m) {
            if stored_on == subject {
                if let Ok(record) = judge_body(&m.payload, id, &subject, seq) {
                    return Ok(Current {
                        record: Some((record, seq)),
                        last_seq: seq,
                        foreign: Vec::new(),
                    });
                }
            }
        }
        self.current(id).await
    }

    /// Reads every message of alarm `id`'s subject (or until `limit` records) and
    /// judges each: its records (state after each, with its sequence), the foreign
    /// messages (each reported), and the last sequence read.
    async fn judge_subject(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<(Vec<(Record, u64)>, Vec<Foreign>, u64)> {
        let subject = self.subjects.alarm_record(id);
        let name = format!("tsa-{}", uuid::Uuid::new_v4().simple());
        let config = consumer::pull::OrderedConfig {
            name: Some(name.clone()),
            filter_subject: subject.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let result = tokio::time::timeout(READ_DEADLINE, async {
            let mut c = self
                .stream
                .create_consumer(config)
                .await
                .map_err(|e| Error::js("read alarm history", e))?;
            let pending = c
                .info()
                .await
                .map_err(|e| Error::js("read alarm history", e))?
                .num_pending;
            let (mut records, mut foreign) = (Vec::new(), Vec::new());
            let mut prev: Option<u64> = None;
            if pending == 0 {
                return Ok((records, foreign, 0));
            }
            let mut msgs = c
                .messages()
                .await
                .map_err(|e| Error::js("read alarm history", e))?;
            while let Some(m) = msgs.next().await {
                let m = m.map_err(|e| Error::js("read alarm history", e))?;
                let info = m.info().map_err(|e| Error::js("read alarm history", e))?;
                let (seq, left) = (info.stream_sequence, info.pending);
                match judge_message(&m, prev, id, &subject, seq) {
                    Ok(record) => records.push((record, seq)),
                    Err(reason) => {
                        self.report(&subject, seq, &reason);
                        foreign.push(Foreign { seq, reason });
                    }
                }
                prev = Some(seq);
                if left == 0 || records.len() >= limit {
                    break;
                }
            }
            Ok((records, foreign, prev.unwrap_or(0)))
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::JetStream {
                op: "read alarm history",
                reason: format!("no answer within {READ_DEADLINE:?}"),
            })
        });
        let _ = self.stream.delete_consumer(&name).await;
        result
    }

    /// Reports a foreign message (an error line, a counter).
    fn report(&self, subject: &str, seq: u64, reason: &str) {
        self.foreign.fetch_add(1, Ordering::Relaxed);
        let e = Error::BadRecord {
            subject: subject.to_string(),
            seq,
            reason: reason.to_string(),
        };
        tracing::error!(error = %e, "a foreign message on an alarm's history: skipped");
    }

    /// One `STREAM.MSG.GET` of the alarm stream (the leader: never stale), read raw: a
    /// stored message whose headers no library parses is still returned.
    async fn msg_get(&self, request: &serde_json::Value, op: &'static str) -> Result<Option<Raw>> {
        #[derive(Deserialize)]
        struct ApiMessage {
            seq: u64,
            #[serde(default)]
            hdrs: Option<String>,
            #[serde(default)]
            data: Option<String>,
        }
        #[derive(Deserialize)]
        struct ApiError {
            #[serde(default)]
            err_code: u64,
            #[serde(default)]
            description: String,
        }
        #[derive(Deserialize)]
        struct ApiAnswer {
            #[serde(default)]
            message: Option<ApiMessage>,
            #[serde(default)]
            error: Option<ApiError>,
        }
        /// JetStream's "no message found".
        const NO_MESSAGE_FOUND: u64 = 10037;
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let subject = format!("STREAM.MSG.GET.{}", self.subjects.alarms_stream());
        let answer: ApiAnswer = self
            .js
            .request(subject, request)
            .await
            .map_err(|e| Error::js(op, e))?;
        match (answer.message, answer.error) {
            (Some(m), _) => {
                let payload = b64
                    .decode(m.data.unwrap_or_default())
                    .map_err(|e| Error::js(op, e))?;
                let header = m.hdrs.and_then(|h| b64.decode(h).ok()).unwrap_or_default();
                Ok(Some(Raw {
                    seq: m.seq,
                    exact_claim: exact_claim(&header),
                    payload: payload.into(),
                }))
            }
            (None, Some(e)) if e.err_code == NO_MESSAGE_FOUND => Ok(None),
            (None, Some(e)) => Err(Error::js(
                op,
                format!("{} (error {})", e.description, e.err_code),
            )),
            (None, None) => Err(Error::js(op, "an answer with neither message nor error")),
        }
    }

    /// The last message of `subject` as JSON `T` if a genuine write stored it (its
    /// header block is exactly a compare-and-set's, which JetStream checked: it was
    /// written in its place) and it decodes; otherwise why not (reported). With its
    /// sequence either way (the next write expects it).
    async fn last_genuine<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        op: &'static str,
    ) -> Result<Option<(std::result::Result<T, String>, u64)>> {
        let request = serde_json::json!({ "last_by_subj": subject });
        let Some(last) = self.msg_get(&request, op).await? else {
            return Ok(None);
        };
        let judged = match last.exact_claim {
            Some(e) if e < last.seq => {
                serde_json::from_slice(&last.payload).map_err(|e| format!("does not decode: {e}"))
            }
            _ => Err(
                "written without a genuine write's expectation (a replay, or a foreign writer)"
                    .into(),
            ),
        };
        if let Err(reason) = &judged {
            self.report(subject, last.seq, reason);
        }
        Ok(Some((judged, last.seq)))
    }

    /// Publishes `payload` on `subject` if the subject's last sequence is still
    /// `expected` (0: none); its sequence, or [`Error::Conflict`] naming `what`.
    async fn put_expecting(
        &self,
        subject: String,
        payload: Vec<u8>,
        expected: u64,
        what: &str,
        op: &'static str,
    ) -> Result<u64> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .headers(HeaderMap::new())
            .expected_last_subject_sequence(expected);
        let ack = match self.js.send_publish(subject, publish).await {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(a) => Ok(a.sequence),
            Err(e) if journal::jserr::is_conflict(&e) => Err(Error::Conflict(what.to_string())),
            Err(e) => Err(Error::js(op, e)),
        }
    }

    /// A cron job as stored (a tombstone once deleted) and its sequence. A last message
    /// that no genuine write stored, that does not decode or that names another job
    /// is foreign: reported, and read as a tombstone (the job is no more; an add writes
    /// over it).
    pub async fn job(&self, name: &str) -> Result<Option<(StoredJob, u64)>> {
        let subject = self.subjects.cron_job(partition_of(name), name);
        let tombstone = StoredJob {
            v: 1,
            job: None,
            at_ms: 0,
        };
        Ok(
            match self
                .last_genuine::<StoredJob>(&subject, "read cron job")
                .await?
            {
                None => None,
                Some((Ok(j), seq)) => match &j.job {
                    Some(job) if job.name != name => {
                        let reason = format!("the definition of cron job {:?}", job.name);
                        self.report(&subject, seq, &reason);
                        Some((tombstone, seq))
                    }
                    _ => Some((j, seq)),
                },
                Some((Err(_), seq)) => Some((tombstone, seq)),
            },
        )
    }

    /// Stores a cron job (or its tombstone) if its last sequence is still `expected`.
    pub async fn put_job(&self, name: &str, job: &StoredJob, expected: u64) -> Result<u64> {
        let body = serde_json::to_vec(job).map_err(|e| Error::Invalid(e.to_string()))?;
        let subject = self.subjects.cron_job(partition_of(name), name);
        self.put_expecting(subject, body, expected, name, "write cron job")
            .await
    }

    /// The last tick of job `name` made into an alarm, and its sequence. A foreign last
    /// message (reported) reads as tick 0: before any job's creation, so the job plans
    /// from its creation again (each tick's alarm is created only if absent).
    pub async fn planned(&self, name: &str) -> Result<Option<(Planned, u64)>> {
        let subject = self.subjects.cron_tick(partition_of(name), name);
        Ok(
            match self
                .last_genuine::<Planned>(&subject, "read cron tick")
                .await?
            {
                None => None,
                Some((Ok(p), seq)) => Some((p, seq)),
                Some((Err(_), seq)) => Some((Planned { tick_ms: 0 }, seq)),
            },
        )
    }

    /// Records the last planned tick of job `name` if nobody did meanwhile.
    pub async fn set_planned(&self, name: &str, planned: Planned, expected: u64) -> Result<u64> {
        let body = serde_json::to_vec(&planned).map_err(|e| Error::Invalid(e.to_string()))?;
        let subject = self.subjects.cron_tick(partition_of(name), name);
        self.put_expecting(subject, body, expected, name, "write cron tick")
            .await
    }

    /// Every job stored in `partitions` (tombstones included), each its last version.
    pub async fn jobs(&self, partitions: &[u32]) -> Result<Vec<StoredJob>> {
        let filters: Vec<String> = partitions
            .iter()
            .map(|&p| self.subjects.cron_jobs(p))
            .collect();
        let mut out = Vec::new();
        for chunk in filters.chunks(64) {
            for (subject, genuine, payload, _) in self.read_last_per_subject(chunk.to_vec()).await?
            {
                let name = subject.rsplit('.').next().unwrap_or_default();
                match serde_json::from_slice::<StoredJob>(&payload) {
                    Ok(j) if genuine && j.job.as_ref().is_none_or(|job| job.name == name) => {
                        out.push(j)
                    }
                    Ok(_) => {
                        tracing::warn!(%subject, "a stored cron job no genuine write stored there; ignored")
                    }
                    Err(e) => {
                        tracing::warn!(%subject, error = %e, "a stored cron job that does not decode; ignored")
                    }
                }
            }
        }
        Ok(out)
    }

    /// The alarm's history by the rule, oldest first (bounded by `limit` records), and
    /// the foreign messages met on the way.
    pub async fn history(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<(Vec<(Record, u64)>, Vec<Foreign>)> {
        let (records, foreign, _) = self.judge_subject(id, limit).await?;
        Ok((records, foreign))
    }

    /// Appends `record` to its alarm's history if the history's last sequence is still
    /// `expected` (0: the alarm has no history); its stream sequence, or
    /// [`Error::Conflict`] when another write came first.
    pub async fn append(&self, record: &Record, expected: u64) -> Result<u64> {
        let subject = self.subjects.alarm_record(&record.alarm.id);
        self.put_expecting(
            subject,
            record.encode()?,
            expected,
            &record.alarm.id,
            "write alarm",
        )
        .await
    }

    /// Writes the due-index entry of alarm `id` for `at_ms`, at `now`; its sequence.
    pub async fn put_due(&self, id: &str, at_ms: u64, now: u64) -> Result<u64> {
        let subject = self
            .subjects
            .alarm_due(partition_of(id), bucket_of(at_ms), id);
        let entry = DueEntry {
            id: id.to_string(),
            at_ms,
            written_ms: now,
            seq: 0,
        };
        let body = serde_json::to_vec(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
        let ack = self
            .js
            .publish(subject, body.into())
            .await
            .map_err(|e| Error::js("write due entry", e))?
            .await
            .map_err(|e| Error::js("write due entry", e))?;
        Ok(ack.sequence)
    }

    /// Removes settled entries of bucket `bucket` of `partition`: each alarm's
    /// stored before its sequence, by its own subject ([`REMOVALS_AT_ONCE`] at once).
    /// Those whose removal failed are returned.
    pub async fn remove_settled(
        &self,
        partition: u32,
        bucket: u64,
        entries: Vec<(String, u64)>,
    ) -> Vec<(String, u64)> {
        use futures::StreamExt as _;
        futures::stream::iter(entries)
            .map(|(id, below)| async move {
                let r = self.remove_due_in(partition, bucket, &id, below).await;
                (id, below, r)
            })
            .buffer_unordered(REMOVALS_AT_ONCE)
            .filter_map(|(id, below, r)| async move { r.is_err().then_some((id, below)) })
            .collect()
            .await
    }

    /// Removes alarm `id`'s entries from the bucket of `at_ms` stored before sequence
    /// `below` (the record that made them obsolete). One stored after it was written
    /// by a change that read that record or a later one, and may be the entry of the
    /// record that wins next: it stays. (Unbounded, a set's removal that came late
    /// purged the entry of a concurrent set of the same alarm in that bucket, made
    /// after the set's record and before its own.)
    pub async fn remove_due(&self, id: &str, at_ms: u64, below: u64) -> Result<()> {
        self.remove_due_in(partition_of(id), bucket_of(at_ms), id, below)
            .await
    }

    /// [`Store::remove_due`] by partition and bucket: one purge by the entry's own
    /// subject, found through the server's subject index.
    async fn remove_due_in(&self, partition: u32, bucket: u64, id: &str, below: u64) -> Result<()> {
        let subject = self.subjects.alarm_due(partition, bucket, id);
        self.stream
            .purge()
            .filter(subject)
            .sequence(below)
            .await
            .map_err(|e| Error::js("remove due entry", e))?;
        Ok(())
    }

    /// Every entry in buckets `buckets` of `partitions` (each bucket read once, in one
    /// ordered consumer per partition; entries a later write replaced are not
    /// returned twice: the last one of a subject wins). An entry that does not decode
    /// or contradicts its subject is not returned.
    pub async fn load(
        &self,
        partitions: &[u32],
        buckets: std::ops::RangeInclusive<u64>,
    ) -> Result<Vec<DueEntry>> {
        Ok(self.load_checked(partitions, buckets).await?.0)
    }

    /// [`Store::load`], with the subjects and stream sequences of the entries that are
    /// not entries (they do not decode, or their body contradicts their subject).
    pub async fn load_checked(
        &self,
        partitions: &[u32],
        buckets: std::ops::RangeInclusive<u64>,
    ) -> Result<Checked> {
        let filters: Vec<String> = partitions
            .iter()
            .flat_map(|&p| {
                buckets
                    .clone()
                    .map(move |b| self.subjects.alarm_due_bucket(p, b))
            })
            .collect();
        let (mut out, mut bad) = (Vec::new(), Vec::new());
        // One consumer reads many filters at once (a window of every partition is one
        // read); a very long catch-up is read in chunks.
        for chunk in filters.chunks(FILTERS_PER_READ) {
            for (subject, _, payload, seq) in self.read_last_per_subject(chunk.to_vec()).await? {
                match self.due_entry(&subject, &payload) {
                    Ok(e) => out.push(DueEntry { seq, ..e }),
                    Err(why) => {
                        tracing::warn!(%subject, %why, "not a due entry");
                        bad.push((subject, seq));
                    }
                }
            }
        }
        Ok((out, bad))
    }

    /// The entry stored on `subject`, if it is one: it decodes, and its id, partition
    /// and bucket are the subject's.
    pub fn due_entry(&self, subject: &str, payload: &[u8]) -> Result<DueEntry, String> {
        let e: DueEntry =
            serde_json::from_slice(payload).map_err(|e| format!("does not decode: {e}"))?;
        let expected = self
            .subjects
            .alarm_due(partition_of(&e.id), bucket_of(e.at_ms), &e.id);
        if subject != expected {
            return Err(format!(
                "an entry of alarm {} at {} belongs on {expected}",
                e.id, e.at_ms
            ));
        }
        Ok(e)
    }

    /// Removes what is stored on due-index subject `subject` through sequence `seq`
    /// (the message found there that is no entry). A genuine entry stored after it on
    /// the same subject stays (unbounded, the removal took it too, and an alarm outside
    /// the loaded window then had no entry to bring it in).
    pub async fn remove_bad_entry(&self, subject: &str, seq: u64) -> Result<()> {
        if !subject.starts_with(&format!("{}.alarms.due.", self.subjects.prefix())) {
            return Err(Error::Invalid(format!("{subject} is no due-index subject")));
        }
        self.stream
            .purge()
            .filter(subject)
            .sequence(seq.saturating_add(1))
            .await
            .map_err(|e| Error::js("remove due entry", e))?;
        self.bad_entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether bucket `bucket` of `partition` holds no entry.
    pub async fn bucket_is_empty(&self, partition: u32, bucket: u64) -> Result<bool> {
        let filter = self.subjects.alarm_due_bucket(partition, bucket);
        use futures::TryStreamExt as _;
        let mut subjects = self
            .stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| Error::js("due bucket info", e))?;
        let first = subjects
            .try_next()
            .await
            .map_err(|e| Error::js("due bucket info", e))?;
        Ok(first.is_none())
    }

    /// The last message of every subject matching `filter_subjects` (its subject,
    /// whether its headers are a genuine compare-and-set write's, its body), read with
    /// one ordered consumer, deleted after.
    async fn read_last_per_subject(
        &self,
        filter_subjects: Vec<String>,
    ) -> Result<Vec<(String, bool, bytes::Bytes, u64)>> {
        let name = format!("tsa-{}", uuid::Uuid::new_v4().simple());
        let config = consumer::pull::OrderedConfig {
            name: Some(name.clone()),
            filter_subjects,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        };
        let result = tokio::time::timeout(READ_DEADLINE, async {
            let mut c = self
                .stream
                .create_consumer(config)
                .await
                .map_err(|e| Error::js("last-per-subject read", e))?;
            let pending = c
                .info()
                .await
                .map_err(|e| Error::js("last-per-subject read", e))?
                .num_pending;
            let mut out = Vec::with_capacity(pending as usize);
            if pending == 0 {
                return Ok(out);
            }
            let mut msgs = c
                .messages()
                .await
                .map_err(|e| Error::js("last-per-subject read", e))?;
            while let Some(m) = msgs.next().await {
                let m = m.map_err(|e| Error::js("last-per-subject read", e))?;
                let (left, seq) = m
                    .info()
                    .map(|i| (i.pending, i.stream_sequence))
                    .unwrap_or((0, 0));
                out.push((
                    m.subject.to_string(),
                    genuine_headers(&m),
                    m.payload.clone(),
                    seq,
                ));
                if left == 0 {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::JetStream {
                op: "last-per-subject read",
                reason: format!("no answer within {READ_DEADLINE:?}"),
            })
        });
        // Ordered consumers are ephemeral; remove it now rather than after its
        // inactivity threshold.
        let _ = self.stream.delete_consumer(&name).await;
        result
    }

    /// The last swept bucket of `partition`, if any.
    pub async fn swept(&self, partition: u32) -> Result<Option<u64>> {
        let subject = self.subjects.alarm_swept(partition);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.trim().parse().ok())),
            Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
                Ok(None)
            }
            Err(e) => Err(Error::js("read sweep checkpoint", e)),
        }
    }

    /// Records that every bucket of `partition` up to `bucket` is empty.
    pub async fn set_swept(&self, partition: u32, bucket: u64) -> Result<()> {
        let subject = self.subjects.alarm_swept(partition);
        self.js
            .publish(subject, bucket.to_string().into())
            .await
            .map_err(|e| Error::js("write sweep checkpoint", e))?
            .await
            .map_err(|e| Error::js("write sweep checkpoint", e))?;
        // Only the last checkpoint matters.
        let subject = self.subjects.alarm_swept(partition);
        self.stream
            .purge()
            .filter(subject)
            .keep(1)
            .await
            .map_err(|e| Error::js("trim sweep checkpoints", e))?;
        Ok(())
    }

    /// Announces a dead alarm on `<prefix>.alarms.dead` (stored in the stream too).
    pub async fn dead_letter(&self, record: &Record) -> Result<()> {
        self.js
            .publish(self.subjects.alarm_dead(), record.encode()?.into())
            .await
            .map_err(|e| Error::js("dead letter", e))?
            .await
            .map_err(|e| Error::js("dead letter", e))?;
        Ok(())
    }
}

/// The sequence a stored header block's expectation names, when the block is exactly
/// what a genuine write stores (`NATS/1.0`, that one header, a canonical decimal):
/// then JetStream read it as this does and checked it when it stored the message.
fn exact_claim(header: &[u8]) -> Option<u64> {
    let prefix = format!("NATS/1.0\r\n{EXPECTED}: ");
    let digits = header
        .strip_prefix(prefix.as_bytes())?
        .strip_suffix(b"\r\n\r\n")?;
    canonical_u64(digits)
}

/// Whether `m`'s headers are exactly a genuine compare-and-set write's: the one
/// expectation header, a canonical decimal below the message's own sequence.
fn genuine_headers(m: &jetstream::Message) -> bool {
    let Some(h) = m.headers.as_ref().filter(|_| !m.message.is_malformed()) else {
        return false;
    };
    let values: Vec<&str> = h
        .iter()
        .flat_map(|(_, vs)| vs.iter().map(|v| v.as_str()))
        .collect();
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    match (h.get_all(EXPECTED).count(), values.as_slice()) {
        (1, [one]) => canonical_u64(one.as_bytes()).is_some_and(|e| e < seq),
        _ => false,
    }
}

/// The subject and sequence of a message a multi-last direct get returned, when its
/// headers are exactly a genuine compare-and-set write's (one expectation header, a
/// canonical decimal below its own sequence) plus those the direct get adds.
fn genuine_direct(m: &async_nats::Message) -> Option<(String, u64)> {
    const ADDED: [&str; 6] = [
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Sequence",
        "Nats-Time-Stamp",
        "Nats-Num-Pending",
        "Nats-Last-Sequence",
    ];
    if m.is_malformed() {
        return None;
    }
    let h = m.headers.as_ref()?;
    let one = |name: &str| {
        let mut values = h.get_all(name);
        match (values.next(), values.next()) {
            (Some(v), None) => Some(v.as_str().to_string()),
            _ => None,
        }
    };
    let subject = one("Nats-Subject")?;
    let seq: u64 = one("Nats-Sequence")?.parse().ok()?;
    let expected = canonical_u64(one(EXPECTED)?.as_bytes())?;
    let only_ours = h.iter().all(|(name, _)| {
        let name: &str = name.as_ref();
        name == EXPECTED || ADDED.contains(&name)
    });
    (expected < seq && only_ours).then_some((subject, seq))
}

/// A decimal without sign, spaces or leading zeros.
fn canonical_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty()
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits.len() > 1 && digits[0] == b'0')
    {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Judges one message of alarm `id`'s subject read in order (`prev`: the sequence of
/// the message before it on the subject, none for the first read): a record of the
/// alarm, or why it is foreign.
fn judge_message(
    m: &jetstream::Message,
    prev: Option<u64>,
    id: &str,
    subject: &str,
    seq: u64,
) -> std::result::Result<Record, String> {
    if m.message.is_malformed() {
        return Err("its header block does not parse".into());
    }
    let claims: Vec<&str> = m
        .headers
        .as_ref()
        .map(|h| h.get_all(EXPECTED).map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let claim = match claims.as_slice() {
        [] => {
            return Err(
                "written without a genuine write's expectation (a replay, or a foreign writer)"
                    .into(),
            )
        }
        [one] => canonical_u64(one.as_bytes())
            .ok_or_else(|| format!("an expectation that is no sequence: {one:?}"))?,
        _ => return Err("more than one expectation header".into()),
    };
    match prev {
        Some(p) if claim != p => {
            return Err(format!(
                "written after sequence {claim}, but {p} precedes it (a replay)"
            ))
        }
        None if claim >= seq => {
            return Err(format!("written after sequence {claim}, not before it"))
        }
        _ => {}
    }
    judge_body(&m.payload, id, subject, seq)
}

/// A stored record of alarm `id` (at `seq`), or why the body is none; a `set` record's
/// own sequence is its `set_seq` (not known when it was written).
fn judge_body(
    bytes: &[u8],
    id: &str,
    subject: &str,
    seq: u64,
) -> std::result::Result<Record, String> {
    let mut r = Record::decode(bytes, subject, seq).map_err(|e| match e {
        Error::BadRecord { reason, .. } => format!("does not decode: {reason}"),
        other => other.to_string(),
    })?;
    if r.alarm.id != id {
        return Err(format!("a record of alarm {:?}, not of {id}", r.alarm.id));
    }
    if r.set_seq == 0 {
        r.set_seq = seq;
    }
    Ok(r)
}
