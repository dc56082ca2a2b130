//! One worker instance: fetches jobs of its group from the work stream into its
//! buffer, runs them with the handler, records every outcome in the results stream,
//! keeps the jobs it holds alive (in-progress acknowledgements) and answers
//! introspection.
//!
//! A job is acknowledged in the work stream only after its final outcome is stored in
//! the results stream. A job delivered again (its instance died, an acknowledgement
//! was lost) is first looked up there: if its history already ends in a final state it
//! is acknowledged and not run again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use journal::subjects::Subjects;
use protocol::ProcessId;
use service::Clock;

use crate::buffer::{Buffer, Kind};
use crate::control::Control;
use crate::exec_keys::{self, ExecKeys, Hold, Step};
use crate::handler::{Context, Handler, Outcome};
use crate::job::{backoff, Job, ResultEvent, State};
use crate::{Error, Result};

/// How an instance behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// The group.
    pub group: String,
    /// The buffer's kind.
    pub buffer: Kind,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Attempts before a job is dead.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// An attempt running longer is cancelled and fails.
    pub job_timeout: Duration,
    /// How long the work stream waits for a sign of life before it hands a job to
    /// another instance (the instance signs every third of it for what it holds).
    pub ack_wait: Duration,
    /// On shutdown, how long running jobs may take to finish before they are
    /// cancelled and handed back.
    pub drain: Duration,
    /// The header whose value is a job's merge key (dropbox).
    pub merge_header: String,
    /// `unordered` (any concurrency) or `strict` (a process's jobs one at a time, in
    /// slot order; processes in parallel).
    pub order: Order,
    /// Strict groups: the lease on each of the group's work partitions.
    pub lease: Duration,
    /// Strict groups: replicas of the ownership bucket if this instance creates it.
    pub replicas: usize,
    /// The lease on an execution key: a key held by an instance that died frees this
    /// long after its last renewal (renewed every third of it while its job runs).
    pub exec_key_lease: Duration,
}

/// How a group orders its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Any job of any process may run at any time, on any instance.
    Unordered,
    /// A process's jobs run one at a time, in slot order, across the whole group: each
    /// of the group's 16 work partitions is consumed by the one instance that holds its
    /// lease (the ownership crate), and a failed attempt is retried in place.
    Strict,
}

impl Order {
    /// As the `--ordering` flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            Order::Unordered => "unordered",
            Order::Strict => "strict",
        }
    }
}

/// Which ordering a consumer of the work stream whose filter is `filter` serves
/// `group` with, if it is one of the group's: the group's subjects (unordered) or one
/// of its work partitions (strict). By filter, not by name: group names may contain
/// `-`, and a consumer's name once was ambiguous (`group-a-p1`: group `a-p1`, or group `a`'s partition 1).
pub fn consumer_order(subjects: &Subjects, group: &str, filter: &str) -> Option<Order> {
    if filter == subjects.work_group(group) {
        return Some(Order::Unordered);
    }
    (0..crate::job::PARTITIONS)
        .any(|n| filter == subjects.work(group, n))
        .then_some(Order::Strict)
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Order, String> {
        match s {
            "unordered" => Ok(Order::Unordered),
            "strict" => Ok(Order::Strict),
            _ => Err(format!("ordering {s:?}: strict or unordered")),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            group: "default".into(),
            buffer: Kind::Bounded(256),
            concurrency: 16,
            max_attempts: 5,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            job_timeout: Duration::from_secs(300),
            ack_wait: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            merge_header: "Merge-Key".into(),
            order: Order::Unordered,
            lease: Duration::from_secs(10),
            replicas: 1,
            exec_key_lease: Duration::from_secs(15),
        }
    }
}

/// An instance's life (tezos-workers' statuses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Status {
    /// Starting.
    Launching {
        /// Since (ms).
        since_ms: u64,
    },
    /// Taking and running jobs.
    Running {
        /// Since (ms).
        since_ms: u64,
    },
    /// Stopping: no more jobs taken; finishing or handing back what it holds.
    Closing {
        /// Since (ms).
        since_ms: u64,
    },
    /// Stopped.
    Closed {
        /// Since (ms).
        since_ms: u64,
    },
    /// Stopped by an error.
    Crashed {
        /// Since (ms).
        since_ms: u64,
        /// The error.
        error: String,
    },
}

/// Level of a backlog event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Routine.
    Info,
    /// Worth a look.
    Warn,
    /// Something failed.
    Error,
}

/// One event of an instance's backlog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// When (ms).
    pub at_ms: u64,
    /// How bad.
    pub level: Level,
    /// What.
    pub message: String,
}

/// Events an instance keeps.
pub const BACKLOG: usize = 256;

/// A job as introspection shows it (no body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobView {
    /// `<process>:<slot>`.
    pub id: String,
    /// The message id.
    pub message_id: String,
    /// Body size (bytes).
    pub body_bytes: usize,
    /// Which attempt (1 = first).
    pub attempt: u32,
    /// When it entered the buffer (ms).
    pub pushed_ms: u64,
    /// When it started (ms), if running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
}

/// What `<prefix>.worker.inspect.<instance>` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The instance.
    pub instance: String,
    /// Its group.
    pub group: String,
    /// Its buffer kind.
    pub buffer: String,
    /// Its status.
    pub status: Status,
    /// Jobs waiting in its buffer, oldest first.
    pub pending: Vec<JobView>,
    /// Jobs running.
    pub running: Vec<JobView>,
    /// Its counters.
    pub counts: BTreeMap<&'static str, u64>,
    /// Its recent events, oldest first.
    pub backlog: Vec<Event>,
}

