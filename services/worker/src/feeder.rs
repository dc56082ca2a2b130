//! A group's feeder: reads the assignment log once for the whole group, in stream
//! order, judges every message by the chain rule (schemas/chain.md, the one
//! [`LogVerifier`] the scheduler and `turnstile verify` use), and hands out each
//! assignment of a run that verifies as one job on the group's work stream. A message
//! that does not verify is a recorded fault, never a job.
//!
//! One feeder a group at a time: every instance joins the ownership group
//! `feed-<group>` (one partition); the holder feeds. Its progress is a checkpoint in
//! the workers bucket — the stream sequence it has fed through (`feed.<group>`) and,
//! per process, where the chain stands (`feed.<group>.<process>`) — written every
//! [`CHECKPOINT_EVERY`] once every job before it is stored, each key by compare-and-set
//! on the revision the feeder read or wrote (a feeder that lost its lease and wakes up
//! is fenced off). A feeder that takes over resumes from the checkpoint; jobs fed
//! after it are handed out again under the same `Nats-Msg-Id` (`<group>/<process>:<slot>`), and
//! the work stream drops them as duplicates (ARCHITECTURE.md "Workers").

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, publish::PublishAck};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use journal::chain::{judge, Judged};
use journal::reader::{LogMessage, LogReader};
use journal::subjects::Subjects;
use protocol::verify::{check_run, ChainPoint, LogVerifier, TrustedKeys};
use protocol::{Hash32, ProcessId};

use crate::job::{partition_of, FaultEvent, Job, PARTITIONS};
use crate::{Error, Result};

/// How often the feeder writes its checkpoint.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A job publish's acknowledgement.
type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::result::Result<
                    PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

/// How often a feed looks whether its connection has reconnected.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);
/// Job publishes awaiting their acknowledgement at most.
const IN_FLIGHT: usize = 4096;

/// Log messages read ahead of the one being fed, so that processes met for the first
/// time are loaded concurrently.
const LOOK_AHEAD: usize = 256;

/// A log message made ready to feed: its stream sequence and — none for a message
/// the group does not serve — the process, the message and, for a process met for
/// the first time, its loaded state.
type Admitted = (u64, Option<(ProcessId, LogMessage, Option<Fed>)>);

/// Which processes a group serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serves {
    /// Every process.
    All,
    /// These processes.
    List(Vec<ProcessId>),
    /// Processes whose id starts with this.
    Prefix(String),
}

impl Serves {
    /// Whether the group serves `p`.
    pub fn covers(&self, p: &ProcessId) -> bool {
        match self {
            Serves::All => true,
            Serves::List(l) => l.contains(p),
            Serves::Prefix(x) => p.as_str().starts_with(x.as_str()),
        }
    }

    /// The log subjects to read for it.
    pub fn filters(&self, subjects: &Subjects) -> Vec<String> {
        match self {
            Serves::List(l) => l.iter().map(|p| subjects.log(p)).collect(),
            Serves::All | Serves::Prefix(_) => vec![subjects.log_all()],
        }
    }
}

/// Where a group starts reading the log when it is first created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The log's end then: only what is scheduled from now on.
    New,
    /// The log's beginning: every assignment ever made, too.
    Start,
}

/// A process's place in the feed, as checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPoint {
    /// The slot the next run must start at.
    pub next_slot: u64,
    /// Chain hash the next run links to (hex).
    pub prev: String,
    /// Stream sequence of the chain's last run (0: none).
    pub chain_seq: u64,
    /// The key set of the chain's last run.
    #[serde(default)]
    pub keys: Option<Vec<String>>,
    /// Stream sequence of the last message of the subject fed (chain or foreign).
    pub last_seq: u64,
}

impl ProcessPoint {
    fn of(v: &LogVerifier) -> Option<ProcessPoint> {
        let p = v.point()?;
        Some(ProcessPoint {
            next_slot: p.next_slot,
            prev: hex::encode(p.prev.0),
            chain_seq: p.seq,
            keys: p.keys.clone(),
            last_seq: v.last_seq().unwrap_or(0),
        })
    }

