//! The writer: one task that puts the runs of many processes into the log.
//!
//! Each run is its own message on its process's subject with its own
//! `Nats-Expected-Last-Subject-Sequence`. The writer sends runs as ordinary
//! expectation-checked publishes, pipelined, up to `singles_in_flight` at once (never
//! two of one process: an actor has one run in flight). Runs that find every such slot
//! busy are the backlog, and a backlog goes to the server as one JetStream atomic
//! batch (ADR-50, nats-server 2.12): the server checks every run's own expectation
//! and stores all or none with one acknowledgement and one fsync.
//!
//! Why both (measured on this kind of machine): a batch commit costs a fixed ~3 ms
//! whatever its size and whatever the client, while a single publish is acknowledged
//! in ~0.2 ms and costs the server ~10-20 µs; but under `sync_interval: always`
//! every single publish is one fsync (~5k/s in all) and a batch is one fsync for up
//! to 1,000 runs. Singles give light load its latency; once every single slot is busy,
//! a backlog of at least as many runs as there are single slots goes as a batch.
//! `make bench` measured the default of 256 slots best under the default
//! `sync_interval` (batches rare), and 16 best under `sync_interval: always` (batches
//! nearly always): every single in flight there is an fsync a batch waits behind.
//!
//! If a batch is refused as a whole (one run lost its race, a server limit, a
//! timeout), every run of it is published again on its own, so each gets its own
//! verdict: the expectations make that safe whether or not the batch was stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::debug;

use journal::jserr::{
    is_conflict_code, is_full_code, publish_error_code, publish_error_description,
};

use crate::metrics::Metrics;

/// Most runs in one atomic batch (the server's limit is 1,000 messages).
pub const MAX_BATCH_RUNS: usize = 1000;
/// Most payload bytes in one atomic batch.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches in flight from one scheduler (the server allows 50 per stream).
const BATCHES_IN_FLIGHT: usize = 4;
/// How long a batch commit may take before its runs are retried one by one.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the writer may write.
#[derive(Debug, Clone, Copy)]
pub struct WriterLimits {
    /// Whether the log stream accepts atomic batches.
    pub atomic: bool,
    /// Most single publishes in flight at once ([`crate::Config::singles_in_flight`]).
    pub singles_in_flight: usize,
}

impl WriterLimits {
    /// The smallest backlog worth an atomic batch once every single slot is busy:
    /// as many runs as there are single slots, at least two.
    pub fn batch_min(&self) -> usize {
        self.singles_in_flight.max(2)
    }
}

/// What became of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Refused: the subject's last sequence is not the one expected; the server's
    /// own idea of it, when its error says (`wrong last sequence: N`).
    Lost(Option<u64>),
    /// Refused for good: the store or the stream is full (retrying cannot help
    /// until an operator makes room); nothing was stored.
    Full(String),
    /// Anything else; the run may or may not be stored (a catch-up read tells).
    Failed(String),
}

/// One run to write.
pub struct Write {
    /// `<prefix>.log.<process>`.
    pub subject: String,
    /// The encoded run.
    pub payload: Bytes,
    /// Its log headers (`Ts-*`).
    pub headers: HeaderMap,
    /// The process's last subject sequence the write must find.
    pub expected: u64,
}

struct Queued {
    write: Write,
    reply: oneshot::Sender<Outcome>,
}

/// A handle to the writer task.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Writer {
    /// Starts the writer.
    pub fn start(
        js: jetstream::Context,
        client: async_nats::Client,
        limits: WriterLimits,
        metrics: Arc<Metrics>,
    ) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(js, client, limits, rx, metrics));
        Writer { tx }
    }

    /// Writes one run; resolves when the log has decided.
    pub async fn write(&self, write: Write) -> Outcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Queued { write, reply }).is_err() {
            return Outcome::Failed("writer stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Outcome::Failed("writer stopped".into()))
    }
}