/// A job the instance holds, with its message in the work stream.
#[derive(Clone)]
struct Held {
    job: Arc<Job>,
    msg: Arc<jetstream::Message>,
    attempt: u32,
    pushed_ms: u64,
    /// The work partition it came from.
    partition: u32,
    /// Its execution key (`Err`: a header that is not one).
    exec: Option<Result<exec_keys::Key, String>>,
    /// The connection's connect count when it was delivered: a job held across a
    /// reconnect may have been delivered again elsewhere meanwhile.
    connects: u64,
    /// Delivered within an ack wait of a reconnect (the restarted server may have lost
    /// the record of an earlier delivery), or handed out again by a feeder that
    /// resumed ([`crate::job::REFED`]): its history is read before it runs.
    suspect: bool,
}

impl Held {
    fn view(&self, started_ms: Option<u64>) -> JobView {
        JobView {
            id: self.job.id(),
            message_id: self.job.message_id.clone(),
            body_bytes: self.job.body.len(),
            attempt: self.attempt,
            pushed_ms: self.pushed_ms,
            started_ms,
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct Counts {
    /// Jobs finished.
    pub done: AtomicU64,
    /// Attempts that failed and will be retried.
    pub failed: AtomicU64,
    /// Jobs dead.
    pub dead: AtomicU64,
    /// Jobs merged away.
    pub merged: AtomicU64,
    /// Deliveries skipped because the job's history was already final.
    pub already_final: AtomicU64,
    /// Handler panics caught.
    pub panics: AtomicU64,
    /// Jobs cancelled.
    pub cancelled: AtomicU64,
    /// Messages of the work stream that are not jobs.
    pub malformed: AtomicU64,
    /// Times a job was parked: its execution key was held elsewhere.
    pub key_waits: AtomicU64,
    /// Attempts stopped because their execution key's lease was lost.
    pub keys_lost: AtomicU64,
}

struct State_ {
    status: Status,
    buffer: Buffer<Held>,
    running: BTreeMap<String, (Held, u64, CancellationToken)>,
    backlog: VecDeque<Event>,
    /// Strict order: processes with a job taken by an executor (running or waiting
    /// for its retry).
    busy: std::collections::HashSet<String>,
}

/// A running instance: what its tasks share.
pub struct Instance {
    id: String,
    config: Config,
    subjects: Subjects,
    js: jetstream::Context,
    handler: Arc<dyn Handler>,
    clock: Clock,
    state: Mutex<State_>,
    /// Something was pushed (executors) or popped (the fetcher).
    changed: Notify,
    counts: Counts,
    /// Fires on shutdown: stop fetching.
    closing: CancellationToken,
    /// Fires when running jobs must stop now.
    hard_stop: CancellationToken,
    /// Cancelled jobs and paused queues (the workers bucket, watched).
    control: Mutex<Control>,
    /// The workers bucket, if control is watched.
    kv: Option<async_nats::jetstream::kv::Store>,
    /// Queue-key holds, released as jobs leave the not-yet-started state.
    holds: crate::queue::Holds,
    /// Execution keys (opened when the instance runs).
    exec_keys: std::sync::OnceLock<Arc<ExecKeys>>,
    /// The connect count last seen by a delivery, and when (ms) it was first seen.
    reconnected: Mutex<(u64, u64)>,
    /// Unordered groups: the outcomes being recorded (each its result's publish, its
    /// acknowledgement, then its work message's ack or NAK), waited for on shutdown.
    recording: tokio_util::task::TaskTracker,
    /// Room for more of them ([`RECORDING`]): an executor waits for room.
    recording_room: Arc<tokio::sync::Semaphore>,
}

/// Unordered groups: outcomes an instance records at once (results published, their
/// acknowledgements awaited) while its executors go on to their next jobs.
pub const RECORDING: usize = 4096;

impl Instance {
    /// A new instance `id` of `config.group`.
    pub fn new(
        id: String,
        config: Config,
        subjects: Subjects,
        js: jetstream::Context,
        handler: Arc<dyn Handler>,
        clock: Clock,
        kv: Option<async_nats::jetstream::kv::Store>,
    ) -> Arc<Instance> {
        let now = clock();
        Arc::new(Instance {
            id,
            state: Mutex::new(State_ {
                status: Status::Launching { since_ms: now },
                buffer: Buffer::new(config.buffer),
                running: BTreeMap::new(),
                backlog: VecDeque::new(),
                busy: std::collections::HashSet::new(),
            }),
            config,
            subjects,
            js,
            handler,
            clock,
            changed: Notify::new(),
            counts: Counts::default(),
            closing: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            control: Mutex::new(Control::default()),
            kv,
            holds: crate::queue::Holds::default(),
            exec_keys: std::sync::OnceLock::new(),
            reconnected: Mutex::new((1, now)),
            recording: tokio_util::task::TaskTracker::new(),
            recording_room: Arc::new(tokio::sync::Semaphore::new(RECORDING)),
        })
    }

    /// Applies a change of a control key: a cancelled job that runs here is stopped.
    fn control_changed(&self, key: &str, present: bool) {
        let Ok(mut c) = self.control.lock() else {
            return;
        };
        c.apply(&self.config.group, key, present);
        drop(c);
        // Stop what runs here and is now cancelled. The state is locked with the
        // control released: the executor locks the state, then the control (its
        // buffer scan asks what is paused), so holding both here in the other order
        // froze the instance when a change met a scan (chaos --workers, seed 1).
        let running: Vec<(Arc<Job>, CancellationToken)> = self
            .with(|s| {
                s.running
                    .values()
                    .map(|(h, _, token)| (Arc::clone(&h.job), token.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (job, token) in running {
            if self.is_cancelled(&job) {
                token.cancel();
            }
        }
        self.changed.notify_waiters();
    }

    fn is_cancelled(&self, job: &Job) -> bool {
        self.control
            .lock()
            .is_ok_and(|c| c.is_cancelled(&job.process, job.slot))
    }

    fn is_paused(&self, process: &str) -> bool {
        self.control.lock().is_ok_and(|c| c.is_paused(process))
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its counters.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Stops taking jobs and shuts down (the library's programmatic trigger; SIGTERM
    /// in the binary).
    pub fn trigger_shutdown(&self) {
        self.closing.cancel();
        self.changed.notify_waiters();
    }

    fn with<R>(&self, f: impl FnOnce(&mut State_) -> R) -> Option<R> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    /// Records `message` in the backlog (and the log).
    pub fn record(&self, level: Level, message: String) {
        match level {
            Level::Info => debug!(instance = %self.id, "{message}"),
            Level::Warn | Level::Error => warn!(instance = %self.id, "{message}"),
        }
        let at_ms = (self.clock)();
        self.with(|s| {
            if s.backlog.len() >= BACKLOG {
                s.backlog.pop_front();
            }
            s.backlog.push_back(Event {
                at_ms,
                level,
                message,
            });
        });
    }

    fn set_status(&self, status: Status) {
        self.with(|s| s.status = status);
    }

    /// What introspection shows now.
    pub fn inspect(&self) -> Option<Inspection> {
        let c = &self.counts;
        let counts = BTreeMap::from([
            ("done", c.done.load(Ordering::Relaxed)),
            ("failed", c.failed.load(Ordering::Relaxed)),
            ("dead", c.dead.load(Ordering::Relaxed)),
            ("merged", c.merged.load(Ordering::Relaxed)),
            ("already_final", c.already_final.load(Ordering::Relaxed)),
            ("panics", c.panics.load(Ordering::Relaxed)),
            ("cancelled", c.cancelled.load(Ordering::Relaxed)),
            ("malformed", c.malformed.load(Ordering::Relaxed)),
            ("key_waits", c.key_waits.load(Ordering::Relaxed)),
            ("keys_lost", c.keys_lost.load(Ordering::Relaxed)),
        ]);
        self.with(|s| Inspection {
            instance: self.id.clone(),
            group: self.config.group.clone(),
            buffer: match s.buffer.kind() {
                Kind::Queue => "queue".into(),
                Kind::Bounded(n) => format!("bounded:{n}"),
                Kind::Dropbox => "dropbox".into(),
            },
            status: s.status.clone(),
            pending: s.buffer.iter().map(|p| p.item.view(None)).collect(),
            running: s
                .running
                .values()
                .map(|(h, started, _)| h.view(Some(*started)))
                .collect(),
            counts,
            backlog: s.backlog.iter().cloned().collect(),
        })
    }

    /// Runs the instance until [`Instance::trigger_shutdown`]: fetches, runs, keeps
    /// alive; then drains.
    pub async fn run(self: &Arc<Self>) -> Result<()> {
        let consumer = match self.config.order {
            Order::Unordered => Some(self.consumer().await?),
            Order::Strict => None,
        };
        // Control first: no job starts before the instance knows what is paused and
        // cancelled.
        let watching = self.kv.as_ref().map(|kv| {
            let me = Arc::clone(self);
            let group = self.config.group.clone();
            let bucket = kv.name.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                // Told once, by the first watch that loads the current values; a
                // re-watch replays them over the ones held.
                let mut tx = Some(tx);
                loop {
                    let m = Arc::clone(&me);
                    let r = crate::control::watch(
                        me.js.clone(),
                        bucket.clone(),
                        group.clone(),
                        move |k, present| m.control_changed(k, present),
                        &mut tx,
                    )
                    .await;
                    match r {
                        // Reconnected: the consumer may be gone with the server.
                        Ok(()) => me.record(
                            Level::Info,
                            "control watch: reconnected; watching again".to_string(),
                        ),
                        Err(e) => {
                            me.record(Level::Warn, format!("control watch: {e}; again in 1 s"));
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
            (task, rx)
        });
        let watching = match watching {
            Some((task, rx)) => match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(Ok(())) => Some(task),
                _ => {
                    task.abort();
                    return Err(Error::nats(
                        "load job control",
                        "the paused queues and cancelled jobs could not be read within 30 s",
                    ));
                }
            },
            None => None,
        };
        let following = self.open_exec_keys().await?;
        self.set_status(Status::Running {
            since_ms: (self.clock)(),
        });
        self.record(Level::Info, "running".into());
        let tasks = tokio_util::task::TaskTracker::new();
        for _ in 0..self.config.concurrency.max(1) {
            let me = Arc::clone(self);
            tasks.spawn(async move { me.execute_loop().await });
        }
        let me = Arc::clone(self);
        let keepalive = tokio::spawn(async move { me.keep_alive().await });
        let mut leases = Vec::new();
        let mut membership = None;
        let fetched = match consumer {
            Some(consumer) => self.fetch_loop(consumer).await,
            None => match self.strict_loop().await {
                Ok((m, held)) => {
                    membership = Some(m);
                    leases = held;
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        // Closing: stop fetching (done), hand back what waits at once, give the
        // running jobs their drain time, then cancel them.
        self.set_status(Status::Closing {
            since_ms: (self.clock)(),
        });
        self.closing.cancel();
        self.changed.notify_waiters();
        let waiting = self.with(|s| s.buffer.drain()).unwrap_or_default();
        let handed_back = waiting.len();
        for p in waiting {
            let _ = p.item.msg.ack_with(AckKind::Nak(None)).await;
        }
        self.record(
            Level::Info,
            format!("closing: {handed_back} waiting jobs handed back"),
        );
        tasks.close();
        if tokio::time::timeout(self.config.drain, tasks.wait())
            .await
            .is_err()
        {
            self.record(
                Level::Warn,
                "running jobs did not finish within the drain time: cancelled and handed back"
                    .into(),
            );
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        }
        // Every outcome still being recorded is stored and its message acked (or
        // handed back) before the instance is closed: each ends within the publish
        // acknowledgement's timeout.
        self.recording.close();
        self.recording.wait().await;
        keepalive.abort();
        // Strict order: the partitions are released only now that nothing of them
        // runs here any more, so their next holder cannot overtake a job of ours.
        drop(leases);
        if let Some(m) = membership {
            let _ = m.leave().await;
        }
        if let Some(w) = watching {
            w.abort();
        }
        following.abort();
        let now = (self.clock)();
        match &fetched {
            Ok(()) => self.set_status(Status::Closed { since_ms: now }),
            Err(e) => self.set_status(Status::Crashed {
                since_ms: now,
                error: e.to_string(),
            }),
        }
        fetched
    }

    async fn consumer(&self) -> Result<consumer::PullConsumer> {
        self.work_consumer(
            consumer_name(&self.config.group),
            format!("turnstile worker group {}", self.config.group),
            self.subjects.work_group(&self.config.group),
        )
        .await
    }

    /// The durable pull consumer `name` of the work stream over `filter` (created if
    /// missing), with the group's ack wait and explicit acks.
    async fn work_consumer(
        &self,
        name: String,
        description: String,
        filter: String,
    ) -> Result<consumer::PullConsumer> {
        let stream = self
            .js
            .get_stream(self.subjects.work_stream())
            .await
            .map_err(|e| Error::nats("open the work stream", e))?;
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(description),
            filter_subject: filter.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_ack_pending: 100_000,
            max_deliver: -1,
            ..Default::default()
        };
        let mut consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| Error::nats("open a consumer of the work stream", e))?;
        // A consumer of that name that is there already is returned as it is: one
        // over other subjects is not ours to consume (it would hand us another
        // group's jobs and starve ours).
        let info = consumer
            .info()
            .await
            .map_err(|e| Error::nats("read a consumer of the work stream", e))?;
        if info.config.filter_subject != filter {
            return Err(Error::Config(format!(
                "the work stream's consumer {name} consumes {:?}, not {filter:?}: it is not this group's; remove it (nats consumer rm) if nothing uses it",
                info.config.filter_subject
            )));
        }
        Ok(consumer)
    }

    /// Strict order: holds some of the group's work partitions (the ownership crate
    /// balances them over the live instances) and consumes each held one alone. Runs
    /// until closing; returns the membership and the leases still held (released by
    /// the caller once the running jobs are done).
    async fn strict_loop(
        self: &Arc<Self>,
    ) -> Result<(ownership::Membership, Vec<ownership::Lease>)> {
        let group = format!("work-{}", self.config.group);
        let mut config =
            ownership::Config::new(&group, crate::job::PARTITIONS, self.config.lease, &self.id)?;
        config.subjects = self.subjects.clone();
        config.replicas = self.config.replicas;
        let mut membership = ownership::Membership::join(self.js.clone(), config).await?;
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = self.closing.cancelled() => break,
                lease = membership.next_lease() => {
                    let Some(lease) = lease else { break };
                    let me = Arc::clone(self);
                    tasks.spawn(async move { me.partition_loop(lease).await });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        let mut held = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(lease)) = r {
                held.push(lease);
            }
        }
        Ok((membership, held))
    }

    /// Consumes one work partition while its lease is held. On losing it: stops
    /// fetching, hands back (in stream order) what of it waits here, waits until
    /// nothing of it runs here, then lets the lease go. On closing: hands back what
    /// waits and returns the lease, still held, to be released after the drain.
    async fn partition_loop(self: Arc<Self>, lease: ownership::Lease) -> Option<ownership::Lease> {
        let n = lease.partition();
        self.record(Level::Info, format!("work partition {n}: taken"));
        let consumer = loop {
            match self.partition_consumer(n).await {
                Ok(c) => break c,
                Err(e) => {
                    // A consumer of our name that is not ours needs the operator: said
                    // as an error, and asked again less often.
                    let (level, wait) = match e {
                        Error::Config(_) => (Level::Error, Duration::from_secs(10)),
                        _ => (Level::Warn, Duration::from_secs(1)),
                    };
                    self.record(
                        level,
                        format!("work partition {n}: {e}; again in {} s", wait.as_secs()),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = lease.lost() => return None,
                        _ = self.closing.cancelled() => return Some(lease),
                    }
                }
            }
        };
        let stop = CancellationToken::new();
        let (s2, lost, closing) = (stop.clone(), lease.cancellation(), self.closing.clone());
        let watcher = tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => {}
                _ = closing.cancelled() => {}
            }
            s2.cancel();
        });
        let _ = self.fetch_from(consumer, &stop).await;
        watcher.abort();
        let waiting = self
            .with(|s| s.buffer.remove_where(|h| h.partition == n))
            .unwrap_or_default();
        let handed_back = waiting.len();
        for h in waiting {
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
        }
        if self.closing.is_cancelled() {
            return Some(lease);
        }
        // Also jobs an executor took that are not running yet (taking an execution
        // key): one parked meanwhile is back in the buffer, handed back below.
        while self
            .with(|s| {
                s.running.values().any(|(h, _, _)| h.partition == n)
                    || s.busy
                        .iter()
                        .any(|p| crate::job::partition_of(p, crate::job::PARTITIONS) == n)
            })
            .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for h in self
            .with(|s| s.buffer.remove_where(|h| h.partition == n))
            .unwrap_or_default()
        {
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
        }
        self.record(
            Level::Info,
            format!("work partition {n}: given up ({handed_back} waiting jobs handed back)"),
        );
        None
    }

    async fn partition_consumer(&self, n: u32) -> Result<consumer::PullConsumer> {
        self.work_consumer(
            partition_consumer_name(&self.config.group, n),
            format!(
                "turnstile worker group {} (strict), partition {n}",
                self.config.group
            ),
            self.subjects.work(&self.config.group, n),
        )
        .await
    }

    async fn fetch_loop(&self, consumer: consumer::PullConsumer) -> Result<()> {
        self.fetch_from(consumer, &self.closing).await
    }

    /// Fetches from `consumer` into the buffer as it has room, until `stop`.
    async fn fetch_from(
        &self,
        consumer: consumer::PullConsumer,
        stop: &CancellationToken,
    ) -> Result<()> {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let room = self.with(|s| s.buffer.room()).unwrap_or(0);
            // A bounded buffer's jobs whose outcomes are still being recorded (not
            // yet acknowledged) count against its bound: what the instance holds
            // unacknowledged is at most the bound plus what runs.
            let room = match self.config.buffer {
                Kind::Bounded(_) => room.saturating_sub(self.recording_now()),
                Kind::Queue | Kind::Dropbox => room,
            };
            if room == 0 {
                tokio::select! {
                    _ = self.changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            }
            let want = room.min(256);
            let batch = consumer
                .fetch()
                .max_messages(want)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failures += 1;
                    self.record(Level::Warn, format!("fetch: {e}"));
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10))))
                        .await;
                    continue;
                }
            };
            failures = 0;
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) => self.take(m).await,
                    Err(e) => {
                        self.record(Level::Warn, format!("fetch: {e}"));
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// A delivered message into the buffer.
    async fn take(&self, m: jetstream::Message) {
        let attempt = m
            .info()
            .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1);
        let job = match Job::decode(&m.payload) {
            Ok(j) if j.group == self.config.group => j,
            Ok(j) => {
                self.counts.malformed.fetch_add(1, Ordering::Relaxed);
                self.record(
                    Level::Error,
                    format!("a job of group {} on our subject: dropped", j.group),
                );
                let _ = m.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                self.counts.malformed.fetch_add(1, Ordering::Relaxed);
                self.record(
                    Level::Error,
                    format!("a message on {} is not a job ({e}): dropped", m.subject),
                );
                let _ = m.ack_with(AckKind::Term).await;
                return;
            }
        };
        let key = if self.config.buffer == Kind::Dropbox {
            job.header(&self.config.merge_header).map(str::to_string)
        } else {
            None
        };
        let (connects, suspect) = self.delivered_since_reconnect();
        let suspect = suspect
            || m.headers
                .as_ref()
                .is_some_and(|h| h.get(crate::job::REFED).is_some());
        let partition = crate::job::partition_of(&job.process, crate::job::PARTITIONS);
        let exec = exec_keys::key_of(&job);
        let held = Held {
            job: Arc::new(job),
            msg: Arc::new(m),
            attempt,
            pushed_ms: (self.clock)(),
            partition,
            exec,
            connects,
            suspect,
        };
        let now = held.pushed_ms;
        debug!(job = %held.job.id(), key = ?key, headers = ?held.job.headers, "taken");
        let new_slot = held.job.slot;
        // Keep the newest: the new job stays (in the old one's place), the old one is
        // merged away into it.
        let away = self
            .with(|s| s.buffer.push(held, key, now, |old, new| (new, old)))
            .flatten();
        self.changed.notify_waiters();
        if let Some(old) = away {
            // A job handed out again may be final already (done before a crash): its
            // history is not rewritten with a `merged` after its end.
            if old.suspect || old.attempt > 1 {
                if let Ok(Some(ev)) = self.last_result(&old.job).await {
                    if ev.state.is_final() {
                        self.counts.already_final.fetch_add(1, Ordering::Relaxed);
                        let _ = old.msg.ack().await;
                        return;
                    }
                }
            }
            let kept = Some(new_slot);
            let mut ev = self.event(&old, State::Merged);
            ev.merged_into = kept;
            if self.store_result(&ev).await.is_ok() {
                self.release_queue_key(&old.job).await;
                self.counts.merged.fetch_add(1, Ordering::Relaxed);
                let _ = old.msg.ack().await;
            }
        }
    }

    async fn execute_loop(self: Arc<Self>) {
        loop {
            // The oldest job whose queue is not paused (a cancelled one goes anyway:
            // it only needs recording).
            let strict = self.config.order == Order::Strict;
            let keys = self.exec_keys.get();
            let next = self
                .with(|s| {
                    let State_ { buffer, busy, .. } = s;
                    // Strict order: a job waiting for its execution key holds back
                    // the later jobs of its process.
                    let mut blocked = std::collections::HashSet::new();
                    let p = buffer.pop_first(|h| {
                        if blocked.contains(&h.job.process) {
                            return false;
                        }
                        let ready = (!self.is_paused(&h.job.process) || self.is_cancelled(&h.job))
                            && !(strict && busy.contains(&h.job.process));
                        if ready && !keys.is_none_or(|k| k.may_start(h.exec.as_ref())) {
                            if strict {
                                blocked.insert(h.job.process.clone());
                            }
                            return false;
                        }
                        ready
                    });
                    if let (true, Some(p)) = (strict, &p) {
                        busy.insert(p.item.job.process.clone());
                    }
                    p
                })
                .flatten();
            let Some(p) = next else {
                if self.closing.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = self.changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            };
            self.changed.notify_waiters();
            let process = p.item.job.process.clone();
            self.execute(p.item).await;
            if strict {
                self.with(|s| s.busy.remove(&process));
                self.changed.notify_waiters();
            }
        }
    }

    /// The job leaves its not-yet-started state: its queue key's hold, if it is still
    /// the job's, goes (crate::queue).
    async fn release_queue_key(&self, job: &Job) {
        if let Err(e) = self.holds.release(&self.js, &self.subjects, job).await {
            self.record(
                Level::Warn,
                format!("{}: queue key not released: {e}", job.id()),
            );
        }
    }

    /// Opens the execution keys and follows their bucket (the task is returned).
    async fn open_exec_keys(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>> {
        let keys = ExecKeys::open(
            &self.js,
            &self.subjects,
            self.config.exec_key_lease,
            self.config.replicas,
            &self.id,
        )
        .await?;
        let _ = self.exec_keys.set(Arc::clone(&keys));
        let me = Arc::clone(self);
        Ok(tokio::spawn(
            keys.follow(move || me.changed.notify_waiters()),
        ))
    }

    /// Takes `h`'s execution key for an attempt: `Some(None)` without a key,
    /// `Some(Some(hold))` taken; `None` when the job is not to run now: parked (held
    /// elsewhere) or recorded dead (a header that is not a key).
    async fn take_key(self: &Arc<Self>, h: &Held) -> Option<Option<Hold>> {
        let key = match &h.exec {
            None => return Some(None),
            Some(Err(reason)) => {
                // Dead without running: no longer queued either.
                self.release_queue_key(&h.job).await;
                self.finish(h, Outcome::Fatal(reason.clone()), (self.clock)(), 0)
                    .await;
                return None;
            }
            Some(Ok(key)) => key,
        };
        let why = match self.exec_keys.get() {
            Some(keys) => {
                let note = format!("{} {} attempt {}", h.job.group, h.job.id(), h.attempt);
                match keys.acquire(key, &note).await {
                    Step::Held(hold) => return Some(Some(hold)),
                    Step::Busy(why) => why,
                    Step::Failed(why) => {
                        self.record(
                            Level::Warn,
                            format!("{}: execution key: {why}; tried again", h.job.id()),
                        );
                        why
                    }
                }
            }
            None => "execution keys not open".into(),
        };
        self.counts.key_waits.fetch_add(1, Ordering::Relaxed);
        debug!(job = %h.job.id(), key = %key.key, "waits for its execution key: {why}");
        self.park(h.clone()).await;
        None
    }

    /// Puts a job whose execution key is held elsewhere back at the front of the
    /// buffer (held, kept alive, passed over until the key frees); handed back if the
    /// instance is closing.
    async fn park(&self, h: Held) {
        let merge = (self.config.buffer == Kind::Dropbox)
            .then(|| h.job.header(&self.config.merge_header).map(str::to_string))
            .flatten();
        let pushed = h.pushed_ms;
        let closing = &self.closing;
        let back = self
            .with(|s| {
                // Under the lock: the closing drain either took it or is not yet due.
                if closing.is_cancelled() {
                    Some(h)
                } else {
                    s.buffer.put_back(h, merge, pushed);
                    None
                }
            })
            .flatten();
        if let Some(h) = back {
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
        }
        self.changed.notify_waiters();
    }

    /// After an attempt: lets its execution key go; an attempt whose lease was lost
    /// while it ran (it was cancelled then) has failed, whatever its handler said.
    async fn release_key(
        &self,
        h: &Held,
        key: Option<Hold>,
        link: Option<tokio::task::JoinHandle<()>>,
        outcome: Outcome,
    ) -> Outcome {
        if let Some(l) = link {
            l.abort();
        }
        let Some(key) = key else {
            return outcome;
        };
        let (name, token) = (key.fencing().key.clone(), key.fencing().token);
        let held = key.release().await;
        self.changed.notify_waiters();
        if held {
            return outcome;
        }
        self.counts.keys_lost.fetch_add(1, Ordering::Relaxed);
        let reason = format!(
            "execution key {name:?}: the lease (token {token}) was lost while it ran; stopped"
        );
        self.record(Level::Error, format!("{}: {reason}", h.job.id()));
        Outcome::Failed(reason)
    }

    fn event(&self, h: &Held, state: State) -> ResultEvent {
        ResultEvent::of(&h.job, state, h.attempt, (self.clock)(), &self.id)
    }

    async fn store_result(&self, ev: &ResultEvent) -> Result<()> {
        let process =
            ProcessId::new(ev.process.clone()).map_err(|e| Error::MalformedJob(e.to_string()))?;
        let subject = self.subjects.result(&ev.group, &process, ev.slot);
        let body = serde_json::to_vec(ev).map_err(|e| Error::MalformedJob(e.to_string()))?;
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body))
            .message_id(ev.msg_id());
        self.js
            .send_publish(subject, publish)
            .await
            .map_err(|e| Error::nats("record a result", e))?
            .await
            .map_err(|e| Error::nats("record a result", e))?;
        Ok(())
    }

    /// The last event of a job's history, if any.
    async fn last_result(&self, job: &Job) -> Result<Option<ResultEvent>> {
        let process =
            ProcessId::new(job.process.clone()).map_err(|e| Error::MalformedJob(e.to_string()))?;
        let subject = self.subjects.result(&job.group, &process, job.slot);
        let stream = self
            .js
            .get_stream(self.subjects.results_stream())
            .await
            .map_err(|e| Error::nats("open the results", e))?;
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(serde_json::from_slice(&m.payload).ok()),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(Error::nats("read a job's history", e)),
        }
    }

    /// How many times the instance's connection has connected (1 until a reconnect).
    fn connects(&self) -> u64 {
        self.js
            .client()
            .statistics()
            .connects
            .load(Ordering::Relaxed)
    }

    /// For a delivery now: the connect count, and whether a reconnect was first seen
    /// less than an ack wait ago (a delivery lost with a killed server comes back as a
    /// first delivery, at the latest one ack wait after the restart).
    fn delivered_since_reconnect(&self) -> (u64, bool) {
        let connects = self.connects();
        let now = (self.clock)();
        let Ok(mut seen) = self.reconnected.lock() else {
            return (connects, true);
        };
        if seen.0 != connects {
            *seen = (connects, now);
        }
        let window = u64::try_from(self.config.ack_wait.as_millis()).unwrap_or(u64::MAX);
        (
            connects,
            connects > 1 && now.saturating_sub(seen.1) < window,
        )
    }

    async fn execute(self: &Arc<Self>, mut h: Held) {
        // A job delivered again may have been finished by an instance that died
        // before it acknowledged: its history decides. So may one held here across a
        // reconnect: a server that restarted may have lost the record of its delivery
        // and delivered it again, as a first attempt, to another instance, which may
        // have run it meanwhile (seen in `make chaos WORKERS=1`: a job parked for its
        // execution key before a server SIGKILL ran twice after it); and so may one
        // delivered soon after a reconnect, as a first delivery that may not be one.
        if h.attempt > 1 || h.suspect || h.connects != self.connects() {
            match self.last_result(&h.job).await {
                Ok(Some(ev)) if ev.state.is_final() => {
                    self.release_queue_key(&h.job).await;
                    self.counts.already_final.fetch_add(1, Ordering::Relaxed);
                    let _ = h.msg.ack().await;
                    self.forget_cancel(&h.job).await;
                    return;
                }
                // Its history counts attempts too: a restarted server that lost the
                // record of a delivery (or of a NAK) delivers it again as if it were
                // the first, and the next attempt is the one after the last recorded.
                Ok(Some(ev)) => h.attempt = h.attempt.max(ev.attempt.saturating_add(1)),
                Ok(None) => {}
                Err(e) => {
                    self.record(Level::Warn, format!("{}: {e}; handed back", h.job.id()));
                    let _ = h
                        .msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return;
                }
            }
        }
        if self.is_cancelled(&h.job) {
            // Recorded cancelled: no longer queued.
            self.release_queue_key(&h.job).await;
            self.settle_cancelled(&h, None, None).await;
            return;
        }
        let mut queued = true;
        loop {
            // Its execution key is taken before each attempt; held elsewhere, the job
            // is parked in the buffer (still queued: its queue key stays held) and
            // this executor goes on to other jobs.
            let Some(key) = self.take_key(&h).await else {
                return;
            };
            if std::mem::take(&mut queued) {
                // It starts now: no longer queued.
                self.release_queue_key(&h.job).await;
            }
            let cancel = self.hard_stop.child_token();
            let started = (self.clock)();
            let id = h.job.id();
            self.with(|s| {
                s.running
                    .insert(id.clone(), (h.clone(), started, cancel.clone()))
            });
            // A cancel applied between the check above and the insert found nothing
            // running to stop: stop it here.
            if self.is_cancelled(&h.job) {
                cancel.cancel();
            }
            let handler = Arc::clone(&self.handler);
            let job = Arc::clone(&h.job);
            let c2 = cancel.clone();
            let context = Context {
                fencing: key.as_ref().map(|k| k.fencing().clone()),
            };
            let link = key.as_ref().map(|k| {
                let (lost, cancel) = (k.lost(), cancel.clone());
                tokio::spawn(async move {
                    lost.cancelled().await;
                    cancel.cancel();
                })
            });
            let mut run = tokio::spawn(async move { handler.handle_in(&job, &context, c2).await });
            let t0 = std::time::Instant::now();
            let mut key = key;
            let mut link = link;
            let outcome = match tokio::time::timeout(self.config.job_timeout, &mut run).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) if e.is_panic() => {
                    self.counts.panics.fetch_add(1, Ordering::Relaxed);
                    Outcome::Failed(format!("handler panicked: {}", panic_text(e)))
                }
                Ok(Err(e)) => Outcome::Failed(format!("handler task: {e}")),
                Err(_) => {
                    cancel.cancel();
                    // Told to stop, the handler may not have yet (a `command` kills
                    // its child and waits for it; a library handler may ignore the
                    // token): its execution key stays held, and renewed, until it
                    // has returned, so no other holder runs beside it.
                    if let Some(k) = key.take() {
                        let l = link.take();
                        tokio::spawn(async move {
                            let _ = run.await;
                            if let Some(l) = l {
                                l.abort();
                            }
                            k.release().await;
                        });
                    }
                    Outcome::Failed(format!(
                        "timed out after {} ms",
                        self.config.job_timeout.as_millis()
                    ))
                }
            };
            let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
            let outcome = self.release_key(&h, key, link, outcome).await;
            if self.is_cancelled(&h.job) {
                self.with(|s| s.running.remove(&id));
                self.settle_cancelled(&h, Some(started), Some(ms)).await;
                return;
            }
            if self.hard_stop.is_cancelled() {
                // Stopped by the shutdown, not by its own fault: hand it back untouched.
                self.with(|s| s.running.remove(&id));
                let _ = h.msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
            // Strict order: a failed attempt is retried here, after its delay, with
            // the job still held (kept alive, shown running): nothing of its process
            // overtakes it, as a redelivery later could.
            let again = self.config.order == Order::Strict
                && h.attempt < self.config.max_attempts
                && matches!(outcome, Outcome::Retry { .. } | Outcome::Failed(_));
            if !again {
                self.with(|s| s.running.remove(&id));
                self.finish(&h, outcome, started, ms).await;
                return;
            }
            let (delay, reason) = match outcome {
                Outcome::Retry { after, reason } => {
                    (after.unwrap_or_else(|| self.backoff(h.attempt)), reason)
                }
                Outcome::Failed(reason) => (self.backoff(h.attempt), reason),
                Outcome::Done | Outcome::Fatal(_) => (Duration::ZERO, String::new()),
            };
            let mut ev = self.event(&h, State::Failed);
            ev.started_ms = Some(started);
            ev.duration_ms = Some(ms);
            ev.reason = Some(reason.clone());
            if let Err(e) = self.store_result(&ev).await {
                self.with(|s| s.running.remove(&id));
                self.record(Level::Error, format!("{id}: {e}; handed back"));
                let _ = h.msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            self.record(
                Level::Warn,
                format!(
                    "{id} attempt {} failed: {reason}; again in {delay:?}",
                    h.attempt
                ),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => {}
            }
            h.attempt += 1;
        }
    }

    /// Records a cancelled job (before it ran, or stopped while running) and
    /// acknowledges it.
    async fn settle_cancelled(&self, h: &Held, started: Option<u64>, ms: Option<u64>) {
        let mut ev = self.event(h, State::Cancelled);
        ev.started_ms = started;
        ev.duration_ms = ms;
        ev.reason = Some("cancelled (turnstile job cancel)".into());
        if let Err(e) = self.store_result(&ev).await {
            self.record(Level::Error, format!("{}: {e}; handed back", h.job.id()));
            let _ = h
                .msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
        self.counts.cancelled.fetch_add(1, Ordering::Relaxed);
        self.record(Level::Info, format!("{} cancelled", h.job.id()));
        let _ = h.msg.ack().await;
        self.forget_cancel(&h.job).await;
    }

    /// After `job`'s final outcome is recorded: its cancel, if it has one, has done
    /// its work (a delivery again finds the final history first), so it is deleted —
    /// every instance's watch drops it from memory, and the bucket keeps one marker.
    async fn forget_cancel(&self, job: &Job) {
        if !self.is_cancelled(job) {
            return;
        }
        let Some(kv) = &self.kv else { return };
        let key = crate::control::cancel_key(&job.group, &job.process, job.slot);
        if let Err(e) = journal::setup::purge_released(kv, &key, None).await {
            self.record(
                Level::Warn,
                format!("{}: its cancel was not deleted ({e}); it stays", job.id()),
            );
        }
    }

    /// Records an attempt's outcome and acts on it ([`Instance::settle`]). Strict
    /// order: here and now, so nothing of the job's process starts before. Unordered:
    /// in the background, once there is room ([`RECORDING`]), so the executor takes
    /// its next job without waiting for the round trip; the order within the job
    /// (stored, then acked) is the same.
    async fn finish(self: &Arc<Self>, h: &Held, outcome: Outcome, started: u64, ms: u64) {
        if self.config.order == Order::Strict {
            self.settle(h, outcome, started, ms).await;
            return;
        }
        let Ok(room) = Arc::clone(&self.recording_room).acquire_owned().await else {
            // Never closed; if it were, record here.
            self.settle(h, outcome, started, ms).await;
            return;
        };
        let (me, h) = (Arc::clone(self), h.clone());
        self.recording.spawn(async move {
            me.settle(&h, outcome, started, ms).await;
            drop(room);
            // A bounded buffer may have room again ([`Instance::recording_now`]).
            me.changed.notify_waiters();
        });
    }

    /// Outcomes being recorded in the background (stored, not yet acknowledged).
    fn recording_now(&self) -> usize {
        RECORDING.saturating_sub(self.recording_room.available_permits())
    }

    /// Acknowledges a job done. Behind a bounded buffer the server confirms the ack
    /// before the room it frees is fetched into; an ack still in flight would let
    /// the server hand out one job more than the bound for a moment.
    async fn ack_done(&self, h: &Held) {
        let _ = match self.config.buffer {
            Kind::Bounded(_) => h.msg.double_ack().await,
            Kind::Queue | Kind::Dropbox => h.msg.ack().await,
        };
    }

    /// Stores an attempt's outcome in the results, then acks, NAKs (with its backoff)
    /// or terminates its work message; one not stored is handed back.
    async fn settle(&self, h: &Held, outcome: Outcome, started: u64, ms: u64) {
        let (state, reason, delay) = match outcome {
            Outcome::Done => (State::Done, None, None),
            Outcome::Fatal(r) => (State::Dead, Some(r), None),
            Outcome::Retry { reason, .. } | Outcome::Failed(reason)
                if h.attempt >= self.config.max_attempts =>
            {
                (
                    State::Dead,
                    Some(format!(
                        "{reason} (attempt {} of {})",
                        h.attempt, self.config.max_attempts
                    )),
                    None,
                )
            }
            Outcome::Retry { after, reason } => {
                let d = after.unwrap_or_else(|| self.backoff(h.attempt));
                (State::Failed, Some(reason), Some(d))
            }
            Outcome::Failed(reason) => (State::Failed, Some(reason), Some(self.backoff(h.attempt))),
        };
        let mut ev = self.event(h, state);
        ev.started_ms = Some(started);
        ev.duration_ms = Some(ms);
        ev.reason = reason.clone();
        if let Err(e) = self.store_result(&ev).await {
            // Not recorded: hand it back; its next delivery decides again.
            self.record(Level::Error, format!("{}: {e}; handed back", h.job.id()));
            let _ = h
                .msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
        if state.is_final() {
            self.forget_cancel(&h.job).await;
        }
        match state {
            State::Done => {
                self.counts.done.fetch_add(1, Ordering::Relaxed);
                self.ack_done(h).await;
            }
            State::Failed => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                self.record(
                    Level::Warn,
                    format!(
                        "{} attempt {} failed: {}",
                        h.job.id(),
                        h.attempt,
                        reason.unwrap_or_default()
                    ),
                );
                let _ = h.msg.ack_with(AckKind::Nak(delay)).await;
            }
            State::Dead | State::Cancelled | State::Merged => {
                self.counts.dead.fetch_add(1, Ordering::Relaxed);
                self.record(
                    Level::Error,
                    format!(
                        "{} is dead: {}",
                        h.job.id(),
                        reason.clone().unwrap_or_default()
                    ),
                );
                if let Ok(body) = serde_json::to_vec(&ev) {
                    let _ = self
                        .js
                        .publish(
                            self.subjects.worker_dead(&self.config.group),
                            Bytes::from(body),
                        )
                        .await;
                }
                let _ = h.msg.ack_with(AckKind::Term).await;
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        Duration::from_millis(backoff(
            attempt,
            u64::try_from(self.config.backoff_initial.as_millis()).unwrap_or(u64::MAX),
            u64::try_from(self.config.backoff_max.as_millis()).unwrap_or(u64::MAX),
        ))
    }

    /// Every third of `ack_wait`, tells the work stream that every job this instance
    /// holds (waiting or running) is alive, so none is handed to another instance.
    async fn keep_alive(&self) {
        let every = self.config.ack_wait / 3;
        loop {
            tokio::time::sleep(every).await;
            let held: Vec<Arc<jetstream::Message>> = self
                .with(|s| {
                    s.buffer
                        .iter()
                        .map(|p| Arc::clone(&p.item.msg))
                        .chain(s.running.values().map(|(h, _, _)| Arc::clone(&h.msg)))
                        .collect()
                })
                .unwrap_or_default();
            for m in held {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// The durable consumer of an unordered group on the work stream.
pub fn consumer_name(group: &str) -> String {
    format!("group-{group}")
}

/// The durable consumer of a strict group's work partition `n`: `p<n>-<group>`, a
/// prefix no unordered group's name has (`group-<group>-p<n>` was, until group
/// `a-p1`'s consumer turned out to be group `a`'s partition 1).
pub fn partition_consumer_name(group: &str, n: u32) -> String {
    format!("p{n}-{group}")
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(not text)".into()),
        Err(e) => e.to_string(),
    }
}
