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

/// A run of the chain, with where it is stored.
#[derive(Debug, Clone)]
pub struct StoredRun {
    /// Stream sequence.
    pub seq: u64,
    /// The run.
    pub run: Run,
    /// The raw headers (hints only: `Ts-Ids` says which entries carry client ids).
    pub headers: HeaderMap,
}

/// One message of a process's log subject, not yet judged: it may be a run of the
/// chain or anything else someone published there (schemas/chain.md).
#[derive(Debug, Clone)]
pub struct LogMessage {
    /// Stream sequence.
    pub seq: u64,
    /// Its headers (unsigned hints).
    pub headers: HeaderMap,
    /// Its body.
    pub payload: bytes::Bytes,
}

impl LogMessage {
    /// From the `message` of a `STREAM.MSG.GET` answer. Headers that do not parse are
    /// dropped (they are hints; anyone can store anything on a log subject), never an
    /// error: a stored message must not make the log unreadable.
    fn from_api(m: &ApiMessage) -> Result<LogMessage> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = match &m.data {
            Some(d) => b64.decode(d).map_err(|e| Error::BadRecord {
                seq: m.seq,
                reason: format!("stored payload is not base64: {e}"),
            })?,
            None => Vec::new(),
        };
        let headers = m
            .hdrs
            .as_deref()
            .and_then(|h| b64.decode(h).ok())
            .map(|h| lenient_headers(&h))
            .unwrap_or_default();
        Ok(LogMessage {
            seq: m.seq,
            headers,
            payload: payload.into(),
        })
    }

    /// The run it holds, or why it holds none.
    pub fn decode(&self) -> Result<Run, String> {
        Run::decode(&self.payload).map_err(|e| e.to_string())
    }

    /// The run, as a [`StoredRun`].
    pub fn into_stored(self, run: Run) -> StoredRun {
        StoredRun {
            seq: self.seq,
            run,
            headers: self.headers,
        }
    }
}

/// Reads the log of any process.
#[derive(Debug, Clone)]
pub struct LogReader {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    subjects: Subjects,
}

/// The `message` of a `STREAM.MSG.GET` answer.
#[derive(Debug, serde::Deserialize)]
struct ApiMessage {
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Debug, serde::Deserialize)]
struct ApiAnswer {
    #[serde(default)]
    message: Option<ApiMessage>,
    #[serde(default)]
    error: Option<ApiError>,
}

/// JetStream's error code for "no message found".
const NO_MESSAGE_FOUND: u64 = 10037;