    fn verifier(&self, process: &ProcessId, trusted: &TrustedKeys) -> Option<LogVerifier> {
        let mut prev = [0u8; 32];
        hex::decode_to_slice(&self.prev, &mut prev).ok()?;
        let point = ChainPoint {
            next_slot: self.next_slot,
            prev: Hash32(prev),
            seq: self.chain_seq,
            keys: self.keys.clone(),
        };
        Some(LogVerifier::resume(
            process.clone(),
            trusted.clone(),
            vec![],
            Some(point),
            Some(self.last_seq),
        ))
    }
}

/// What the feeder counts (STATS).
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Jobs handed out.
    pub jobs: AtomicU64,
    /// Runs that verified.
    pub runs: AtomicU64,
    /// Messages that did not (never jobs).
    pub foreign: AtomicU64,
    /// Stream sequence fed through (checkpointed).
    pub checkpoint: AtomicU64,
    /// Process checkpoints read at the feed's start (one read for all).
    pub preloaded: AtomicU64,
    /// Processes met without a checkpoint, whose place was read from the log.
    pub loads: AtomicU64,
    /// Reads of the log those loads made (two for most: the fast path).
    pub log_reads: AtomicU64,
}

/// When the published keys were last read again, and the key ids read for.
#[derive(Debug, Default)]
pub struct KeysRead {
    last: Option<tokio::time::Instant>,
    /// Key ids a read was made for (bounded): a run sealed by a key id not yet looked
    /// up reads the keys at once, whatever the time since the last read — judging the
    /// run foreign for want of a read would be final.
    looked_up: HashSet<String>,
}

/// Key ids remembered as looked up, at most.
const LOOKED_UP_MAX: usize = 4096;

/// What a feeder needs.
#[derive(Clone)]
pub struct Feed {
    /// The group.
    pub group: String,
    /// Which processes.
    pub serves: Serves,
    /// Where a new group starts.
    pub from: From,
    /// Subjects.
    pub subjects: Subjects,
    /// JetStream.
    pub js: jetstream::Context,
    /// The workers bucket.
    pub kv: kv::Store,
    /// The keys the log must be sealed by (pinned) — or, with `keys`, the scheduler's
    /// published keys as last read.
    pub trusted: Arc<std::sync::RwLock<TrustedKeys>>,
    /// The published keys' bucket: read again when a run is sealed by a key not yet
    /// trusted (a scheduler started after the group, a new key); none: pinned keys.
    pub keys: Option<kv::Store>,
    /// When the keys were last read again, and for which key ids.
    pub keys_read: Arc<std::sync::Mutex<KeysRead>>,
    /// Bumped each time the keys are read again: the feed makes every verifier it
    /// holds trust the new set.
    pub trusted_generation: Arc<AtomicU64>,
    /// Counters.
    pub stats: Arc<FeedStats>,
}

fn global_key(group: &str) -> String {
    format!("feed.{group}")
}

fn process_key(group: &str, p: &ProcessId) -> String {
    format!("feed.{group}.{p}")
}

struct Fed {
    verifier: LogVerifier,
    /// KV revision of the process's key (none: not written yet).
    revision: Option<u64>,
    dirty: bool,
    /// Bumped at every change: a checkpoint clears `dirty` only if nothing changed
    /// since it took its snapshot.
    generation: u64,
}

/// What a checkpoint in flight reports back: the new revision of each process key it
/// wrote (with the generation it wrote), the sequence fed through and the global key's
/// new revision.
type Written = Result<(Vec<(ProcessId, u64, u64)>, u64, u64)>;