async fn run(
    js: jetstream::Context,
    client: async_nats::Client,
    limits: WriterLimits,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    metrics: Arc<Metrics>,
) {
    let batches = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let singles = Arc::new(Semaphore::new(limits.singles_in_flight));
    let mut backlog: VecDeque<Queued> = VecDeque::new();
    let mut open = true;
    loop {
        if backlog.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(q) => backlog.push_back(q),
                None => return,
            }
        }
        while open && backlog.len() < MAX_BATCH_RUNS {
            match rx.try_recv() {
                Ok(q) => backlog.push_back(q),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        while !backlog.is_empty() {
            let Ok(permit) = Arc::clone(&singles).try_acquire_owned() else {
                break;
            };
            let Some(q) = backlog.pop_front() else { break };
            let (js, metrics) = (js.clone(), Arc::clone(&metrics));
            tokio::spawn(async move {
                let outcome = publish_one(&js, q.write).await;
                if matches!(outcome, Outcome::Stored(_)) {
                    Metrics::bump(&metrics.singles_written);
                }
                let _ = q.reply.send(outcome);
                drop(permit);
            });
        }
        if backlog.is_empty() {
            continue;
        }
        // Every single slot is busy. A backlog worth a batch (as many runs as there
        // are single slots: a commit costs about what a pipeline of singles does) goes
        // as one atomic batch when a batch slot is free; otherwise wait for a slot of
        // either kind, or for more runs, which the next round takes too.
        let wants_batch = limits.atomic && backlog.len() >= limits.batch_min();
        if wants_batch {
            if let Ok(permit) = Arc::clone(&batches).try_acquire_owned() {
                let batch = take_batch(&mut backlog);
                let (js, client, metrics) = (js.clone(), client.clone(), Arc::clone(&metrics));
                tokio::spawn(async move {
                    write_batch(&js, &client, batch, &metrics).await;
                    drop(permit);
                });
                continue;
            }
        }
        tokio::select! {
            // A single slot freed up (taken and given back: the next round uses it).
            p = Arc::clone(&singles).acquire_owned() => drop(p),
            // Only worth waking for when a batch is wanted (else this would spin).
            p = Arc::clone(&batches).acquire_owned(), if wants_batch => drop(p),
            q = rx.recv(), if open => match q {
                Some(q) => backlog.push_back(q),
                None => open = false,
            },
        }
    }
}

/// The longest prefix of `backlog` that fits one batch (at least one run).
fn take_batch(backlog: &mut VecDeque<Queued>) -> Vec<Queued> {
    let mut size = 0;
    let mut take = 0;
    for q in backlog.iter() {
        if take == MAX_BATCH_RUNS || (take > 0 && size + q.write.payload.len() > MAX_BATCH_BYTES) {
            break;
        }
        size += q.write.payload.len();
        take += 1;
    }
    backlog.drain(..take).collect()
}