/// Parses a stored NATS header block as far as it goes: lines that do not parse (and a
/// block that is not UTF-8) are skipped. Used only for hints.
fn lenient_headers(block: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    let Ok(text) = std::str::from_utf8(block) else {
        return h;
    };
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if valid_name && !value.contains(['\r', '\n']) {
            h.append(name, value);
        }
    }
    h
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

    /// What the last message of `process`'s subject says about itself in its headers,
    /// from the stream leader: an unsigned hint (for locating, never for deciding).
    pub async fn tail_hint(&self, process: &ProcessId) -> Result<Option<RunMeta>> {
        let Some(msg) = self.last_message(process).await? else {
            return Ok(None);
        };
        if let Some(meta) = RunMeta::from_headers(msg.seq, &msg.headers) {
            return Ok(Some(meta));
        }
        Ok(msg.decode().ok().map(|run| meta_of(msg.seq, &run)))
    }

    /// The last message on `process`'s subject, from the stream leader.
    pub async fn last_message(&self, process: &ProcessId) -> Result<Option<LogMessage>> {
        let request = serde_json::json!({ "last_by_subj": self.subjects.log(process) });
        self.msg_get("read head", &request).await
    }

    /// One `STREAM.MSG.GET` (answered by the stream leader, so never stale), read
    /// leniently: a stored message whose headers do not parse is still returned (the
    /// client library's own getter fails on it, which would make a process unreadable).
    async fn msg_get(
        &self,
        op: &'static str,
        request: &serde_json::Value,
    ) -> Result<Option<LogMessage>> {
        let subject = format!("STREAM.MSG.GET.{}", self.subjects.log_stream());
        let answer: ApiAnswer =
            self.js
                .request(subject, request)
                .await
                .map_err(|e| Error::JetStream {
                    op,
                    reason: e.to_string(),
                })?;
        match (answer.message, answer.error) {
            (Some(m), _) => LogMessage::from_api(&m).map(Some),
            (None, Some(e)) if e.err_code == NO_MESSAGE_FOUND => Ok(None),
            (None, Some(e)) => Err(Error::JetStream {
                op,
                reason: format!("{} (error {})", e.description, e.err_code),
            }),
            (None, None) => Err(Error::JetStream {
                op,
                reason: "an answer with neither message nor error".into(),
            }),
        }
    }

    /// The message stored at stream sequence `seq`, if it is on `process`'s subject.
    pub async fn message_at(&self, process: &ProcessId, seq: u64) -> Result<Option<LogMessage>> {
        match self.next_message(process, seq).await? {
            Some(m) if m.seq == seq => Ok(Some(m)),
            _ => Ok(None),
        }
    }

    /// The first message on `process`'s subject at stream sequence `seq` or later.
    pub async fn next_message(&self, process: &ProcessId, seq: u64) -> Result<Option<LogMessage>> {
        let request =
            serde_json::json!({ "seq": seq.max(1), "next_by_subj": self.subjects.log(process) });
        self.msg_get("read next run", &request).await
    }

    async fn next_meta(&self, process: &ProcessId, seq: u64) -> Result<Option<RunMeta>> {
        let Some(msg) = self.next_message(process, seq).await? else {
            return Ok(None);
        };
        match RunMeta::from_headers(msg.seq, &msg.headers) {
            Some(m) => Ok(Some(m)),
            None => Ok(Some(match msg.decode() {
                Ok(run) => meta_of(msg.seq, &run),
                // Not a run: a foreign message; treat it as past any slot.
                Err(_) => RunMeta {
                    seq: msg.seq,
                    first_slot: u64::MAX,
                    last_slot: u64::MAX,
                    head: Hash32::ZERO,
                    timestamp_ms: 0,
                },
            })),
        }
    }

    /// Where to start reading for `slot`: the stream sequence of a message whose
    /// headers say it holds `slot`, by binary search over stream sequences; none if no
    /// message says so. Headers are hints: readers judge what they find there.
    pub async fn locate(&self, process: &ProcessId, slot: u64) -> Result<Option<u64>> {
        let Some(head) = self.tail_hint(process).await? else {
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

    /// The messages of `process`'s subject from stream sequence `start` in stream
    /// order, through `end` (inclusive; none: keep following new ones). Nothing is
    /// judged here: feed them to a [`protocol::verify::LogVerifier`].
    pub async fn messages(
        &self,
        process: &ProcessId,
        start: u64,
        end: Option<u64>,
    ) -> Result<impl Stream<Item = Result<LogMessage>> + Unpin> {
        let end_seq = end.unwrap_or(u64::MAX);
        // Named, so that it can be deleted when the caller is done: an ordered consumer
        // otherwise stays on the server for its 30 s inactivity threshold, and a
        // reader of many subjects (`verify --all`, a restart's head scans) would pile
        // them up. (One the library recreated after a gap, `<name>_<n>`, still lingers.)
        let name = format!("tsr-{}", uuid::Uuid::new_v4().simple());
        let config = consumer::pull::OrderedConfig {
            name: Some(name.clone()),
            max_batch: READ_BATCH,
            filter_subject: self.subjects.log(process),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ..Default::default()
        };
        let mut guard = None;
        let messages = if end_seq < start.max(1) {
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
            guard = Some(ConsumerGuard {
                stream: self.stream.clone(),
                name,
            });
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
            Ok(LogMessage {
                seq,
                headers: m.headers.clone().unwrap_or_default(),
                payload: m.payload.clone(),
            })
        });
        // Stop right after the end message, without waiting for one that may never come.
        let s = futures::stream::unfold(
            (Box::pin(s), false, guard),
            move |(mut s, done, guard)| async move {
                if done {
                    return None;
                }
                let item = s.next().await?;
                let done = matches!(&item, Ok(m) if m.seq >= end_seq);
                Some((item, (s, done, guard)))
            },
        );
        Ok(Box::pin(s))
    }

    /// The stream sequence of the log stream's last message now (0: empty).
    pub async fn last_sequence(&self) -> Result<u64> {
        let stream = self
            .js
            .get_stream(self.subjects.log_stream())
            .await
            .map_err(|e| Error::JetStream {
                op: "read log stream info",
                reason: e.to_string(),
            })?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Every message of the log stream on `filter` (one process's subject, or
    /// [`Subjects::log_all`] for every process) from stream sequence `start` through
    /// `end` (inclusive), in stream order, each with its subject: one pull consumer
    /// read once, whatever the number of subjects. Returns how many messages the
    /// consumer had to deliver when it was made (a progress hint) and the messages.
    ///
    /// The read ends after `end`, or once every message pending when the consumer was
    /// made is read (a message at or before `end` that the store lost is never waited
    /// for). Pulls are bounded in messages and in bytes, so runs of ~1 MiB never
    /// overrun the connection. A message lost on the way (the consumer's delivery
    /// sequence skips, e.g. across a reconnect) ends the read with an error: never a
    /// silent gap. Nothing is judged here.
    pub async fn read_range(
        &self,
        filter: String,
        start: u64,
        end: u64,
    ) -> Result<(u64, impl Stream<Item = Result<StreamMessage>> + Unpin)> {
        let read_err = |e: &dyn std::fmt::Display| Error::JetStream {
            op: "read the log",
            reason: e.to_string(),
        };
        let start = start.max(1);
        let mut pending = 0;
        let mut guard = None;
        let mut messages = None;
        if end >= start {
            let name = format!("tsb-{}", uuid::Uuid::new_v4().simple());
            let consumer = self
                .stream
                .create_consumer(consumer::pull::Config {
                    name: Some(name.clone()),
                    filter_subject: filter,
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ack_policy: consumer::AckPolicy::None,
                    inactive_threshold: std::time::Duration::from_secs(30),
                    memory_storage: true,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::nats("create reader", &e))?;
            guard = Some(ConsumerGuard {
                stream: self.stream.clone(),
                name,
            });
            pending = consumer.cached_info().num_pending;
            // A pull never asks for less than one whole message can be (a run is at
            // most `max_payload` plus a 64 KiB header block).
            let max_payload = self.js.client().server_info().max_payload;
            let bytes = BULK_BYTES.max(2 * (max_payload + 64 * 1024));
            if pending > 0 {
                messages = Some(
                    consumer
                        .stream()
                        .max_messages_per_batch(BULK_BATCH)
                        .max_bytes_per_batch(bytes)
                        .heartbeat(std::time::Duration::from_secs(5))
                        .messages()
                        .await
                        .map_err(|e| read_err(&e))?,
                );
            }
        }
        let s = futures::stream::iter(messages).flatten();
        // (stream, consumer sequence so far, messages read, done, guard)
        let s = futures::stream::unfold(
            (Box::pin(s), 0u64, 0u64, false, guard),
            move |(mut s, mut delivered, mut read, done, guard)| async move {
                if done || read >= pending {
                    return None;
                }
                let m = match s.next().await? {
                    Ok(m) => m,
                    // Classified: a pull nobody answered is transient (a caller may read
                    // again), unlike a lost message or a bad one.
                    Err(e) => {
                        let e = Error::nats("read the log", &e);
                        return Some((Err(e), (s, delivered, read, true, guard)));
                    }
                };
                let (seq, consumer_seq) = match m.info() {
                    Ok(i) => (i.stream_sequence, i.consumer_sequence),
                    Err(e) => return Some((Err(read_err(&e)), (s, delivered, read, true, guard))),
                };
                if consumer_seq != delivered + 1 {
                    let e = format!(
                        "messages were lost on the way (delivery {consumer_seq} after {delivered}, at stream sequence {seq}); read again"
                    );
                    return Some((Err(read_err(&e)), (s, delivered, read, true, guard)));
                }
                delivered = consumer_seq;
                if seq > end {
                    // Stored after the read began: not ours to judge.
                    return None;
                }
                read += 1;
                let msg = StreamMessage {
                    subject: m.subject.to_string(),
                    message: LogMessage {
                        seq,
                        headers: m.headers.clone().unwrap_or_default(),
                        payload: m.payload.clone(),
                    },
                };
                Some((Ok(msg), (s, delivered, read, seq >= end, guard)))
            },
        );
        Ok((pending, Box::pin(s)))
    }

    /// The JetStream context this reader uses.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

/// Most messages one pull of a reader asks for. A run is up to about a megabyte (a
/// single request up to `max_payload`); the library's default of 500 per pull let four
/// parallel readers (`verify --all --jobs 4`) over runs of ~1 MiB overrun the server's
/// 64 MB `max_pending` for the connection, which was then cut as a slow consumer.
const READ_BATCH: i64 = 8;

/// Most messages one pull of [`LogReader::read_range`] asks for.
const BULK_BATCH: usize = 256;

/// Most bytes one pull of [`LogReader::read_range`] asks for (at least two of the
/// largest messages the server takes): with a pull and a half in flight it stays far
/// below the server's 64 MB `max_pending` for the connection.
const BULK_BYTES: usize = 8 * 1024 * 1024;

/// One message of the log stream, with the subject it was stored on.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    /// Its subject, `<prefix>.log.<token>`.
    pub subject: String,
    /// The message.
    pub message: LogMessage,
}

/// Deletes a reader's consumer on the server when dropped (with the stream of
/// messages it feeds), from a task of the current runtime.
struct ConsumerGuard {
    stream: stream::Stream<()>,
    name: String,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (stream, name) = (self.stream.clone(), std::mem::take(&mut self.name));
            rt.spawn(async move {
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(consumer = %name, error = %e, "could not delete a reader's consumer");
                }
            });
        }
    }
}

fn meta_of(seq: u64, run: &Run) -> RunMeta {
    RunMeta {
        seq,
        first_slot: run.first_slot,
        last_slot: run.last_slot(),
        head: run.head(),
        timestamp_ms: run.entries.last().map(|e| e.timestamp_ms).unwrap_or(0),
    }
}
