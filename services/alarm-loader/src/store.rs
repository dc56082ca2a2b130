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

use std::collections::HashMap;
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

/// How long one read of the stream may take.
const READ_DEADLINE: Duration = Duration::from_secs(10);

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

/// The alarm stream.
#[derive(Debug, Clone)]
pub struct Store {
    js: jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
}

impl Store {
    /// Opens (creating it if missing) the alarm stream.
    pub async fn open(
        js: jetstream::Context,
        subjects: Subjects,
        options: &journal::setup::LogOptions,
    ) -> Result<Store> {
        let stream = journal::setup::ensure_alarms(&js, &subjects, options).await?;
        Ok(Store {
            js,
            stream,
            subjects,
        })
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

    /// The alarm's current record and its stream sequence; none if never set.
    pub async fn read(&self, id: &str) -> Result<Option<(Record, u64)>> {
        let subject = self.subjects.alarm_record(id);
        match self.last_raw(&subject, "read alarm").await? {
            Some((payload, seq)) => Ok(Some((decode(&payload, &subject, seq)?, seq))),
            None => Ok(None),
        }
    }

    /// The current records of `ids` that have one, each with its sequence, read in
    /// batches (one direct get names up to [`RECORDS_PER_BATCH`] subjects). A record
    /// the server left out of a batch, or that does not decode, is not returned: a
    /// caller reads it alone. What this returns may be stale by the time it is used:
    /// only a compare-and-set against its sequence may act on it.
    pub async fn read_many(&self, ids: &[String]) -> Result<HashMap<String, (Record, u64)>> {
        let mut out = HashMap::with_capacity(ids.len());
        let client = self.js.client();
        let api = self.subjects.direct_get(&self.subjects.alarms_stream());
        for chunk in ids.chunks(RECORDS_PER_BATCH) {
            let subjects: Vec<String> = chunk
                .iter()
                .map(|id| self.subjects.alarm_record(id))
                .collect();
            let body = serde_json::to_vec(&serde_json::json!({ "multi_last": subjects }))
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
                    let Some(h) = m.headers.as_ref() else {
                        continue;
                    };
                    let (Some(subject), Some(seq)) = (
                        h.get("Nats-Subject").map(|v| v.as_str().to_string()),
                        h.get("Nats-Sequence")
                            .and_then(|v| v.as_str().parse::<u64>().ok()),
                    ) else {
                        continue;
                    };
                    let Some(id) = self.subjects.alarm_of_record(&subject) else {
                        continue;
                    };
                    match decode(&m.payload, &subject, seq) {
                        Ok(r) => {
                            out.insert(id.to_string(), (r, seq));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "batch read: a record left to read alone")
                        }
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

    /// The last message of `subject` and its sequence; none if it has none.
    async fn last_raw(
        &self,
        subject: &str,
        op: &'static str,
    ) -> Result<Option<(bytes::Bytes, u64)>> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some((m.payload, m.sequence))),
            Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
                Ok(None)
            }
            Err(e) => Err(Error::js(op, e)),
        }
    }

    /// The last message of `subject` as JSON `T`, and its sequence.
    async fn last_json<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        op: &'static str,
    ) -> Result<Option<(T, u64)>> {
        let Some((payload, seq)) = self.last_raw(subject, op).await? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&payload).map_err(|e| Error::BadRecord {
            subject: subject.to_string(),
            seq,
            reason: e.to_string(),
        })?;
        Ok(Some((value, seq)))
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

    /// A cron job as stored (a tombstone once deleted) and its sequence.
    pub async fn job(&self, name: &str) -> Result<Option<(StoredJob, u64)>> {
        self.last_json(
            &self.subjects.cron_job(partition_of(name), name),
            "read cron job",
        )
        .await
    }

    /// Stores a cron job (or its tombstone) if its last sequence is still `expected`.
    pub async fn put_job(&self, name: &str, job: &StoredJob, expected: u64) -> Result<u64> {
        let body = serde_json::to_vec(job).map_err(|e| Error::Invalid(e.to_string()))?;
        let subject = self.subjects.cron_job(partition_of(name), name);
        self.put_expecting(subject, body, expected, name, "write cron job")
            .await
    }

    /// The last tick of job `name` made into an alarm, and its sequence.
    pub async fn planned(&self, name: &str) -> Result<Option<(Planned, u64)>> {
        self.last_json(
            &self.subjects.cron_tick(partition_of(name), name),
            "read cron tick",
        )
        .await
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
            for (payload, _) in self.read_last_per_subject(chunk.to_vec()).await? {
                match serde_json::from_slice::<StoredJob>(&payload) {
                    Ok(j) => out.push(j),
                    Err(e) => {
                        tracing::warn!(error = %e, "a stored cron job that does not decode; ignored")
                    }
                }
            }
        }
        Ok(out)
    }

    /// The alarm's whole history, oldest first (bounded by `limit` records).
    pub async fn history(&self, id: &str, limit: usize) -> Result<Vec<(Record, u64)>> {
        let subject = self.subjects.alarm_record(id);
        let mut out = Vec::new();
        let mut from = 1;
        while out.len() < limit {
            let m = match self
                .stream
                .direct_get_next_for_subject(&subject, Some(from))
                .await
            {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => break,
                Err(e) => return Err(Error::js("read alarm history", e)),
            };
            let seq = m.sequence;
            out.push((decode(&m.payload, &subject, seq)?, seq));
            from = seq + 1;
        }
        Ok(out)
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

    /// Writes the due-index entry of alarm `id` for `at_ms`, at `now`.
    pub async fn put_due(&self, id: &str, at_ms: u64, now: u64) -> Result<()> {
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
        self.js
            .publish(subject, body.into())
            .await
            .map_err(|e| Error::js("write due entry", e))?
            .await
            .map_err(|e| Error::js("write due entry", e))?;
        Ok(())
    }

    /// Removes alarm `id`'s entry from the bucket of `at_ms` (nothing if none).
    pub async fn remove_due(&self, id: &str, at_ms: u64) -> Result<()> {
        let subject = self
            .subjects
            .alarm_due(partition_of(id), bucket_of(at_ms), id);
        self.stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| Error::js("remove due entry", e))?;
        Ok(())
    }

    /// Every entry in buckets `buckets` of `partitions` (each bucket read once, in one
    /// ordered consumer per partition; entries a later write replaced are not
    /// returned twice: the last one of a subject wins).
    pub async fn load(
        &self,
        partitions: &[u32],
        buckets: std::ops::RangeInclusive<u64>,
    ) -> Result<Vec<DueEntry>> {
        let filters: Vec<String> = partitions
            .iter()
            .flat_map(|&p| {
                buckets
                    .clone()
                    .map(move |b| self.subjects.alarm_due_bucket(p, b))
            })
            .collect();
        let mut out = Vec::new();
        // One consumer reads many filters at once (a window of every partition is one
        // read); a very long catch-up is read in chunks.
        for chunk in filters.chunks(FILTERS_PER_READ) {
            for (payload, seq) in self.read_last_per_subject(chunk.to_vec()).await? {
                match serde_json::from_slice::<DueEntry>(&payload) {
                    Ok(e) => out.push(DueEntry { seq, ..e }),
                    Err(e) => {
                        tracing::warn!(error = %e, "due entry that does not decode; ignored")
                    }
                }
            }
        }
        Ok(out)
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

    /// Removes the entries of bucket `bucket` of `partition` stored before sequence
    /// `below` (those after it are left: the caller has not seen them).
    pub async fn purge_bucket(&self, partition: u32, bucket: u64, below: u64) -> Result<()> {
        self.stream
            .purge()
            .filter(self.subjects.alarm_due_bucket(partition, bucket))
            .sequence(below)
            .await
            .map_err(|e| Error::js("purge due bucket", e))?;
        Ok(())
    }

    /// The last message of every subject matching `filter_subjects` and its sequence,
    /// read with one ordered consumer, deleted after.
    async fn read_last_per_subject(
        &self,
        filter_subjects: Vec<String>,
    ) -> Result<Vec<(bytes::Bytes, u64)>> {
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
                out.push((m.payload.clone(), seq));
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

/// Decodes a stored record; a `Set` record's own sequence is its `set_seq` (not
/// known when it was written).
fn decode(bytes: &[u8], subject: &str, seq: u64) -> Result<Record> {
    let mut r = Record::decode(bytes, subject, seq)?;
    if r.set_seq == 0 {
        r.set_seq = seq;
    }
    Ok(r)
}