/// An ordinary expectation-checked publish.
async fn publish_one(js: &jetstream::Context, w: Write) -> Outcome {
    let publish = jetstream::message::PublishMessage::build()
        .payload(w.payload)
        .headers(w.headers)
        .expected_last_subject_sequence(w.expected);
    let ack = match js.send_publish(w.subject, publish).await {
        Ok(f) => f.await,
        Err(e) => Err(e),
    };
    match ack {
        Ok(ack) => Outcome::Stored(ack.sequence),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            Outcome::Lost(server_last_sequence(&publish_error_description(&e)))
        }
        Err(e) if is_conflict_code(publish_error_code(&e)) => {
            Outcome::Lost(server_last_sequence(&publish_error_description(&e)))
        }
        Err(e) if is_full_code(publish_error_code(&e)) => Outcome::Full(e.to_string()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// The number in JetStream's "wrong last sequence: N".
pub fn server_last_sequence(error: &str) -> Option<u64> {
    let rest = &error[error.find("wrong last sequence")? + "wrong last sequence".len()..];
    let digits: String = rest
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Commits `batch` atomically; on any refusal, publishes each run on its own.
async fn write_batch(
    js: &jetstream::Context,
    client: &async_nats::Client,
    batch: Vec<Queued>,
    metrics: &Metrics,
) {
    let n = batch.len();
    match commit(client, &batch).await {
        Ok(last) => {
            tracing::trace!(runs = n, last, "atomic batch stored");
            Metrics::bump(&metrics.batches_committed);
            for (i, q) in batch.into_iter().enumerate() {
                let _ = q.reply.send(Outcome::Stored(sequence_of(last, n, i)));
            }
        }
        Err(reason) => {
            debug!(runs = n, %reason, "atomic batch refused; writing its runs one by one");
            Metrics::bump(&metrics.batches_refused);
            let results = futures::future::join_all(batch.into_iter().map(|q| async move {
                let outcome = publish_one(js, q.write).await;
                let _ = q.reply.send(outcome);
            }));
            results.await;
        }
    }
}

/// The stream sequence of run `i` of a batch of `n` whose last run got `last`: the
/// server stores a batch's messages at consecutive sequences, in order.
pub fn sequence_of(last: u64, n: usize, i: usize) -> u64 {
    last - (n - 1 - i) as u64
}

/// Publishes the batch (ADR-50 headers) and returns the last message's sequence.
async fn commit(client: &async_nats::Client, batch: &[Queued]) -> Result<u64, String> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let n = batch.len();
    for (i, q) in batch.iter().enumerate() {
        let mut h = q.write.headers.clone();
        h.insert("Nats-Batch-Id", id.as_str());
        h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        h.insert(
            "Nats-Expected-Last-Subject-Sequence",
            q.write.expected.to_string().as_str(),
        );
        if i + 1 < n {
            client
                .publish_with_headers(q.write.subject.clone(), h, q.write.payload.clone())
                .await
                .map_err(|e| e.to_string())?;
        } else {
            h.insert("Nats-Batch-Commit", "1");
            let req = async_nats::Request::new()
                .headers(h)
                .payload(q.write.payload.clone())
                .timeout(Some(COMMIT_TIMEOUT));
            let reply = client
                .send_request(q.write.subject.clone(), req)
                .await
                .map_err(|e| e.to_string())?;
            return parse_commit_ack(&reply.payload, n);
        }
    }
    Err("empty batch".into())
}

/// Reads a batch commit's PubAck: `{"seq": N, "count": n, ...}` or `{"error": {...}}`.
pub fn parse_commit_ack(payload: &[u8], n: usize) -> Result<u64, String> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("unreadable batch ack: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!("batch refused: {err}"));
    }
    let seq = v
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("batch ack without seq")?;
    let count = v
        .get("count")
        .and_then(serde_json::Value::as_u64)
        .ok_or("batch ack without count")?;
    if count != n as u64 || seq < n as u64 {
        return Err(format!(
            "batch ack says {count} messages ending at {seq}; sent {n}"
        ));
    }
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_s_last_sequence_is_read_from_its_error() {
        assert_eq!(
            server_last_sequence(
                "jetstream error: wrong last sequence: 1234 (code 400, error code 10071)"
            ),
            Some(1234)
        );
        assert_eq!(server_last_sequence("wrong last sequence"), None);
        assert_eq!(server_last_sequence("timed out"), None);
    }

    #[test]
    fn a_backlog_is_worth_a_batch_once_it_matches_the_single_slots() {
        let limits = |n| WriterLimits {
            atomic: true,
            singles_in_flight: n,
        };
        assert_eq!(limits(256).batch_min(), 256);
        assert_eq!(limits(16).batch_min(), 16);
        assert_eq!(limits(1).batch_min(), 2, "a batch is never one run");
    }

    #[test]
    fn a_committed_batch_gives_consecutive_sequences_ending_at_the_ack() {
        assert_eq!(
            (0..3).map(|i| sequence_of(10, 3, i)).collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        assert_eq!(sequence_of(1, 1, 0), 1);
    }

    #[test]
    fn commit_acks_are_checked_before_they_are_believed() {
        assert_eq!(
            parse_commit_ack(br#"{"stream":"TS_LOG","seq":42,"batch":"x","count":3}"#, 3),
            Ok(42)
        );
        assert!(
            parse_commit_ack(br#"{"stream":"TS_LOG","seq":42,"batch":"x","count":2}"#, 3).is_err()
        );
        assert!(parse_commit_ack(
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence"}}"#,
            3
        )
        .is_err());
        assert!(parse_commit_ack(b"", 3).is_err());
        assert!(parse_commit_ack(br#"{"stream":"TS_LOG","seq":1,"count":3}"#, 3).is_err());
    }
}