impl Feed {
    /// Feeds until `stop` fires or something fails (the caller starts it again from
    /// the checkpoint while it holds the lease).
    pub async fn run(&self, stop: tokio_util::sync::CancellationToken) -> Result<()> {
        let (mut fed_through, mut global_rev, resumed) = self.start_point().await?;
        self.stats.checkpoint.store(fed_through, Ordering::Relaxed);
        info!(group = %self.group, from = fed_through + 1, "feeding");
        let reader = LogReader::open(self.js.clone(), self.subjects.clone()).await?;
        let mut log = self
            .js
            .get_stream(self.subjects.log_stream())
            .await
            .map_err(|e| Error::nats("open the log", e))?;
        // Resumed from a checkpoint: what the log held when this feed started may have
        // been handed out already, after the checkpoint (by an earlier feed of this
        // instance, or by a feeder before us that died or lost its lease). The work
        // stream drops such a copy only within its duplicate window; a copy handed out
        // later (every instance was down longer) would run as a first delivery. So
        // each of those jobs is marked ([`crate::job::REFED`]) and looked up in the
        // results before it runs. Messages the log receives from now on are ours alone
        // to hand out (a predecessor's late copies of them fall within the window).
        let refeed_through = if resumed {
            log.info()
                .await
                .map_err(|e| Error::nats("log info", e))?
                .state
                .last_sequence
        } else {
            0
        };
        let name = format!("feed-{}-{}", self.group, uuid::Uuid::new_v4().simple());
        let filters = self.serves.filters(&self.subjects);
        let mut config = consumer::pull::OrderedConfig {
            name: Some(name.clone()),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: fed_through + 1,
            },
            ..Default::default()
        };
        if filters.len() == 1 {
            config.filter_subject = filters[0].clone();
        } else {
            config.filter_subjects = filters;
        }
        let consumer = log
            .create_consumer(config)
            .await
            .map_err(|e| Error::nats("read the log", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| Error::nats("read the log", e))?;
        // Every checkpointed process at once (one read), rather than a read each when
        // the feed meets it.
        let mut procs = self.preload().await?;
        // Look-ahead: a process met for the first time is loaded (a few reads) while
        // the messages before it are fed; the feed itself stays in stream order.
        let mut requested: HashSet<ProcessId> = procs.keys().cloned().collect();
        let mut pipeline = messages
            .map(|m| self.admit(m, &reader, &mut requested))
            .buffered(LOOK_AHEAD);
        let mut trusted_seen = self.trusted_generation.load(Ordering::Acquire);
        let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        let mut seen_through = fed_through;
        let mut checkpointing: Option<tokio::task::JoinHandle<Written>> = None;
        let mut never = tokio::spawn(std::future::pending::<Written>());
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The log reader is an ordered consumer: a restarted server has lost it, and
        // the client would notice only after two missed heartbeats (30 s and more, no
        // job handed out meanwhile). So a reconnect ends this feed: the next resumes
        // from the checkpoint (what was fed since is handed out again and dropped by
        // the work stream's duplicate window).
        let connection = self.js.client().statistics();
        let connects = connection.connects.load(Ordering::Relaxed);
        let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = reconnect_check.tick() => {
                    if connection.connects.load(Ordering::Relaxed) != connects {
                        break Err(Error::nats("read the log", "reconnected: the reader may be gone with the server"));
                    }
                }
                _ = tick.tick(), if checkpointing.is_none() => {
                    if seen_through > fed_through {
                        checkpointing = Some(self.start_checkpoint(&mut acks, &procs, seen_through, global_rev));
                    }
                }
                written = async { checkpointing.as_mut().map(|h| h as &mut _).unwrap_or(&mut never).await }, if checkpointing.is_some() => {
                    checkpointing = None;
                    match written {
                        Ok(Ok((revisions, through, rev))) => {
                            for (p, generation, revision) in revisions {
                                if let Some(f) = procs.get_mut(&p) {
                                    f.revision = Some(revision);
                                    if f.generation == generation {
                                        f.dirty = false;
                                    }
                                }
                            }
                            global_rev = rev;
                            fed_through = through;
                            self.stats.checkpoint.store(fed_through, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => break Err(e),
                        Err(e) => break Err(Error::nats("checkpoint", e)),
                    }
                }
                Some(ack) = acks.next(), if !acks.is_empty() => {
                    if let Err(e) = ack {
                        break Err(Error::nats("hand out a job", e));
                    }
                }
                item = pipeline.next() => {
                    let (seq, item) = match item {
                        Some(Ok(item)) => item,
                        Some(Err(e)) => break Err(e),
                        None => break Err(Error::nats("read the log", "the log reader ended")),
                    };
                    seen_through = seq;
                    let Some((process, msg, loaded)) = item else {
                        continue;
                    };
                    // Keys read again since: every verifier trusts the new set.
                    let generation = self.trusted_generation.load(Ordering::Acquire);
                    if generation != trusted_seen {
                        trusted_seen = generation;
                        let trusted = self.trusted();
                        for f in procs.values_mut() {
                            f.verifier.set_trusted(trusted.clone());
                        }
                    }
                    if let Some(mut fed) = loaded {
                        fed.verifier.set_trusted(self.trusted());
                        procs.insert(process.clone(), fed);
                    }
                    if let Err(e) = self.feed_one(&reader, &mut procs, &mut acks, process, msg, refeed_through).await {
                        break Err(e);
                    }
                    // Bound what waits for its acknowledgement.
                    let mut failed = None;
                    while acks.len() >= IN_FLIGHT && failed.is_none() {
                        if let Some(Err(e)) = acks.next().await {
                            failed = Some(Error::nats("hand out a job", e));
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                }
            }
        };
        never.abort();
        if let Some(h) = checkpointing {
            h.abort();
        }
        // The ordered consumer goes with its stream; delete it now rather than after
        // the server's inactivity threshold.
        drop(pipeline);
        let _ = log.delete_consumer(&name).await;
        result
    }

    /// A delivered log message made ready to feed: which process it is (none: not
    /// one the group serves) and, the first time a process is met, its state loaded
    /// (every checkpoint was preloaded: a process met for the first time has none).
    fn admit<'a>(
        &'a self,
        m: std::result::Result<jetstream::Message, consumer::pull::OrderedError>,
        reader: &'a LogReader,
        requested: &mut HashSet<ProcessId>,
    ) -> impl std::future::Future<Output = Result<Admitted>> + 'a {
        let ready = (|| -> Result<(u64, Option<Delivered>)> {
            let m = m.map_err(|e| Error::nats("read the log", e))?;
            let seq = m
                .info()
                .map_err(|e| Error::nats("read the log", e))?
                .stream_sequence;
            let Some(process) = self.subjects.process_of_log(m.subject.as_str()) else {
                return Ok((seq, None));
            };
            if !self.serves.covers(&process) {
                return Ok((seq, None));
            }
            let msg = LogMessage {
                seq,
                headers: m.headers.clone().unwrap_or_default(),
                payload: m.payload.clone(),
            };
            let first = requested.insert(process.clone());
            Ok((seq, Some((process, msg, first))))
        })();
        async move {
            let (seq, item) = ready?;
            let Some((process, msg, first)) = item else {
                return Ok((seq, None));
            };
            if !first {
                return Ok((seq, Some((process, msg, None))));
            }
            self.refresh_keys_for(&process, &msg).await?;
            let fed = self.load(reader, &process, &msg, true).await?;
            Ok((seq, Some((process, msg, Some(fed)))))
        }
    }

