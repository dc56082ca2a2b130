//! One task per active process: it owns the process's head and dedupe index,
//! batches the queued requests into one run, and writes the run with an
//! expected-last-subject-sequence check, so the log itself arbitrates between
//! replicas. A lost race (or an ambiguous failure) is followed by a catch-up read
//! of every run written since the known head, then a fresh plan.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use async_nats::HeaderMap;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info_span, warn, Instrument};

use journal::chain::{self, Judged};
use journal::reader::{LogReader, RunMeta, StoredRun};
use journal::subjects;
use protocol::merkle::Tree;
use protocol::verify::{check_run, ChainPoint, Fault, FaultKind, LogVerifier};
use protocol::wire::{ErrorCode, Mode, Run};
use protocol::ProcessId;

use crate::core::{
    self, Decision, DedupeIndex, Head, Indexed, KeyPlan, NewMessage, Seen, WindowRead,
};
use crate::metrics::Metrics;
use crate::reply::{Refusal, Replier};
use crate::writer::{Outcome, Write};
use crate::Shared;

/// What the audit tells an actor between batches: a message landed on its subject
/// (the highest stream sequence seen), or re-check the log after a reconnect.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    landed: AtomicU64,
    recheck: AtomicBool,
    notify: Notify,
}

impl Signals {
    /// A message landed on the process's subject at `seq`.
    pub fn landed(&self, seq: u64) {
        self.landed.fetch_max(seq, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Re-check the process's log from its last verified run (after a reconnect).
    pub fn recheck(&self) {
        self.recheck.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

/// One scheduling request, validated by the intake.
pub struct Job {
    /// Where the answer goes.
    pub reply: Replier,
    /// The client's message id.
    pub message_id: Option<String>,
    /// The resolved mode (never `Disabled`).
    pub mode: Mode,
    /// Stored headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// Its share of the admission bounds, given back when the job is dropped (answered).
    pub admission: Option<crate::Admission>,
    /// When the intake queued it.
    pub queued: tokio::time::Instant,
}

impl Job {
    /// Bytes the job adds to a run's payload: body, headers, id and a generous
    /// allowance for the entry's fixed fields.
    fn cost(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>()
            + self.message_id.as_ref().map_or(0, String::len)
            + 200
    }

    /// Bytes the job adds to the run's `Ts-Ids` header (base64 of `[slot, id]`).
    fn ids_cost(&self) -> usize {
        self.message_id
            .as_ref()
            .map_or(0, |id| (id.len() + 16) * 4 / 3 + 4)
    }
}

/// Runs the actor of `process` until its queue closes or it idles out.
pub(crate) async fn run(
    shared: Arc<Shared>,
    process: ProcessId,
    mut rx: mpsc::Receiver<Job>,
    signals: Arc<Signals>,
) {
    let span = info_span!("process", process = %process);
    async move {
        let mut actor = Actor {
            shared,
            process,
            head: None,
            index: DedupeIndex::new(0),
            indexed: None,
            expect: None,
        };
        let mut carry: Option<Job> = None;
        loop {
            let first = match carry.take() {
                Some(j) => j,
                None => {
                    let idle = tokio::time::sleep(actor.shared.config.idle_actor);
                    tokio::select! {
                        biased;
                        j = rx.recv() => match j {
                            Some(j) => j,
                            None => break,
                        },
                        _ = signals.notify.notified() => {
                            actor.on_signals(&signals).await;
                            continue;
                        }
                        _ = idle => {
                            // Idle: close the queue, then finish whatever raced in before closing.
                            rx.close();
                            let mut rest = Vec::new();
                            while let Ok(j) = rx.try_recv() {
                                rest.push(j);
                            }
                            if !rest.is_empty() {
                                actor.batch(rest).await;
                            }
                            break;
                        }
                    }
                }
            };
            let Some(first) = actor.fresh(first).await else {
                continue;
            };
            // Everything a run carries counts: its payload and its Ts-Ids header.
            let mut bytes = first.cost();
            let mut ids = first.ids_cost();
            let mut batch = vec![first];
            while batch.len() < actor.shared.limits.max_run_entries {
                match rx.try_recv() {
                    Ok(j) => {
                        let Some(j) = actor.fresh(j).await else {
                            continue;
                        };
                        if bytes + j.cost() > actor.shared.limits.max_run_bytes
                            || ids + j.ids_cost() > crate::IDS_HEADER_BUDGET
                        {
                            carry = Some(j);
                            break;
                        }
                        bytes += j.cost();
                        ids += j.ids_cost();
                        batch.push(j);
                    }
                    Err(_) => break,
                }
            }
            actor.batch(batch).await;
        }
        actor.shared.actors.retire(&actor.process);
    }
    .instrument(span)
    .await
}

/// How long loading a process's dedupe window may take before the load fails (and
/// the requests waiting on it are answered `unavailable` and tried again).
const LOAD_DEADLINE: Duration = Duration::from_secs(10);

/// Messages one pull of the dedupe-window reader asks for. Headers only, yet the
/// server copies each whole run (up to ~1 MiB) to cut its headers out and keeps the
/// copy until it is sent; with the library's default of 500 per pull, ~300 actors
/// loading at once after a server restart made it hold gigabytes.
const WINDOW_BATCH: i64 = 16;

/// The answer to what a stopping replica could not write in time.
const GIVEN_UP: &str = "this scheduler replica is stopping and did not write the request in time; if it carries a message id, retry with the same id (another replica takes it)";

/// What became of a write whose outcome was unknown.
enum Fate {
    /// It is in the log at this stream sequence.
    Landed(u64),
    /// Another message took its place: it can never land.
    Absent,
    /// Nothing took its place yet: it may still land; send the same run again.
    Open,
}

/// A run built and sealed on `head`, ready to write (and to write again, unchanged,
/// while the log has not moved).
struct Attempt {
    head: Head,
    run: Run,
    tree: Tree,
    /// Per entry: whether the client supplied its message id.
    supplied: Vec<bool>,
    /// Per job still to answer: its place in the run.
    decisions: Vec<Decision>,
}

struct Actor {
    shared: Arc<Shared>,
    process: ProcessId,
    head: Option<Head>,
    index: DedupeIndex,
    /// How far `index` has taken the log in (none: not loaded). It outlives a dropped
    /// head: a reload keeps the index and reads only what came after this.
    indexed: Option<Indexed>,
    /// What the next write must expect when the server's record of the subject's last
    /// message differs from what its store holds (after a loss); normally none.
    expect: Option<u64>,
}

impl Actor {
    fn reader(&self) -> &LogReader {
        &self.shared.reader
    }

    /// `job`, unless it waited in the queue past `max_queue_wait`: then it is answered
    /// `busy` (nothing of it was planned, so a retry is safe) and none.
    async fn fresh(&self, job: Job) -> Option<Job> {
        if self.shared.abandon.is_cancelled() {
            job.reply
                .refuse(Refusal::new(ErrorCode::Unavailable, GIVEN_UP.to_string()))
                .await;
            return None;
        }
        let waited = job.queued.elapsed();
        let limit = self.shared.config.max_queue_wait;
        if waited <= limit {
            return Some(job);
        }
        self.shared.metrics.shed.fetch_add(1, Ordering::Relaxed);
        job.reply
            .refuse(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "waited {} ms in this process's queue (limit {} ms); retry in {} ms",
                    waited.as_millis(),
                    limit.as_millis(),
                    crate::BUSY_RETRY_MS
                ),
            ))
            .await;
        None
    }

    /// Schedules one batch: answers duplicates, writes the rest as one run.
    ///
    /// A write whose outcome is unknown (a timeout, no responders) may still land
    /// later. So while the log has not moved past the head a run was built on, a
    /// retry sends that very run again (same timestamps, same generated ids, same
    /// seal) rather than a new one: if the first attempt did land, the retry loses
    /// the race and the catch-up finds the run as ours, so no message is ever
    /// written twice and an aggressive receipt already sent stays true.
    async fn batch(&mut self, mut jobs: Vec<Job>) {
        let started = Instant::now();
        let mut answered_early = vec![false; jobs.len()];
        let mut backoff = Duration::from_millis(5);
        let mut pending: Option<Attempt> = None;
        let mut server_says: Option<u64> = None;
        loop {
            // A drain out of time: nothing more is written; a write in flight may still
            // land, so `unavailable` (fate unknown: retry with the same id).
            if self.shared.abandon.is_cancelled() {
                refuse_all(&jobs, &answered_early, ErrorCode::Unavailable, GIVEN_UP).await;
                self.head = None;
                return;
            }
            let head = match self.load().await {
                Ok(h) => h,
                Err(e) => {
                    if started.elapsed() > self.shared.config.write_deadline {
                        refuse_all(
                            &jobs,
                            &answered_early,
                            ErrorCode::Unavailable,
                            &format!("cannot read the log: {e}"),
                        )
                        .await;
                        return;
                    }
                    warn!(error = %e, "reading the head failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            // A run whose fate is unknown (a write that timed out, a head re-read since)
            // is resolved from the log before anything else is planned: found there
            // (it landed), proven absent (another message took its place), or still
            // open (nothing took its place: send the very same run again).
            let mut landed_before = None;
            let kept = match pending.take() {
                Some(a) if a.head == head => Some(a),
                Some(a) => match self.fate(&a).await {
                    Ok(Fate::Landed(seq)) => {
                        landed_before = Some(seq);
                        Some(a)
                    }
                    Ok(Fate::Open) => Some(a),
                    Ok(Fate::Absent) => None,
                    Err(e) => {
                        if started.elapsed() > self.shared.config.write_deadline {
                            let msg = format!("the log cannot be read to learn whether the write landed ({e}); retry with the same message id");
                            refuse_all(&jobs, &answered_early, ErrorCode::Unavailable, &msg).await;
                            self.head = None;
                            return;
                        }
                        warn!(error = %e, "cannot resolve an unconfirmed write yet; retrying");
                        pending = Some(a);
                        self.head = None;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                None => None,
            };
            let attempt = match kept {
                Some(a) => a,
                None => {
                    // An id an unsigned header says was scheduled is settled against
                    // its signed run before anything is planned: unsettled, it might
                    // be a duplicate, and it never gets a new slot.
                    if let Err(e) = self.resolve_hints(&jobs).await {
                        if started.elapsed() > self.shared.config.write_deadline {
                            let msg = format!("cannot check whether the message id was scheduled already ({e}); retry with the same message id");
                            refuse_all(&jobs, &answered_early, ErrorCode::Unavailable, &msg).await;
                            return;
                        }
                        Metrics::bump(&self.shared.metrics.dedupe_checks_deferred);
                        warn!(error = %e, "cannot check a dedupe claim yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                    let Some((kept, early, attempt)) =
                        self.prepare(head.clone(), jobs, answered_early).await
                    else {
                        return;
                    };
                    jobs = kept;
                    answered_early = early;
                    attempt
                }
            };
            let Attempt {
                run,
                tree,
                decisions,
                ..
            } = &attempt;

            // Aggressive requests are answered now, signed but not yet durable.
            for (i, job) in jobs.iter().enumerate() {
                if job.mode == Mode::Aggressive && !answered_early[i] {
                    answered_early[i] = true;
                    let (pos, same) = position(decisions[i]);
                    job.reply.receipt(run, tree, pos, false, same).await;
                }
            }

            let outcome = match landed_before {
                Some(seq) => Outcome::Stored(seq),
                None => self.write(&attempt.head, run, &attempt.supplied).await,
            };
            let landed = match outcome {
                Outcome::Stored(seq) => Some(seq),
                Outcome::Lost(server_last) => {
                    Metrics::bump(&self.shared.metrics.races_lost);
                    debug!(slot = head.next_slot, "lost the write race; catching up");
                    server_says = server_last;
                    None
                }
                Outcome::Full(reason) => {
                    // Permanent until someone makes room: answer now, never retry.
                    let msg = format!(
                        "the log is full: {reason}; nothing was written (retry once there is room)"
                    );
                    let event = protocol::wire::FaultEvent {
                        v: 1,
                        process: self.process.to_string(),
                        seq: head.seq,
                        slot: head.next_slot,
                        code: ErrorCode::LogFull.as_str().to_string(),
                        message: msg.clone(),
                        detected_by: "scheduler".into(),
                        time_ms: (self.shared.clock)(),
                    };
                    self.shared.event(&event);
                    refuse_all(&jobs, &answered_early, ErrorCode::LogFull, &msg).await;
                    return;
                }
                Outcome::Failed(reason) => {
                    if started.elapsed() > self.shared.config.write_deadline {
                        let msg = format!("the log did not confirm the write ({reason}); retry with the same message id");
                        refuse_all(&jobs, &answered_early, ErrorCode::Unavailable, &msg).await;
                        // The write may still land; forget the head so the next batch re-reads it.
                        self.head = None;
                        return;
                    }
                    warn!(%reason, "write failed; catching up and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    None
                }
            };
            // After a failure the log knows what happened: read every run since our head.
            // If our own run is among them (an ambiguous failure that did land), it stored.
            let landed = match landed {
                Some(seq) => Some(seq),
                None => match self.catch_up(Some(run)).await {
                    Ok(found) => {
                        let moved = self
                            .head
                            .as_ref()
                            .is_some_and(|h| h.seq != attempt.head.seq);
                        if found.is_none() && !moved {
                            // Refused, yet nothing new to read: the server's record of the
                            // subject's last message is not what its store holds (a
                            // message lost from the store). Its word is what the next
                            // write must expect; the run still signs the place we know
                            // (`prev_seq`), so readers see the loss, never a replay.
                            if let Some(last) = server_says.take() {
                                warn!(expected = attempt.head.seq, server = last, "the server's last sequence differs from its store; expecting what the server says");
                                self.expect = Some(last);
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                        found
                    }
                    Err(e) => {
                        warn!(error = %e, "catch-up failed; re-reading the head");
                        self.head = None;
                        None
                    }
                },
            };
            let Some(seq) = landed else {
                pending = Some(attempt);
                continue;
            };
            let Attempt {
                run,
                tree,
                supplied,
                decisions,
                ..
            } = attempt;
            Metrics::bump(&self.shared.metrics.runs_stored);
            self.shared.metrics.assignments_stored.fetch_add(
                run.entries.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            let head = Head::after(&run, seq);
            // The run was written right after what the write expected: if the index
            // covered that, it covers the run too (its ids are inserted below).
            let written_after = self.expect.unwrap_or(run.prev_seq).max(run.prev_seq);
            if let Some(indexed) = &mut self.indexed {
                indexed.advance(written_after, seq, head.next_slot);
            }
            self.head = Some(head);
            self.expect = None;
            for (e, supplied) in run.entries.iter().zip(&supplied) {
                if *supplied {
                    self.index.insert(
                        e.message_id.clone(),
                        Seen { slot: e.slot, seq },
                        e.timestamp_ms,
                    );
                }
            }
            let written = Arc::new((run, tree));
            let mut remote = Vec::new();
            for ((job, d), early) in jobs.into_iter().zip(decisions).zip(answered_early) {
                if early {
                    continue;
                }
                let (pos, same) = position(d);
                if job.mode == Mode::RemoteConfirmation {
                    remote.push((job, pos, same));
                } else {
                    job.reply
                        .receipt(&written.0, &written.1, pos, true, same)
                        .await;
                }
            }
            if !remote.is_empty() {
                self.shared.confirm_remote(written, remote);
            }
            return;
        }
    }

    /// Plans `jobs` on `head`: answers (and drops) duplicates of earlier runs, then
    /// builds and seals the run of the rest. Returns the jobs still to answer, their
    /// early-answer flags and the attempt, or none when every job is answered already.
    async fn prepare(
        &mut self,
        head: Head,
        jobs: Vec<Job>,
        answered_early: Vec<bool>,
    ) -> Option<(Vec<Job>, Vec<bool>, Attempt)> {
        let now = (self.shared.clock)();
        self.index.prune(now);
        let ids: Vec<Option<&str>> = jobs.iter().map(|j| j.message_id.as_deref()).collect();
        let planned = core::plan(&self.index, &ids);

        let mut keep = Vec::with_capacity(jobs.len());
        let mut keep_early = Vec::with_capacity(jobs.len());
        let mut decisions = Vec::with_capacity(jobs.len());
        for ((job, d), early) in jobs.into_iter().zip(planned).zip(answered_early) {
            match d {
                Decision::Duplicate(seen) => self.answer_duplicate(job, seen).await,
                // Settled just before planning; should one remain, the request is not
                // written: its fate is clear (nothing), a retry with its id is safe.
                Decision::Unchecked => {
                    if !early {
                        job.reply
                            .refuse(Refusal::new(
                                ErrorCode::Unavailable,
                                "cannot check yet whether this message id was scheduled already; retry with the same message id".to_string(),
                            ))
                            .await;
                    }
                }
                d => {
                    keep.push(job);
                    keep_early.push(early);
                    decisions.push(d);
                }
            }
        }
        if keep.is_empty() {
            return None;
        }

        let mut supplied = Vec::new();
        let messages: Vec<NewMessage> = keep
            .iter()
            .zip(&decisions)
            .filter(|(_, d)| matches!(d, Decision::Assign(_)))
            .map(|(j, _)| {
                supplied.push(j.message_id.is_some());
                NewMessage {
                    message_id: j
                        .message_id
                        .clone()
                        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                    headers: j.headers.clone(),
                    body: j.body.to_vec(),
                }
            })
            .collect();
        // The run declares the settings' keys; a change of them is sealed by the keys
        // of the set it replaces too (schemas/chain.md "Which keys a run must carry").
        let keys = KeyPlan::new(
            &self.shared.process_config(&self.process).keys,
            head.keys.as_deref(),
        );
        let (mut run, tree) = core::build_run(&self.process, &head, messages, now);
        run.keys = Some(keys.declares.clone());
        let digest = protocol::seal::run_digest(&run.statement_for(&tree));
        match self
            .shared
            .signer
            .seal(keys.seal_with.clone(), digest)
            .await
        {
            Ok(seal) => run.seal = seal,
            Err(id) => {
                let msg = if keys.declares.contains(&id) {
                    format!("process requires key {id}, which this scheduler does not hold")
                } else {
                    format!("the process's required keys change from {:?} to {:?}: the run that changes them must also be sealed by key {id}, which this scheduler does not hold", head.keys.as_deref().unwrap_or_default(), keys.declares)
                };
                refuse_all(&keep, &keep_early, ErrorCode::MissingKey, &msg).await;
                return None;
            }
        }
        Some((
            keep,
            keep_early,
            Attempt {
                head,
                run,
                tree,
                supplied,
                decisions,
            },
        ))
    }

    /// The head, loading it (and the dedupe window) from the log on first use. The
    /// head is verified (schemas/chain.md): the tail must be a sealed run in its
    /// place that links to the run before it, else the whole subject is judged.
    async fn load(&mut self) -> journal::Result<Head> {
        if let Some(h) = &self.head {
            return Ok(h.clone());
        }
        // One turn of `concurrent_loads`, held for the whole load (window included).
        let _turn = self.turn().await?;
        let mut loaded =
            chain::load_head(self.reader(), &self.process, &self.shared.trusted()).await?;
        // A run sealed by a key we have not read yet (another replica started after us)
        // is not foreign: learn the key and load again.
        let mut learned = false;
        for f in &loaded.faults {
            if let FaultKind::UntrustedKey(k) = &f.kind {
                learned |= self.shared.learn_key(k).await?;
            }
        }
        if learned {
            loaded = chain::load_head(self.reader(), &self.process, &self.shared.trusted()).await?;
        }
        if loaded.scanned {
            Metrics::bump(&self.shared.metrics.head_scans);
        }
        for f in &loaded.faults {
            self.shared.fault(&self.process, f);
        }
        let timestamp_ms = loaded
            .head_run
            .as_ref()
            .and_then(|r| r.run.entries.last())
            .map(|e| e.timestamp_ms)
            .unwrap_or(0);
        let head = Head {
            next_slot: loaded.point.next_slot,
            prev: loaded.point.prev,
            seq: loaded.tail_seq,
            run_seq: loaded.point.seq,
            timestamp_ms,
            keys: loaded.point.keys,
        };
        // The dedupe index outlives a dropped head (an ambiguous write, a lost race, a
        // failed read): a reload keeps it and reads only the messages after the head it
        // held; only a first load, or a log now behind the index, reads the window.
        match core::window_read(self.indexed, &head) {
            WindowRead::Full => {
                Metrics::bump(&self.shared.metrics.window_loads);
                self.indexed = None;
                self.index = DedupeIndex::new(self.shared.config.dedupe_window.as_millis() as u64);
                if loaded.tail_seq > 0 {
                    self.load_window(&head, None).await?;
                }
            }
            WindowRead::After(seq) => {
                Metrics::bump(&self.shared.metrics.window_reloads);
                if head.seq > seq {
                    self.load_window(&head, Some(seq)).await?;
                }
            }
        }
        self.indexed = Some(Indexed {
            seq: head.seq,
            next_slot: head.next_slot,
        });
        self.head = Some(head.clone());
        Ok(head)
    }

    /// Waits for a turn to load or re-check (`Shared::loads`).
    async fn turn(&self) -> journal::Result<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.shared.loads)
            .acquire_owned()
            .await
            .map_err(|e| journal::Error::JetStream {
                op: "wait for a turn to load",
                reason: e.to_string(),
            })
    }

    /// Reads the message ids of the runs within the dedupe window through `head`,
    /// headers only: the whole window, or (`after`) only the messages after that
    /// stream sequence, which the index already took in. The `Ts-Ids` headers are
    /// unsigned, so what they say is kept as hints, each checked against its signed
    /// run before a request is answered as a duplicate.
    async fn load_window(&mut self, head: &Head, after: Option<u64>) -> journal::Result<()> {
        let window = self.shared.config.dedupe_window.as_millis() as u64;
        let now = (self.shared.clock)();
        if window == 0 || head.timestamp_ms < now.saturating_sub(window) {
            return Ok(());
        }
        let deliver_policy = match after {
            Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            None => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(now.saturating_sub(window)) * 1_000_000,
                )
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        };
        let err = |e: &dyn std::fmt::Display| journal::Error::JetStream {
            op: "load dedupe window",
            reason: e.to_string(),
        };
        let consumer = self
            .shared
            .log_stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.shared.subjects.log(&self.process),
                deliver_policy,
                headers_only: true,
                // The server copies each whole run to send its headers and holds the
                // copy until it is sent: few at a time (the library's default is 500).
                max_batch: WINDOW_BATCH,
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        // The start selects by the server's storage time, which need not agree with
        // the Ts-Time of a replica whose clock is skewed: nothing may be stored after
        // it at all. Never wait for a message that is not there.
        let pending = consumer.cached_info().num_pending;
        let name = consumer.cached_info().name.clone();
        let read = if pending == 0 {
            Ok(())
        } else {
            self.read_window(consumer, head, pending, now).await
        };
        // Leave nothing behind on the server: a restart loads thousands of processes
        // at once, and each would otherwise keep its consumer for 30 s.
        if let Err(e) = self.shared.log_stream.delete_consumer(&name).await {
            debug!(error = %e, consumer = %name, "could not delete the window consumer (it expires by itself)");
        }
        read
    }

    async fn read_window(
        &mut self,
        consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
        head: &Head,
        pending: u64,
        now: u64,
    ) -> journal::Result<()> {
        let err = |e: &dyn std::fmt::Display| journal::Error::JetStream {
            op: "load dedupe window",
            reason: e.to_string(),
        };
        let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
        let mut read = 0u64;
        let deadline = tokio::time::Instant::now() + LOAD_DEADLINE;
        loop {
            let next = tokio::time::timeout_at(deadline, messages.next())
                .await
                .map_err(|_| err(&format!("no message within {LOAD_DEADLINE:?}")))?;
            let Some(m) = next else { break };
            let m = m.map_err(|e| err(&e))?;
            read += 1;
            Metrics::bump(&self.shared.metrics.window_messages_read);
            let seq = m.info().map(|i| i.stream_sequence).map_err(|e| err(&e))?;
            if let Some(h) = &m.headers {
                let ts = RunMeta::from_headers(seq, h)
                    .map(|r| r.timestamp_ms)
                    .unwrap_or(now);
                self.index.insert_hints(seq, decode_ids(h), ts);
            }
            if seq >= head.seq || read >= pending {
                break;
            }
        }
        Ok(())
    }

    /// Settles the unchecked dedupe hints of the ids in `jobs`: a hint is believed
    /// only if its run is sealed by a trusted key and holds the id at that slot (a
    /// copy of a genuine run holds the very same assignment, so it answers the same).
    async fn resolve_hints(&mut self, jobs: &[Job]) -> journal::Result<()> {
        let trusted = self.shared.trusted();
        for id in jobs.iter().filter_map(|j| j.message_id.as_deref()) {
            // Newest first: an id scheduled again after its window answers with its
            // latest assignment.
            let mut claims = self.index.hints(id).to_vec();
            claims.sort_by_key(|s| std::cmp::Reverse(s.seq));
            if claims.is_empty() {
                continue;
            }
            let mut found = None;
            for seen in claims {
                let holds = match self.reader().message_at(&self.process, seen.seq).await {
                    Ok(Some(m)) => m.decode().ok().is_some_and(|run| {
                        check_run(&run, &self.process, &trusted, &[]).is_ok()
                            && run
                                .entries
                                .iter()
                                .any(|e| e.slot == seen.slot && e.message_id == id)
                    }),
                    // Cannot read it now: the claim stays, and the id gets no slot.
                    Err(e) => return Err(e),
                    Ok(None) => false,
                };
                if holds {
                    found = Some(seen);
                    break;
                }
                let fault = Fault {
                    seq: seen.seq,
                    slot: seen.slot,
                    kind: FaultKind::Undecodable(format!(
                        "its Ts-Ids header claims id {id:?} at slot {}, which no sealed run there holds",
                        seen.slot
                    )),
                };
                self.shared.fault(&self.process, &fault);
            }
            self.index.confirm(id, found);
        }
        Ok(())
    }

    /// Handles what the audit signalled: a re-check after a reconnect, and messages
    /// that landed on the subject beyond the head (another replica's runs, or
    /// anything else someone published there).
    async fn on_signals(&mut self, signals: &Signals) {
        let recheck = signals.recheck.swap(false, Ordering::Relaxed);
        let landed = signals.landed.load(Ordering::Relaxed);
        let Some(head) = self.head.clone() else {
            return;
        };
        let result = if recheck {
            // Every live actor re-checks at once after a reconnect: take turns.
            match self.turn().await {
                Ok(_turn) => self.recheck(head).await,
                Err(e) => Err(e),
            }
        } else if landed > head.seq {
            self.catch_up(None).await.map(|_| ())
        } else {
            Ok(())
        };
        if let Err(e) = result {
            warn!(error = %e, "audit read failed; the head is reloaded before the next write");
            self.head = None;
        }
    }

    /// After a reconnect: the chain's last run must still be in the log, unchanged
    /// (a server restart may have lost it); then every message after it is judged.
    async fn recheck(&mut self, head: Head) -> journal::Result<()> {
        if head.run_seq > 0 {
            let stored = self
                .reader()
                .message_at(&self.process, head.run_seq)
                .await?;
            let intact = stored.and_then(|m| m.decode().ok()).is_some_and(|run| {
                run.last_slot() + 1 == head.next_slot && run.head() == head.prev
            });
            if !intact {
                let tail = self
                    .reader()
                    .last_message(&self.process)
                    .await?
                    .map(|m| m.seq)
                    .unwrap_or(0);
                let fault = Fault {
                    seq: head.run_seq,
                    slot: head.next_slot,
                    kind: FaultKind::Lost {
                        written_after: head.run_seq,
                        found_after: tail,
                    },
                };
                self.shared.fault(&self.process, &fault);
                // Keep the chain as we know it: its slots are never given again. The
                // next write still expects the lost message (the server's own record
                // of the subject may still name it); if the server disagrees, its
                // "wrong last sequence" says what to expect instead.
                return Ok(());
            }
        }
        self.catch_up(None).await.map(|_| ())
    }

    /// Hands `run` to the writer, expecting the head's subject sequence.
    async fn write(&self, head: &Head, run: &Run, supplied: &[bool]) -> Outcome {
        let payload = match run.encode() {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let mut headers = RunMeta::headers_of(run);
        if let Some(ids) = encode_ids(run, supplied) {
            headers.insert(subjects::IDS, ids.as_str());
        }
        let write = Write {
            subject: self.shared.subjects.log(&self.process),
            payload: payload.into(),
            headers,
            expected: self.expect.unwrap_or(head.seq),
        };
        self.shared.writer.write(write).await
    }

    /// The fate of `attempt`, written (maybe) with the expectation `attempt.head.seq`:
    /// the message right after that one on the subject is either our run (it
    /// landed), another message (ours can never land: absent), or none (open).
    async fn fate(&self, attempt: &Attempt) -> journal::Result<Fate> {
        let next = self
            .reader()
            .next_message(&self.process, attempt.head.seq + 1)
            .await?;
        Ok(match next {
            None => Fate::Open,
            Some(m) => match m.decode() {
                Ok(run) if run == attempt.run => Fate::Landed(m.seq),
                _ => Fate::Absent,
            },
        })
    }

    /// Judges every message after the known head (schemas/chain.md): runs of the
    /// chain move the head and teach their ids; foreign messages are reported and
    /// skipped. Returns the sequence of `ours` if it is among them (compared whole:
    /// its entries, place and seal).
    async fn catch_up(&mut self, ours: Option<&Run>) -> journal::Result<Option<u64>> {
        let Some(mut head) = self.head.clone() else {
            return Ok(None);
        };
        // Every message after this one is judged below, its chain runs' ids learnt.
        let judged_after = head.seq;
        let point = ChainPoint {
            next_slot: head.next_slot,
            prev: head.prev,
            seq: head.run_seq,
            keys: head.keys.clone(),
        };
        let mut verifier = LogVerifier::resume(
            self.process.clone(),
            self.shared.trusted(),
            vec![],
            Some(point),
            Some(head.seq),
        );
        let mut found = None;
        while let Some(msg) = self
            .reader()
            .next_message(&self.process, head.seq + 1)
            .await?
        {
            head.seq = msg.seq;
            // What its unsigned header claims, kept as hints if the message is foreign
            // (as a window load keeps every header's): each is checked against its
            // sealed run before it answers anything.
            let claims = decode_ids(&msg.headers);
            let claimed_at = RunMeta::from_headers(msg.seq, &msg.headers)
                .map(|r| r.timestamp_ms)
                .unwrap_or_else(|| (self.shared.clock)());
            match chain::judge(&mut verifier, msg) {
                Judged::Chain { run, lost } => {
                    for f in &lost {
                        self.shared.fault(&self.process, f);
                    }
                    let StoredRun { seq, run, headers } = run;
                    let ts = run.entries.last().map(|e| e.timestamp_ms).unwrap_or(0);
                    // Only ids the signed run itself holds at those slots.
                    for (slot, id) in decode_ids(&headers) {
                        let signed = slot
                            .checked_sub(run.first_slot)
                            .and_then(|i| run.entries.get(i as usize))
                            .is_some_and(|e| e.message_id == id);
                        if signed {
                            self.index.insert(id, Seen { slot, seq }, ts);
                        }
                    }
                    let is_ours = ours.is_some_and(|o| *o == run);
                    head = Head::after(&run, seq);
                    if is_ours {
                        found = Some(seq);
                        break;
                    }
                }
                Judged::Foreign(f) => {
                    if let FaultKind::UntrustedKey(k) = &f.kind {
                        let learned = match self.shared.learn_key(k).await {
                            Ok(learned) => learned,
                            Err(e) => {
                                // Not judged on a failed read: load and judge again.
                                self.head = None;
                                return Err(e);
                            }
                        };
                        if learned {
                            // Not foreign after all: judge it again from a fresh load.
                            self.head = None;
                            return Err(journal::Error::JetStream {
                                op: "catch up",
                                reason: format!("learnt key {k}; reloading the head"),
                            });
                        }
                    }
                    self.index.insert_hints(f.seq, claims, claimed_at);
                    self.shared.fault(&self.process, &f)
                }
            }
        }
        if let Some(indexed) = &mut self.indexed {
            indexed.advance(judged_after, head.seq, head.next_slot);
        }
        self.head = Some(head);
        Ok(found)
    }

    async fn answer_duplicate(&self, job: Job, seen: Seen) {
        Metrics::bump(&self.shared.metrics.duplicates);
        let stored = match self.reader().message_at(&self.process, seen.seq).await {
            Ok(Some(m)) => m
                .decode()
                .map_err(|e| format!("its run does not decode: {e}")),
            Ok(None) => Err("its run is gone from the log".to_string()),
            Err(e) => Err(format!("its run cannot be read now: {e}")),
        };
        match stored {
            Ok(run) => {
                let index = seen.slot.saturating_sub(run.first_slot) as usize;
                let tree = run.tree();
                if job.mode == Mode::RemoteConfirmation {
                    // A duplicate promises what the mode promises: the remote has it.
                    self.shared
                        .confirm_remote(Arc::new((run, tree)), vec![(job, index, true)]);
                } else {
                    job.reply.receipt(&run, &tree, index, true, true).await;
                }
            }
            Err(why) => {
                job.reply
                    .refuse(Refusal::new(
                        ErrorCode::Unavailable,
                        format!(
                            "message id already scheduled at slot {}, but {why}",
                            seen.slot
                        ),
                    ))
                    .await
            }
        }
    }
}

async fn refuse_all(jobs: &[Job], answered: &[bool], code: ErrorCode, message: &str) {
    for (job, early) in jobs.iter().zip(answered) {
        if !early {
            job.reply
                .refuse(Refusal::new(code, message.to_string()))
                .await;
        }
    }
}

/// `Ts-Ids`: base64 of MessagePack `[[slot, id], ...]` for the client-supplied ids.
fn encode_ids(run: &Run, supplied: &[bool]) -> Option<String> {
    let pairs: Vec<(u64, &str)> = run
        .entries
        .iter()
        .zip(supplied)
        .filter(|(_, s)| **s)
        .map(|(e, _)| (e.slot, e.message_id.as_str()))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let bytes = rmp_serde::to_vec(&pairs).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Position in the run and whether the request repeats an id of the same batch.
fn position(d: Decision) -> (usize, bool) {
    match d {
        Decision::Assign(i) => (i, false),
        Decision::SameAs(i) => (i, true),
        Decision::Duplicate(_) | Decision::Unchecked => (0, true),
    }
}

/// The `[slot, id]` pairs of a `Ts-Ids` header; a malformed header yields none.
pub fn decode_ids(h: &HeaderMap) -> Vec<(u64, String)> {
    h.get(subjects::IDS)
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str())
                .ok()
        })
        .and_then(|b| rmp_serde::from_slice::<Vec<(u64, String)>>(&b).ok())
        .unwrap_or_default()
}
