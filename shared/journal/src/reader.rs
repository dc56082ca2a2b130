//! Reading the assignment log.
//!
//! Each JetStream message on `<prefix>.log.<process>` is one [`Run`]. Its headers
//! (`Ts-First-Slot`, `Ts-Last-Slot`, `Ts-Head`, `Ts-Time`) describe it without
//! decoding the body. The head of a process is the last message on its subject,
//! read from the stream leader, so it is O(1) and never stale. A slot is found by a
//! binary search over stream sequences (O(log n) reads). Reads always go to the
//! leader (`STREAM.MSG.GET`), never to a possibly lagging direct-get follower.

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures::{Stream, StreamExt};

use protocol::hash::Hash32;
use protocol::wire::Run;
use protocol::ProcessId;

use crate::subjects::{self, Subjects};
use crate::{Error, Result};

/// What the headers of one log message say about its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunMeta {
    /// Stream sequence of the message.
    pub seq: u64,
    /// First slot of the run.
    pub first_slot: u64,
    /// Last slot of the run.
    pub last_slot: u64,
    /// Chain hash of the last slot.
    pub head: Hash32,
    /// Timestamp of the last slot.
    pub timestamp_ms: u64,
}

impl RunMeta {
    /// Reads the meta headers; none if any is missing or malformed.
    pub fn from_headers(seq: u64, h: &HeaderMap) -> Option<RunMeta> {
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_string());
        Some(RunMeta {
            seq,
            first_slot: get(subjects::FIRST_SLOT)?.parse().ok()?,
            last_slot: get(subjects::LAST_SLOT)?.parse().ok()?,
            head: Hash32::from_hex(&get(subjects::HEAD)?)?,
            timestamp_ms: get(subjects::TIME)?.parse().ok()?,
        })
    }

    /// The meta headers of `run`.
    pub fn headers_of(run: &Run) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(subjects::FIRST_SLOT, run.first_slot.to_string().as_str());
        h.insert(subjects::LAST_SLOT, run.last_slot().to_string().as_str());
        h.insert(subjects::HEAD, run.head().to_hex().as_str());
        let ts = run.entries.last().map(|e| e.timestamp_ms).unwrap_or(0);
        h.insert(subjects::TIME, ts.to_string().as_str());
        h
    }
}

/// A decoded log message.
#[derive(Debug, Clone)]
pub struct StoredRun {
    /// Stream sequence.
    pub seq: u64,
    /// The run.
    pub run: Run,
    /// The raw headers (for `Ts-Ids`).
    pub headers: HeaderMap,
}

/// Decodes the run of a log message; one that does not decode is a `BadRecord`
/// naming its sequence.
fn decode(msg: jetstream::message::StreamMessage) -> Result<StoredRun> {
    stored(msg.sequence, &msg.payload, msg.headers)
}

fn stored(seq: u64, payload: &[u8], headers: HeaderMap) -> Result<StoredRun> {
    let run = Run::decode(payload).map_err(|e| Error::BadRecord {
        seq,
        reason: e.to_string(),
    })?;
    Ok(StoredRun { seq, run, headers })
}

/// Reads the log of any process.
#[derive(Debug, Clone)]
pub struct LogReader {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    subjects: Subjects,
}

fn not_found(e: &stream::LastRawMessageError) -> bool {
    matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound)
}

impl LogReader {
    /// Opens the log stream (it must exist).
    pub async fn open(js: jetstream::Context, subjects: Subjects) -> Result<LogReader> {
        let stream = js
            .get_stream_no_info(subjects.log_stream())
            .await
            .map_err(|e| Error::JetStream {
                op: "open log stream",
                reason: e.to_string(),
            })?;
        Ok(LogReader {
            js,
            stream,
            subjects,
        })
    }

    /// A reader over an already opened stream.
    pub fn new(
        js: jetstream::Context,
        stream: stream::Stream<()>,
        subjects: Subjects,
    ) -> LogReader {
        LogReader {
            js,
            stream,
            subjects,
        }
    }