    /// Every process checkpoint of the group, read at once (the last value of each
    /// key of `feed.<group>.>`).
    async fn preload(&self) -> Result<HashMap<ProcessId, Fed>> {
        let bucket = self.subjects.workers_bucket();
        let prefix = format!("$KV.{bucket}.feed.{}.", self.group);
        let stream = self
            .js
            .get_stream(format!("KV_{bucket}"))
            .await
            .map_err(|e| Error::nats("open the workers bucket", e))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{prefix}>"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::nats("read the feed checkpoints", e))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut procs = HashMap::new();
        if pending == 0 {
            return Ok(procs);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::nats("read the feed checkpoints", e))?;
        let trusted = self.trusted();
        while pending > 0 {
            let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(m)) => m.map_err(|e| Error::nats("read the feed checkpoints", e))?,
                Ok(None) | Err(_) => {
                    return Err(Error::nats("read the feed checkpoints", "the read stalled"))
                }
            };
            pending = m.info().map(|i| i.pending).unwrap_or(0);
            let Some(name) = m.subject.as_str().strip_prefix(prefix.as_str()) else {
                continue;
            };
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get(journal::subjects::KV_OPERATION))
                .is_some_and(|v| v.as_str() != "PUT");
            let Ok(process) = ProcessId::new(name.to_string()) else {
                continue;
            };
            if deleted {
                continue;
            }
            let revision = m
                .info()
                .map_err(|e| Error::nats("read the feed checkpoints", e))?
                .stream_sequence;
            let verifier = serde_json::from_slice::<ProcessPoint>(&m.payload)
                .ok()
                .and_then(|p| p.verifier(&process, &trusted))
                .ok_or_else(|| {
                    Error::Config(format!("process checkpoint {name} does not parse"))
                })?;
            procs.insert(
                process,
                Fed {
                    verifier,
                    revision: Some(revision),
                    dirty: false,
                    generation: 0,
                },
            );
        }
        self.stats
            .preloaded
            .fetch_add(procs.len() as u64, Ordering::Relaxed);
        Ok(procs)
    }

    /// Reads the published keys again (at most once a second) when the run in `msg`
    /// is sealed by a key not trusted yet. True: the trusted set changed.
    async fn refresh_keys_for(&self, process: &ProcessId, msg: &LogMessage) -> Result<bool> {
        let (Some(keys), Ok(run)) = (&self.keys, msg.decode()) else {
            return Ok(false);
        };
        if run.process != process.as_str() {
            return Ok(false);
        }
        let trusted = self.trusted();
        let untrusted: Vec<&str> = run
            .seal
            .commitments
            .iter()
            .filter(|c| !trusted.contains(&c.key_id))
            .map(|c| c.key_id.as_str())
            .collect();
        let unknown = run.seal.commitments.is_empty() || !untrusted.is_empty();
        if !unknown || !self.may_read_keys(&untrusted) {
            return Ok(false);
        }
        let fresh = journal::keyring::trust(&journal::keyring::fetch(keys).await?);
        if let Ok(mut t) = self.trusted.write() {
            *t = fresh;
        }
        self.trusted_generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// Where the group's feed stands: (fed through, revision of the global key). A
    /// new group is created here, at the log's end or beginning by `from`.
    /// Whether it was there already (`false`: created here, nothing fed before).
    pub(crate) async fn start_point(&self) -> Result<(u64, u64, bool)> {
        let key = global_key(&self.group);
        if let Some(e) = self
            .kv
            .entry(&key)
            .await
            .map_err(|e| Error::nats("read the feed checkpoint", e))?
        {
            if e.operation == kv::Operation::Put {
                let seq = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        Error::Config(format!("feed checkpoint {key} is not a number"))
                    })?;
                return Ok((seq, e.revision, true));
            }
        }
        let start = match self.from {
            From::Start => 0,
            From::New => {
                let mut log = self
                    .js
                    .get_stream(self.subjects.log_stream())
                    .await
                    .map_err(|e| Error::nats("open the log", e))?;
                log.info()
                    .await
                    .map_err(|e| Error::nats("log info", e))?
                    .state
                    .last_sequence
            }
        };
        match self.kv.create(&key, Bytes::from(start.to_string())).await {
            Ok(rev) => {
                info!(group = %self.group, start, "new worker group: feeding from here");
                Ok((start, rev, false))
            }
            // Another instance created it first: take theirs.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Box::pin(self.start_point()).await
            }
            Err(e) => Err(Error::nats("create the feed checkpoint", e)),
        }
    }

    /// The keys trusted now.
    fn trusted(&self) -> TrustedKeys {
        self.trusted.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Whether the published keys may be read again now for a run sealed by
    /// `untrusted` key ids: at once for a key id never looked up (a new scheduler's
    /// key), else once a second at most (a flood of runs sealed by one unknown key
    /// costs one read a second).
    fn may_read_keys(&self, untrusted: &[&str]) -> bool {
        let Ok(mut read) = self.keys_read.lock() else {
            return false;
        };
        let now = tokio::time::Instant::now();
        let new_id = untrusted.iter().any(|id| !read.looked_up.contains(*id))
            && read.looked_up.len() < LOOKED_UP_MAX;
        if !new_id
            && read
                .last
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        for id in untrusted {
            if read.looked_up.len() < LOOKED_UP_MAX {
                read.looked_up.insert((*id).to_string());
            }
        }
        read.last = Some(now);
        true
    }

    /// The verifier of `process` right before stream sequence `seq`: from its
    /// checkpoint (unless `preloaded`: every checkpoint was read at the start and this
    /// process has none), or (none yet) by reading its subject from the start.
    async fn load(
        &self,
        reader: &LogReader,
        process: &ProcessId,
        msg: &LogMessage,
        preloaded: bool,
    ) -> Result<Fed> {
        let seq = msg.seq;
        let key = process_key(&self.group, process);
        let entry = if preloaded {
            None
        } else {
            self.kv
                .entry(&key)
                .await
                .map_err(|e| Error::nats("read a process checkpoint", e))?
        };
        if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) {
            let verifier = serde_json::from_slice::<ProcessPoint>(&e.value)
                .ok()
                .and_then(|p| p.verifier(process, &self.trusted()))
                .ok_or_else(|| Error::Config(format!("process checkpoint {key} does not parse")))?;
            return Ok(Fed {
                verifier,
                revision: Some(e.revision),
                dirty: false,
                generation: 0,
            });
        }
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        if let Some(verifier) = self.fast_load(reader, process, msg).await? {
            return Ok(Fed {
                verifier,
                revision: None,
                dirty: true,
                generation: 1,
            });
        }
        // Otherwise the rule from genesis over the subject's history (judged, never
        // handed out: it lies before the group's place in the log).
        let mut verifier = LogVerifier::from_genesis(process.clone(), self.trusted(), vec![]);
        if seq > 1 {
            let mut earlier = reader.messages(process, 1, Some(seq - 1)).await?;
            while let Some(m) = earlier.next().await {
                let m = m?;
                self.stats.log_reads.fetch_add(1, Ordering::Relaxed);
                if m.seq >= seq {
                    break;
                }
                judge(&mut verifier, m);
            }
        }
        Ok(Fed {
            verifier,
            revision: None,
            dirty: true,
            generation: 1,
        })
    }

    /// The verifier right before the run at `seq`, from at most three reads, when the
    /// run is sealed by a trusted key and either is the subject's first message, or
    /// sits right after the message its signed `prev_seq` names and that message is a
    /// sealed run too (the scheduler wrote it after the chain's head, as its head's
    /// fast path reads it). None: anything else — the caller reads the history.
    async fn fast_load(
        &self,
        reader: &LogReader,
        process: &ProcessId,
        msg: &LogMessage,
    ) -> Result<Option<LogVerifier>> {
        let seq = msg.seq;
        let Ok(run) = msg.decode() else {
            return Ok(None);
        };
        if check_run(&run, process, &self.trusted(), &[]).is_err() {
            return Ok(None);
        }
        let after = run.prev_seq + 1;
        self.stats.log_reads.fetch_add(1, Ordering::Relaxed);
        let next = reader.next_message(process, after.max(1)).await?;
        if next.map(|m| m.seq) != Some(seq) {
            return Ok(None);
        }
        if run.prev_seq == 0 {
            return Ok(Some(LogVerifier::from_genesis(
                process.clone(),
                self.trusted(),
                vec![],
            )));
        }
        self.stats.log_reads.fetch_add(1, Ordering::Relaxed);
        let Some(prev) = reader.message_at(process, run.prev_seq).await? else {
            return Ok(None);
        };
        let Ok(prev_run) = prev.decode() else {
            return Ok(None);
        };
        if check_run(&prev_run, process, &self.trusted(), &[]).is_err() {
            return Ok(None);
        }
        Ok(Some(LogVerifier::resume(
            process.clone(),
            self.trusted(),
            vec![],
            Some(journal::chain::point_after(&prev_run, run.prev_seq)),
            Some(run.prev_seq),
        )))
    }

    async fn feed_one(
        &self,
        reader: &LogReader,
        procs: &mut HashMap<ProcessId, Fed>,
        acks: &mut FuturesUnordered<AckFuture>,
        process: ProcessId,
        msg: LogMessage,
        refeed_through: u64,
    ) -> Result<()> {
        // A run sealed by a key we do not know yet: read the published keys again (at
        // most once a second) before judging it.
        if self.refresh_keys_for(&process, &msg).await? {
            let trusted = self.trusted();
            for f in procs.values_mut() {
                f.verifier.set_trusted(trusted.clone());
            }
        }
        if !procs.contains_key(&process) {
            let fed = self.load(reader, &process, &msg, false).await?;
            procs.insert(process.clone(), fed);
        }
        let Some(fed) = procs.get_mut(&process) else {
            return Ok(());
        };
        if fed.verifier.last_seq().is_some_and(|s| s >= msg.seq) {
            // Fed before the checkpoint we resumed from.
            return Ok(());
        }
        let seq = msg.seq;
        fed.dirty = true;
        fed.generation += 1;
        match judge(&mut fed.verifier, msg) {
            Judged::Chain { run, lost } => {
                for f in lost {
                    self.fault(&process, seq, f.kind.code(), &f.kind.to_string(), true)
                        .await?;
                }
                let partition = partition_of(process.as_str(), PARTITIONS);
                let subject = self.subjects.work(&self.group, partition);
                for e in &run.run.entries {
                    let job = Job::of_entry(&self.group, &process, seq, e);
                    let mut publish = async_nats::jetstream::message::PublishMessage::build()
                        .payload(Bytes::from(job.encode()?))
                        .message_id(job.work_id());
                    if seq <= refeed_through {
                        publish = publish.header(crate::job::REFED, "1");
                    }
                    let ack = self
                        .js
                        .send_publish(subject.clone(), publish)
                        .await
                        .map_err(|e| Error::nats("hand out a job", e))?;
                    acks.push(Box::pin(std::future::IntoFuture::into_future(ack)));
                }
                self.stats
                    .jobs
                    .fetch_add(run.run.entries.len() as u64, Ordering::Relaxed);
                self.stats.runs.fetch_add(1, Ordering::Relaxed);
            }
            Judged::Foreign(f) => {
                self.stats.foreign.fetch_add(1, Ordering::Relaxed);
                warn!(group = %self.group, %process, seq, fault = %f.kind, "a message of the log is not part of the chain: no job");
                self.fault(&process, seq, f.kind.code(), &f.kind.to_string(), false)
                    .await?;
            }
        }
        Ok(())
    }

    async fn fault(
        &self,
        process: &ProcessId,
        seq: u64,
        code: &str,
        detail: &str,
        handed_out: bool,
    ) -> Result<()> {
        let event = FaultEvent {
            group: self.group.clone(),
            process: process.to_string(),
            log_seq: seq,
            code: code.to_string(),
            detail: detail.to_string(),
            handed_out,
        };
        let body = serde_json::to_vec(&event).map_err(|e| Error::Config(e.to_string()))?;
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body))
            .message_id(event.msg_id());
        self.js
            .send_publish(self.subjects.result_fault(&self.group, process), publish)
            .await
            .map_err(|e| Error::nats("record a fault", e))?
            .await
            .map_err(|e| Error::nats("record a fault", e))?;
        Ok(())
    }

    /// Starts a checkpoint through `through` in the background: it waits for every
    /// job handed out so far (taken from `acks`), then writes each changed process's
    /// point and the sequence fed through, each by compare-and-set on the revision
    /// last written (one checkpoint at a time, so those are current).
    fn start_checkpoint(
        &self,
        acks: &mut FuturesUnordered<AckFuture>,
        procs: &HashMap<ProcessId, Fed>,
        through: u64,
        global_rev: u64,
    ) -> tokio::task::JoinHandle<Written> {
        let mut waiting = std::mem::take(acks);
        let points: Vec<(ProcessId, Vec<u8>, Option<u64>, u64)> = procs
            .iter()
            .filter(|(_, f)| f.dirty)
            .filter_map(|(p, f)| {
                let point = ProcessPoint::of(&f.verifier)?;
                let body = serde_json::to_vec(&point).ok()?;
                Some((p.clone(), body, f.revision, f.generation))
            })
            .collect();
        let kv = self.kv.clone();
        let group = self.group.clone();
        tokio::spawn(async move {
            while let Some(ack) = waiting.next().await {
                let _: PublishAck = ack.map_err(|e| Error::nats("hand out a job", e))?;
            }
            let writes: Vec<_> = points
                .into_iter()
                .map(|(p, body, rev, generation)| {
                    let kv = kv.clone();
                    let key = process_key(&group, &p);
                    async move {
                        let r = match rev {
                            Some(rev) => kv.update(&key, Bytes::from(body), rev).await,
                            None => kv.create(&key, Bytes::from(body)).await.map_err(|e| {
                                kv::UpdateError::with_source(kv::UpdateErrorKind::Other, e)
                            }),
                        };
                        r.map(|rev| (p, generation, rev))
                            .map_err(|e| Error::Fenced(format!("{key}: {e}")))
                    }
                })
                .collect();
            let written: Vec<_> = futures::stream::iter(writes)
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_>>()?;
            let key = global_key(&group);
            let rev = kv
                .update(&key, Bytes::from(through.to_string()), global_rev)
                .await
                .map_err(|e| Error::Fenced(format!("{key}: {e}")))?;
            debug!(%group, through, "feed checkpoint");
            Ok((written, through, rev))
        })
    }
}

/// A log message of a process the group serves, and whether the process is met for
/// the first time.
type Delivered = (ProcessId, LogMessage, bool);