    /// The subjects this reader uses.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The last run's meta for `process`, from the stream leader; none for a process
    /// with no assignment.
    pub async fn head(&self, process: &ProcessId) -> Result<Option<RunMeta>> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subjects.log(process))
            .await
        {
            Ok(msg) => {
                if let Some(meta) = RunMeta::from_headers(msg.sequence, &msg.headers) {
                    return Ok(Some(meta));
                }
                // Headers missing (a foreign writer?): fall back to the body.
                let s = decode(msg)?;
                Ok(Some(meta_of(&s)))
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(Error::JetStream {
                op: "read head",
                reason: e.to_string(),
            }),
        }
    }

    /// The last run of `process`, decoded.
    pub async fn head_run(&self, process: &ProcessId) -> Result<Option<StoredRun>> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subjects.log(process))
            .await
        {
            Ok(msg) => decode(msg).map(Some),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(Error::JetStream {
                op: "read head",
                reason: e.to_string(),
            }),
        }
    }

    /// The run stored at stream sequence `seq`.
    pub async fn run_at(&self, seq: u64) -> Result<StoredRun> {
        let msg = self
            .stream
            .get_raw_message(seq)
            .await
            .map_err(|e| Error::JetStream {
                op: "read run",
                reason: e.to_string(),
            })?;
        decode(msg)
    }

    /// The first run of `process` at stream sequence `seq` or later; none past the end.
    /// A message that does not decode is an error naming its sequence.
    pub async fn next_run(&self, process: &ProcessId, seq: u64) -> Result<Option<StoredRun>> {
        match self.next_raw(process, seq).await? {
            Some(msg) => decode(msg).map(Some),
            None => Ok(None),
        }
    }

    async fn next_raw(
        &self,
        process: &ProcessId,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>> {
        match self
            .stream
            .get_first_raw_message_by_subject(self.subjects.log(process), seq.max(1))
            .await
        {
            Ok(msg) => Ok(Some(msg)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(Error::JetStream {
                op: "read next run",
                reason: e.to_string(),
            }),
        }
    }

    async fn next_meta(&self, process: &ProcessId, seq: u64) -> Result<Option<RunMeta>> {
        let Some(msg) = self.next_raw(process, seq).await? else {
            return Ok(None);
        };
        match RunMeta::from_headers(msg.sequence, &msg.headers) {
            Some(m) => Ok(Some(m)),
            None => decode(msg).map(|s| Some(meta_of(&s))),
        }
    }

    /// The stream sequence of the run holding `slot`, by binary search over stream
    /// sequences; none if the process has no such slot (yet).
    pub async fn locate(&self, process: &ProcessId, slot: u64) -> Result<Option<u64>> {
        let Some(head) = self.head(process).await? else {
            return Ok(None);
        };
        if slot > head.last_slot {
            return Ok(None);
        }
        if slot >= head.first_slot {
            return Ok(Some(head.seq));
        }
        let (mut lo, mut hi) = (1u64, head.seq);
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let Some(m) = self.next_meta(process, mid).await? else {
                break;
            };
            if m.seq > hi || m.first_slot > slot {
                // The run holding `slot` lies before `mid`.
                if mid == 0 {
                    break;
                }
                hi = mid - 1;
            } else if m.last_slot < slot {
                lo = m.seq + 1;
            } else {
                return Ok(Some(m.seq));
            }
        }
        Ok(None)
    }

    /// Runs of `process` in slot order, starting with the run that holds `from`.
    /// With `follow` the stream stays open and yields new runs as they are written;
    /// without it, it ends at the head as it was when the call started.
    pub async fn runs(
        &self,
        process: &ProcessId,
        from: u64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<StoredRun>> + Unpin> {
        let head = self.head(process).await?;
        let start_seq = match self.locate(process, from).await? {
            Some(seq) => seq,
            // Nothing at `from` yet: a follower starts after the current head.
            None => head.map(|h| h.seq + 1).unwrap_or(1),
        };
        let end_seq = if follow {
            u64::MAX
        } else {
            head.map(|h| h.seq).unwrap_or(0)
        };
        let config = consumer::pull::OrderedConfig {
            filter_subject: self.subjects.log(process),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_seq,
            },
            ..Default::default()
        };
        let messages = if end_seq < start_seq {
            None
        } else {
            let consumer =
                self.stream
                    .create_consumer(config)
                    .await
                    .map_err(|e| Error::JetStream {
                        op: "create reader",
                        reason: e.to_string(),
                    })?;
            Some(consumer.messages().await.map_err(|e| Error::JetStream {
                op: "read runs",
                reason: e.to_string(),
            })?)
        };
        let s = futures::stream::iter(messages).flatten().map(|m| {
            let m = m.map_err(|e| Error::JetStream {
                op: "read runs",
                reason: e.to_string(),
            })?;
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            stored(seq, &m.payload, m.headers.clone().unwrap_or_default())
        });
        // Stop right after the end run, without waiting for a message that may never come.
        let s = futures::stream::unfold((Box::pin(s), false), move |(mut s, done)| async move {
            if done {
                return None;
            }
            let item = s.next().await?;
            let done = matches!(&item, Ok(r) if r.seq >= end_seq);
            Some((item, (s, done)))
        });
        Ok(Box::pin(s))
    }

    /// The JetStream context this reader uses.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

fn meta_of(s: &StoredRun) -> RunMeta {
    RunMeta {
        seq: s.seq,
        first_slot: s.run.first_slot,
        last_slot: s.run.last_slot(),
        head: s.run.head(),
        timestamp_ms: s.run.entries.last().map(|e| e.timestamp_ms).unwrap_or(0),
    }
}
